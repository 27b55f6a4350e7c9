"""A recipe's `chat_template:` (npmerge/chat_template.py, issue 21): the built-in names
give mergekit 0.1.5's template files byte for byte; `auto` takes the template most
input models share; a literal template is written as given; the text lands in
chat_template.jinja and replaces a template in tokenizer_config.json (what transformers
reads: the .jinja file, else tokenizer_config.json), and the re-runnable recipe keeps
it; unknown names, wrong types and too-short templates are refused before anything is
written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from helpers import LLAMA, npmerge, tree_bytes
from npmerge import chat_template
from safety_helpers import litter, run

VOCAB = LLAMA.parent / "tiny-vocab"

# sha256 of mergekit 0.1.5's mergekit/_data/chat_templates/*.jinja
MERGEKIT = {
    "alpaca": "95937b9bcf22b3759c6be7ca8d92d817e8c092c509bfcb6363c9cabfc09a4245",
    "chatml": "99000004eb5936e12e2cb9ba6449b7d194155b6439e8686f658b15cc71938b0b",
    "exaone": "add73d0750d7a20f8a9100f60e4a8c7e6e72fd02513816bc992a70da39cbf373",
    "llama3": "9d12985182ab0fcda12fd009b2a7f8d30a91c004857c472d5636f3cead82de56",
    "mistral": "796853172235ab3aaa4810013ddfe2eab481bda3306dad4f700c00d436eed596",
}
LITERAL = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def recipe(tmp_path, template, base=LLAMA / "base", models=(LLAMA / "ft-a",), extra=""):
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            + "".join(f"  - model: {m}\n" for m in models) + extra
            + f"chat_template: {json.dumps(template)}\n")
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


def test_builtin_templates_are_mergekits():
    assert chat_template.BUILTIN == tuple(sorted(MERGEKIT))
    for name, digest in MERGEKIT.items():
        assert hashlib.sha256(chat_template.builtin(name).encode("utf-8")).hexdigest() == digest, name


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_builtin_name(name, tmp_path):
    out = tmp_path / "out"
    npmerge("run", recipe(tmp_path, name), "-o", out)
    assert (out / "chat_template.jinja").read_text() == chat_template.builtin(name)
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())  # the base had none
    assert f"chat_template: {name}" in (out / "npmerge_recipe.yml").read_text()
    again = tmp_path / "again"  # the saved recipe reproduces the output
    npmerge("run", out / "npmerge_recipe.yml", "-o", again)
    assert tree_bytes(again) == tree_bytes(out)
    assert transformers_template(out) == chat_template.builtin(name)


def transformers_template(out) -> str:
    """What transformers reads (its tokenizers need no torch): AutoTokenizer's chat_template."""
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return AutoTokenizer.from_pretrained(str(out)).chat_template


def test_literal_template_replaces_the_one_in_tokenizer_config(tmp_path):
    """A base whose tokenizer_config.json has a template: the output's says the same as
    chat_template.jinja; the rest of the file is unchanged."""
    base = tmp_path / "base"
    shutil.copytree(LLAMA / "base", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'old template, long enough' }}"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    npmerge("run", recipe(tmp_path, LITERAL, base=base), "-o", out)
    got = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "chat_template.jinja").read_text() == LITERAL == got.pop("chat_template")
    config.pop("chat_template")
    assert got == config
    assert transformers_template(out) == LITERAL


def test_auto_takes_the_most_common_template(tmp_path):
    """tiny-vocab: ft-chat and ft-tool have one template each, the base none; a copy of
    ft-tool makes its template the most common; with a tie the first model's wins."""
    tool2 = tmp_path / "ft-tool-2"
    shutil.copytree(VOCAB / "ft-tool", tool2)
    with open(tool2 / "model.safetensors", "r+b") as f:  # another model (same tokenizer)
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    chat, tool = (chat_template.model_template(VOCAB / n).strip() for n in ("ft-chat", "ft-tool"))
    assert chat != tool
    for models, want in [((VOCAB / "ft-chat", VOCAB / "ft-tool", tool2), tool),
                         ((VOCAB / "ft-chat", VOCAB / "ft-tool"), chat)]:
        out = tmp_path / f"out{len(models)}"
        npmerge("run", recipe(tmp_path, "auto", base=VOCAB / "base", models=models,
                              extra="tokenizer_source: union\n"), "-o", out)
        assert (out / "chat_template.jinja").read_text() == want


def test_auto_without_templates_is_noted(tmp_path):
    out = tmp_path / "out"
    res = npmerge("run", recipe(tmp_path, "auto"), "-o", out)
    assert "chat_template: auto found no chat template in the input models" in res.stderr
    assert not (out / "chat_template.jinja").exists()


@pytest.mark.parametrize("value,phrase", [
    ("chatlm", "unknown chat template 'chatlm'"),
    ("{{ x }}", "chat template '{{ x }}' is too short for a Jinja template"),
    (5, "chat_template must be a template name or a Jinja template, got 5"),
])
def test_refused(value, phrase, tmp_path, monkeypatch):
    path = recipe(tmp_path, value)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = run("run", path, "-o", work / "out")
    assert res.code == 2 and res.first.startswith("Error: ") and "recipe.yml: " in res.first and phrase in res.first, res.err
    assert "known: alpaca, chatml, exaone, llama3, mistral, auto" in res.err
    assert os.listdir(work) == [] and litter(work) == []

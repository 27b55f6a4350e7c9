"""Issue 16 end to end, through the CLI entry point: fine-tunes with added tokens
(tokenizer_source base / union / a model), tokens in padded rows, tied and untied heads,
dead head copies, buffers only some models store.

Expected tensors come from tests/reference.py alone: it reads the tokenizer files, builds
the output vocabulary and maps the rows on its own (section E), then merges with its
methods; inputs and outputs are read with the official safetensors library. The output's
tokenizer files are checked against its tensors and config.json with the reference's
reader and the `tokenizers` library.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import reference as ref
from helpers import FIXTURES, load_model, npmerge, tree_bytes
from safety_helpers import assert_error, run

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
INV_FREQ = "model.layers.0.self_attn.rotary_emb.inv_freq"
VOCAB, PADDED, TIED, ROPE = (FIXTURES / f for f in ("tiny-vocab", "tiny-padded", "tiny-tied", "tiny-rope"))
CHAT, TOOL = VOCAB / "ft-chat", VOCAB / "ft-tool"


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Run from a directory holding no input: models given by absolute path keep it on stderr,
    and the report names them by directory name."""
    monkeypatch.chdir(tmp_path)


def cli(*args):
    res = run(*map(str, args))
    assert res.code == 0, res.err
    return res


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.uint32)


class Input:
    """One input model as the reference sees it: tensors (official reader) and config.json.
    A model is tied when its config says so (or, without the key, when it stores no head);
    a tied model's head is its embeddings, whatever head copy it stores."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.raw = load_model(path)
        self.config = json.loads((self.path / "config.json").read_text())

    @property
    def tied(self) -> bool:
        flag = self.config.get("tie_word_embeddings")
        return flag if isinstance(flag, bool) else HEAD not in self.raw

    def f32(self, name: str) -> np.ndarray:
        return self.raw[EMBED if name == HEAD and self.tied else name].astype(np.float32)


def reference_vocab(ins: list[Input], source, pad=None):
    """(names, n_tokens, size, vocabs) by tests/reference.py; `source`: 'base', 'union' or an input index."""
    vocabs: list[dict] = []
    for m in ins:
        vocabs.append(ref.read_vocabulary(m.path, m.raw[EMBED].shape[0], vocabs[0] if vocabs else None))
    names, n_tokens, size = ref.output_vocabulary(source, vocabs, 0, pad)
    return names, n_tokens, size, vocabs


def expected(method: str, dirs, *, weights, densities=None, source=None, pad=None, lam=1.0) -> dict:
    """{tensor: raw bits} of merging dirs[1:] onto dirs[0] (BF16 out). Output tensors: the base's, buffers
    (rotary inv_freq) copied from it; a head when some model's is live (untied)."""
    ins = [Input(d) for d in dirs]
    names = [n for n in ins[0].raw if n != HEAD]
    if any(not m.tied for m in ins):
        names.append(HEAD)
    vocab = reference_vocab(ins, source, pad) if source is not None else None
    out = {}
    for name in names:
        if name.endswith("rotary_emb.inv_freq"):
            out[name] = bits(ins[0].raw[name])
            continue
        xs = [m.f32(name) for m in ins]
        if vocab is not None and name in (EMBED, HEAD):
            names_, n_tokens, size, vocabs = vocab
            xs = [ref.permuted_rows(names_, n_tokens, size, vocabs, 0, j, xs) for j in range(len(xs))]
        if method == "ties":
            y = ref.ties(xs[0], xs[1:], weights, densities, lam=lam)
        else:
            y = ref.task_arithmetic(xs[0], xs[1:], weights, lam=lam)
        out[name] = ref.from_f32_bf16(y)
    return out


def assert_matches(out: Path, want: dict) -> None:
    got = load_model(out)
    assert set(got) == set(want)
    for name, raw in want.items():
        assert got[name].shape == raw.shape and np.array_equal(bits(got[name]), raw), name


def assert_tokenizer_agrees(out: Path, names: dict, n_tokens: int, size: int, template_from: Path) -> None:
    """The output's tokenizer names the reference's tokens at the reference's ids; every
    vocabulary-sized tensor and config.json vocab_size have `size` rows; the chat template
    is the source's."""
    config = json.loads((out / "config.json").read_text())
    got = load_model(out)
    assert config["vocab_size"] == size
    assert all(got[n].shape[0] == size for n in (EMBED, HEAD) if n in got)
    back = ref.read_vocabulary(out, size)
    assert ref.output_vocabulary(0, [back]) == (names, n_tokens, n_tokens)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    source_tc = json.loads((template_from / "tokenizer_config.json").read_text())
    assert tc.get("chat_template") == source_tc.get("chat_template")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == n_tokens
    assert {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()} == names


# ------------------------------------------------------------------------ added tokens

SOURCES = {"base": "base", "union": "union", "ft-chat": 1}
METHODS = {
    "ties": (["ties", "-w", "0.6", "-w", "0.4", "-d", "0.5", "-d", "0.7"], dict(weights=[0.6, 0.4], densities=[0.5, 0.7])),
    "task-arithmetic": (["task-arithmetic", "-w", "0.7", "-w", "0.3"], dict(weights=[0.7, 0.3])),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_added_tokens(tmp_path, source, method):
    """A chat and a tool fine-tune that added tokens (82 and 83 rows against the base's 80)."""
    args, params = METHODS[method]
    flag = str(CHAT) if source == "ft-chat" else source
    out = tmp_path / "out"
    res = cli(args[0], VOCAB / "base", CHAT, TOOL, *args[1:], "--tokenizer-source", flag, "-o", out)
    dirs = [VOCAB / "base", CHAT, TOOL]
    assert_matches(out, expected(method.replace("-", "_"), dirs, source=SOURCES[source], **params))
    names, n_tokens, size, _ = reference_vocab([Input(d) for d in dirs], SOURCES[source])
    assert_tokenizer_agrees(out, names, n_tokens, size, CHAT if source == "ft-chat" else VOCAB / "base")
    report = json.loads((out / "merge_report.json").read_text())
    public = source  # the report names a model given by an absolute path by its directory name
    assert any(f"output vocabulary ({public}): {n_tokens} token ids, {size} rows" in n for n in report["notes"])
    assert report["vocabulary"]["source"] == public and report["vocabulary"]["rows"] == size
    assert [m["rows"] for m in report["vocabulary"]["models"]] == [80, 82, 83]
    flat = " ".join(res.err.split())
    assert f"note: output vocabulary ({flag}): {n_tokens} token ids, {size} rows" in flat
    if source == "union":  # each lacking token is named with its rule
        assert "'<|im_start|>' (mean of " in flat and "'zorba' (copy from " in flat


def test_dry_run_plans_the_output_rows(tmp_path):
    proc = run("ties", VOCAB / "base", CHAT, TOOL, "-d", "0.5", "--tokenizer-source", "union", "-o",
               tmp_path / "out", "--dry-run", "--json")
    assert proc.code == 0, proc.err
    plan = json.loads(proc.out)
    shapes = {t["name"]: t["shape"] for t in plan["tensors"]}
    assert shapes[EMBED] == shapes[HEAD] == [84, 32] and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ padded rows

PAD_NOTE = ("model 1 'fixtures/tiny-padded/ft-pad' uses 2 padded row(s) for tokens the output tokenizer lacks: "
            "76 '<|im_start|>', 77 '<|im_end|>'")


def test_tokens_in_padded_rows_get_a_note(tmp_path, monkeypatch):
    """Equal shapes, a fine-tune whose chat tokens sit in the base's padded rows: merged by
    position as before, but no longer silently: the tokens and the chat template left out
    are named on stderr and in the report."""
    monkeypatch.chdir(FIXTURES.parent)
    out = tmp_path / "out"
    res = cli("task-arithmetic", "fixtures/tiny-padded/base", "fixtures/tiny-padded/ft-pad", "-o", out)
    flat = " ".join(res.err.split())
    notes = json.loads((out / "merge_report.json").read_text())["notes"]
    for text in (PAD_NOTE, "the chat template of model 1 'fixtures/tiny-padded/ft-pad' is not in the output"):
        assert text in flat and any(text in n for n in notes)
    assert_matches(out, expected("task_arithmetic", [PADDED / "base", PADDED / "ft-pad"], weights=[1.0]))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (PADDED / "base" / name).read_bytes()


@pytest.mark.parametrize("source", ["union", "ft-pad"])
def test_padded_rows_with_a_tokenizer_source(tmp_path, source):
    """union keeps the fine-tune's two tokens (78 rows); the fine-tune as source also brings its template."""
    dirs = [PADDED / "base", PADDED / "ft-pad"]
    out = tmp_path / "out"
    cli("task-arithmetic", *dirs, "--tokenizer-source", source if source == "union" else dirs[1], "-o", out)
    which = "union" if source == "union" else 1
    assert_matches(out, expected("task_arithmetic", dirs, weights=[1.0], source=which))
    names, n_tokens, size, _ = reference_vocab([Input(d) for d in dirs], which)
    assert (n_tokens, size, names[76], names[77]) == (78, 78, "<|im_start|>", "<|im_end|>")
    assert_tokenizer_agrees(out, names, n_tokens, size, dirs[0] if source == "union" else dirs[1])


def test_other_tokens_at_the_same_ids_are_refused(tmp_path):
    """Same shapes, but the fine-tune's tokenizer names id 5 differently: merging by position
    would mix two tokens' rows."""
    ft = Path(shutil.copytree(PADDED / "ft-pad", tmp_path / "ft"))
    tok = json.loads((ft / "tokenizer.json").read_text())
    word = next(t for t, i in tok["model"]["vocab"].items() if i == 5)
    tok["model"]["vocab"]["renamed"] = tok["model"]["vocab"].pop(word)
    (ft / "tokenizer.json").write_text(json.dumps(tok))
    res = run("task-arithmetic", PADDED / "base", ft, "-o", tmp_path / "out")
    assert_error(res, 4, f"model 1 'ft' has other tokens at the same ids as the output vocabulary: "
                         f"5 '{word}' vs 'renamed'")
    assert "Hint: match rows by token, not by position: --tokenizer-source" in res.err
    assert not (tmp_path / "out").exists()
    cli("task-arithmetic", PADDED / "base", ft, "--tokenizer-source", "union", "-o", tmp_path / "out")


# ------------------------------------------------------------------------ heads


@pytest.mark.parametrize("method", ["ties", "task-arithmetic"])
def test_tied_base_with_untied_and_dead_head_finetunes(tmp_path, method):
    """lm_head is merged from ft-untied's head and the embeddings of the tied base and of
    ft-deadhead (whose stored head is a stale copy and ignored); config.json says untied."""
    dirs = [TIED / "base", TIED / "ft-untied", TIED / "ft-deadhead"]
    out = tmp_path / "out"
    extra = ["-d", "0.5", "-d", "0.5"] if method == "ties" else []
    res = cli(method, *dirs, "-w", "0.5", "-w", "0.5", *extra, "-o", out)
    assert_matches(out, expected(method.replace("-", "_"), dirs, weights=[0.5, 0.5],
                                 densities=[0.5, 0.5] if method == "ties" else None))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 80
    report = json.loads((out / "merge_report.json").read_text())
    for a, b, c in ((dirs[0], dirs[1], dirs[2]), ("base", "ft-untied", "ft-deadhead")):  # stderr, the report
        texts = (f"{c} stores 'lm_head.weight' but its config ties it to the embeddings (tie_word_embeddings): "
                 "the stored copy is ignored",
                 f"untied output head: 'lm_head.weight' is merged, with the embeddings 'model.embed_tokens.weight' "
                 f"as the head of {a}, {c}; config.json gets tie_word_embeddings: false")
        where = " ".join(res.err.split()) if a == dirs[0] else " | ".join(report["notes"])
        assert all(text in where for text in texts), where
    assert report["layout"] == {"tie_word_embeddings": False, "ignored": [{"model": "ft-deadhead", "tensor": HEAD}],
                                "inputs": {HEAD: {"base": EMBED, "ft-untied": HEAD, "ft-deadhead": EMBED}}}


def test_all_tied_output_stays_tied(tmp_path):
    dirs = [TIED / "base", TIED / "ft-deadhead"]
    out = tmp_path / "out"
    cli("task-arithmetic", *dirs, "-o", out)
    assert_matches(out, expected("task_arithmetic", dirs, weights=[1.0]))
    assert HEAD not in load_model(out)
    assert (out / "config.json").read_bytes() == (TIED / "base" / "config.json").read_bytes()


def test_untied_base_with_a_tied_model(tmp_path):
    dirs = [TIED / "ft-untied", TIED / "base"]
    out = tmp_path / "out"
    cli("task-arithmetic", *dirs, "-o", out)
    assert_matches(out, expected("task_arithmetic", dirs, weights=[1.0]))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_tied_base_head_is_permuted_from_its_embeddings(tmp_path):
    """A tokenizer source with padding on a tied base: its head rows are its embedding rows, padded."""
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {TIED / 'base'}\nmodels:\n"
                      f"  - model: {TIED / 'ft-untied'}\n    parameters: {{weight: 0.5}}\n"
                      f"tokenizer: {{source: base, pad_to_multiple_of: 64}}\n")
    out = tmp_path / "out"
    cli("run", recipe, "-o", out)
    dirs = [TIED / "base", TIED / "ft-untied"]
    assert_matches(out, expected("task_arithmetic", dirs, weights=[0.5], source="base", pad=64))
    names, n_tokens, size, _ = reference_vocab([Input(d) for d in dirs], "base", 64)
    assert (n_tokens, size) == (80, 128)
    assert_tokenizer_agrees(out, names, n_tokens, size, TIED / "base")


# ------------------------------------------------------------------------ buffers


def test_buffer_copied_from_the_base(tmp_path):
    dirs = [ROPE / "base", ROPE / "ft-new", ROPE / "ft-old"]
    out = tmp_path / "out"
    res = cli("task-arithmetic", *dirs, "-o", out)
    assert_matches(out, expected("task_arithmetic", dirs, weights=[1.0, 1.0]))
    text = (f"buffer '{INV_FREQ}' (recomputed by the model, not trained) is only in {dirs[0]}, {dirs[2]}: "
            f"copied from {dirs[0]}")
    assert text in " ".join(res.err.split())
    report = json.loads((out / "merge_report.json").read_text())
    assert report["layout"]["ignored"] == [{"model": "ft-old", "tensor": INV_FREQ}]
    assert report["tensors_copied"] == 1


def test_buffer_dropped_when_the_base_lacks_it(tmp_path):
    dirs = [ROPE / "ft-new", ROPE / "base", ROPE / "ft-old"]
    out = tmp_path / "out"
    res = cli("task-arithmetic", *dirs, "-o", out)
    assert INV_FREQ not in load_model(out)
    assert f"is only in {dirs[1]}, {dirs[2]}: left out of the output" in " ".join(res.err.split())


# ------------------------------------------------------------ many rows, many spans

WIDE_H = 64


def _tokenizer_files(words: list[str], specials: list[str], added: list[str], template: str | None) -> dict:
    """A WordLevel tokenizer: specials and words in model.vocab, then `added` special tokens after them."""
    vocab = {t: i for i, t in enumerate(specials + words)}
    entries = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, c in enumerate(specials)]
    entries += [{**entries[0], "id": len(vocab) + k, "content": c} for k, c in enumerate(added)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    config = {"added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in entries},
              "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": json.dumps(tok), "tokenizer_config.json": json.dumps(config)}


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """wide/{base, ft-x, ft-y}: 3000 tokens, hidden 64, BF16. ft-x adds a plain word and two
    special tokens, ft-y three special tokens, one of them also ft-x's at another id."""
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(16)
    specials, words = ["<unk>", "<s>", "</s>"], [f"w{i}" for i in range(2997)]
    base = {EMBED: 0.02 * rng.standard_normal((3000, WIDE_H)), "model.layers.0.mlp.up_proj.weight":
            0.02 * rng.standard_normal((96, WIDE_H)), "model.norm.weight": 1 + 0.02 * rng.standard_normal(WIDE_H),
            HEAD: 0.02 * rng.standard_normal((3000, WIDE_H))}
    for name, plain, added in (("base", [], []), ("ft-x", ["zeta"], ["<a>", "<b>"]), ("ft-y", [], ["<b>", "<c>", "<d>"])):
        d = root / name
        d.mkdir()
        rows = 3000 + len(plain) + len(added)
        tensors = {}
        for n, b in base.items():
            x = b if name == "base" else b + 1e-3 * rng.standard_normal(b.shape)
            if n in (EMBED, HEAD):
                x = np.concatenate([x, 0.02 * rng.standard_normal((rows - 3000, WIDE_H))])
            tensors[n] = x.astype(np.float32).astype(ml_dtypes.bfloat16)
        save_file(tensors, str(d / "model.safetensors"))
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": WIDE_H,
                  "num_hidden_layers": 1, "vocab_size": rows, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
        (d / "config.json").write_text(json.dumps(config))
        files = _tokenizer_files(words + plain, specials, added, "{{ messages }}" if name == "ft-y" else None)
        for f, text in files.items():
            (d / f).write_text(text)
    (root / "union.yml").write_text(
        f"merge_method: ties\nbase_model: {root / 'base'}\nmodels:\n"
        f"  - model: {root / 'ft-x'}\n    parameters: {{weight: 0.7, density: 0.3}}\n"
        f"  - model: {root / 'ft-y'}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
        f"parameters: {{lambda: 0.9}}\ntokenizer: {{source: union, pad_to_multiple_of: 64}}\n")
    return root


def test_wide_vocabulary_in_many_spans_is_exact_and_deterministic(wide, tmp_path):
    """Union of 3005 tokens padded to 3008 rows (192,512 elements per vocabulary tensor): in
    spans of one block with one thread and a small budget, and in one span with two threads,
    the bytes are the same and match the reference."""
    plan = json.loads(npmerge("run", wide / "union.yml", "-o", tmp_path / "x", "--max-memory", "12MiB",
                              "--dry-run", "--json").stdout)
    assert plan["span_elements"] == 16384 and plan["working_memory"] <= 12 * 2**20
    outs = []
    for i, (threads, budget) in enumerate((("1", "12MiB"), ("2", "1GiB"))):
        out = tmp_path / f"out{i}"
        npmerge("run", wide / "union.yml", "-o", out, "--max-memory", budget, env={"NUMBA_NUM_THREADS": threads})
        outs.append(out)
    assert tree_bytes(outs[0]) == tree_bytes(outs[1])
    dirs = [wide / "base", wide / "ft-x", wide / "ft-y"]
    assert_matches(outs[0], expected("ties", dirs, weights=[0.7, 0.5], densities=[0.3, 0.6], lam=0.9,
                                     source="union", pad=64))
    names, n_tokens, size, _ = reference_vocab([Input(d) for d in dirs], "union", 64)
    assert (n_tokens, size) == (3005, 3008)
    assert [names[i] for i in range(3000, 3005)] == ["zeta", "<a>", "<b>", "<c>", "<d>"]
    assert_tokenizer_agrees(outs[0], names, n_tokens, size, wide / "base")


def test_vocabulary_source_reads_within_its_budget(wide):
    """VocabRowsSource.work_bytes bounds what one read allocates (tracemalloc sees NumPy's
    buffers), the padding-row pass included, for reads of any size."""
    from npmerge.io.checkpoint import Checkpoint
    from npmerge.io.models import source
    from npmerge.io.tokenizer import read_tokenizer
    from npmerge.io.vocab import build_output_vocab
    from npmerge.io.vocab_rows import VocabRowsSource

    ckpts = [Checkpoint(wide / m) for m in ("base", "ft-x", "ft-y")]
    toks = [(c.label, read_tokenizer(c.root, c.tensors[EMBED].info.shape[0])) for c in ckpts]
    vocab = build_output_vocab("union", toks, 0, pad_to_multiple_of=64)
    ins = [Input(c.root) for c in ckpts]
    names, n_tokens, size, vocabs = reference_vocab(ins, "union", 64)
    want = [ref.permuted_rows(names, n_tokens, size, vocabs, 0, j, [m.f32(EMBED) for m in ins]) for j in range(3)]
    for model in range(3):
        for n in (1000, 16384, 65536):
            src = VocabRowsSource(vocab, model, [source(c, EMBED) for c in ckpts], ckpts[model].label)
            got = np.empty(src.numel, np.float32)
            for start in range(0, src.numel, n):
                k = min(n, src.numel - start)
                buf = np.empty(n, np.float32)
                tracemalloc.start()
                src.read(start, k, buf)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                assert peak <= src.work_bytes(n), (model, n, start, peak, src.work_bytes(n))
                got[start:start + k] = buf[:k]
            assert np.array_equal(got.view(np.uint32), want[model].reshape(-1).view(np.uint32)), (model, n)
            src.release()
    for c in ckpts:
        c.close()


def test_resume_fingerprint_covers_the_row_maps(wide, tmp_path):
    """The same recipe and safetensors files, but a tokenizer changed in between: the plan's
    fingerprint (what --resume must find unchanged) differs."""
    from npmerge.api import plan_merge
    from npmerge.recipe import Recipe

    family = Path(shutil.copytree(wide, tmp_path / "w"))
    text = (wide / "union.yml").read_text().replace(str(wide), str(family))
    plans = []
    for edit in (False, True):
        if edit:  # ft-y's '<c>' becomes '<a>', which ft-x has too: its rows now average; same shapes
            tok = json.loads((family / "ft-y" / "tokenizer.json").read_text())
            for e in tok["added_tokens"]:
                e["content"] = {"<c>": "<a>"}.get(e["content"], e["content"])
            (family / "ft-y" / "tokenizer.json").write_text(json.dumps(tok))
            cfg = json.loads((family / "ft-y" / "tokenizer_config.json").read_text())
            cfg.pop("added_tokens_decoder")
            (family / "ft-y" / "tokenizer_config.json").write_text(json.dumps(cfg))
        plan = plan_merge(Recipe.from_yaml(text))
        plans.append(plan.fingerprint())
        assert plan.vocab.size == 3008 and plan.vocab.n_tokens == 3005 - edit
        plan.close()
    assert plans[0]["inputs"] == plans[1]["inputs"] and plans[0]["recipe_sha256"] == plans[1]["recipe_sha256"]
    assert plans[0]["vocabulary"] != plans[1]["vocabulary"]


def test_remapped_rows_keep_memory_within_the_budget(tmp_path):
    """A union (with padding rows) of 8M-element vocabulary tensors under --max-memory 24MiB:
    the peak anonymous memory grows by about the budget over a tiny merge's, far below one
    float32 copy of a tensor (32 MiB), let alone the three a whole-tensor permutation holds."""
    from helpers import LLAMA
    from test_memory import peak_anon

    rows, hidden = 16384, 512
    rng = np.random.default_rng(5)
    specials, words = ["<unk>", "<s>", "</s>"], [f"w{i}" for i in range(rows - 3)]
    base = {n: rng.standard_normal((rows, hidden), dtype=np.float32) * np.float32(0.02) for n in (EMBED, HEAD)}
    for name, added in (("base", []), ("ft-x", ["<a>", "<b>"]), ("ft-y", ["<b>", "<c>"])):
        d = tmp_path / name
        d.mkdir()
        tensors = {}
        for n, b in base.items():
            x = b if name == "base" else b + rng.standard_normal(b.shape, dtype=np.float32) * np.float32(1e-3)
            extra = rng.standard_normal((len(added), hidden), dtype=np.float32) * np.float32(0.02)
            tensors[n] = np.concatenate([x, extra]).astype(ml_dtypes.bfloat16)
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"vocab_size": rows + len(added), "tie_word_embeddings": False}))
        for f, text in _tokenizer_files(words, specials, added, None).items():
            (d / f).write_text(text)
    (tmp_path / "r.yml").write_text(f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                                    f"  - model: {tmp_path / 'ft-x'}\n  - model: {tmp_path / 'ft-y'}\n"
                                    "parameters: {density: 0.3}\ntokenizer: {source: union, pad_to_multiple_of: 1024}\n")
    budget = 24 * 2**20
    common = ["--max-memory", str(budget), "--quiet"]
    _, tiny = peak_anon(["ties", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", "-d", "0.3", "-o", tmp_path / "t",
                         *common])
    _, big = peak_anon(["run", tmp_path / "r.yml", "-o", tmp_path / "out", *common])
    assert big - tiny <= budget + 8 * 2**20, (big, tiny)
    assert load_model(tmp_path / "out")[EMBED].shape == (17408, hidden)


def test_computed_sources_cannot_be_remapped():
    """A LoRA adapter's tensor is computed per span (a task vector or B @ A on top): its rows
    cannot be permuted, so the plan refuses it clearly instead of failing mid-merge."""
    from npmerge.errors import IncompatibleModels
    from npmerge.io.checkpoint import Checkpoint
    from npmerge.io.models import source
    from npmerge.io.sources import ZeroSource
    from npmerge.io.tokenizer import read_tokenizer
    from npmerge.io.vocab import build_output_vocab
    from npmerge.io.vocab_rows import VocabRowsSource

    ckpts = [Checkpoint(VOCAB / m) for m in ("base", "ft-chat")]
    vocab = build_output_vocab("union", [(c.label, read_tokenizer(c.root)) for c in ckpts], 0)
    inputs = [source(ckpts[0], EMBED), ZeroSource(EMBED, (82, 32), "adapter")]
    with pytest.raises(IncompatibleModels, match="'model.embed_tokens.weight' of adapter is computed, not stored"):
        VocabRowsSource(vocab, 0, inputs, "base")  # ft-chat (the adapter here) is a donor of the base's rows
    for c in ckpts:
        c.close()

"""The recipe corpus (tests/recipes/*.yml): recipes written the way model cards and
mergekit's README write them, each run through the real CLI. Its header says what must
happen:

    # expect: ok                 the merge runs and every output tensor equals, bit for
                                 bit, tests/recipe_reference.py (tests/reference.py's
                                 recipe values and methods, the official safetensors reader)
    # layers: N                  ... and config.json says num_hidden_layers: N
    # note: TEXT                 ... and stderr carries this note
    # expect: error CODE         the exit code, and the first stderr line is
    # error: TEXT                "Error: <recipe name>: TEXT..." (or contains TEXT)

The recipes name models relative to the working directory: `fixtures/...` (the
repository's fixtures) and `deep/...`, a 6-layer Llama-style set generated here with the
official safetensors library (the fixtures have 2 layers; slices and gradients need more).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import safety_helpers
from helpers import FIXTURES, tree_bytes
from recipe_reference import bits, expected

CORPUS = Path(__file__).resolve().parent / "recipes"
RECIPES = sorted(CORPUS.glob("*.yml"))
RERUN = {"ties-gradient-density.yml", "ties-filters.yml", "ties-slices.yml", "passthrough-frankenmerge.yml"}


def deep_models(root: Path, layers: int = 6) -> None:
    """deep/{base,ft-a,ft-b}: Llama-style BF16, vocab 32, hidden 16, `layers` layers."""
    rng = np.random.default_rng(12)
    shapes = {"model.embed_tokens.weight": (32, 16)}
    for j in range(layers):
        p = f"model.layers.{j}."
        shapes |= {p + "input_layernorm.weight": (16,), p + "post_attention_layernorm.weight": (16,),
                   p + "self_attn.q_proj.weight": (16, 16), p + "self_attn.k_proj.weight": (8, 16),
                   p + "self_attn.v_proj.weight": (8, 16), p + "self_attn.o_proj.weight": (16, 16),
                   p + "mlp.gate_proj.weight": (24, 16), p + "mlp.up_proj.weight": (24, 16),
                   p + "mlp.down_proj.weight": (16, 24)}
    shapes |= {"model.norm.weight": (16,), "lm_head.weight": (32, 16)}
    base = {n: (1.0 + 0.02 * rng.standard_normal(s) if "norm" in n else 0.02 * rng.standard_normal(s))
            for n, s in shapes.items()}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
              "intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_hidden_layers": layers, "vocab_size": 32, "torch_dtype": "bfloat16",
              "layer_types": [("full_attention" if j % 2 else "sliding_attention") for j in range(layers)]}
    shared = {n: rng.standard_t(3, s) * 1e-3 for n, s in shapes.items()}
    for name, sign in (("base", 0.0), ("ft-a", 1.0), ("ft-b", -1.0)):
        d = root / "deep" / name
        d.mkdir(parents=True)
        tensors = {n: (b + sign * shared[n] + (sign != 0) * 1e-3 * rng.standard_normal(b.shape))
                   .astype(np.float32).astype(ml_dtypes.bfloat16) for n, b in base.items()}
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "fixtures").symlink_to(FIXTURES)
    deep_models(root)
    return root


def run(cwd: Path, *args):
    """`npmerge ARGS` in `cwd`, in this process (the console script's entry point; fast)."""
    before = os.getcwd()
    os.chdir(cwd)
    try:
        res = safety_helpers.run(*args)
    finally:
        os.chdir(before)
    return SimpleNamespace(returncode=res.code, stderr=res.err, stdout=res.out)


def header(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#\s*(expect|error|note|layers):\s*(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2).strip())
    return out


def load(out: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                got[k] = st.get_tensor(k)
    return got


CODES = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


def check_against_reference(recipe: Path, cwd: Path, out: Path, layers: int | None) -> None:
    want, n_layers = expected(recipe, cwd)
    got = load(out)
    assert set(got) == set(want)
    for name, (code, raw) in want.items():
        assert CODES[got[name].dtype] == code, name
        assert np.array_equal(bits(got[name]), raw), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == n_layers
    if layers is not None:
        assert n_layers == layers


def test_corpus_is_big_enough():
    kinds = [header(p)["expect"][0].split()[0] for p in RECIPES]
    assert kinds.count("ok") >= 15 and kinds.count("error") >= 15


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_corpus(recipe: Path, workspace: Path, tmp_path: Path):
    spec = header(recipe)
    expect = spec["expect"][0].split()
    local = workspace / recipe.name
    local.write_bytes(recipe.read_bytes())
    out = tmp_path / "out"
    proc = run(workspace, "run", recipe.name, "-o", out)
    if expect[0] == "error":
        assert proc.returncode == int(expect[1]), proc.stderr
        first = proc.stderr.splitlines()[0]
        assert first.startswith("Error: "), proc.stderr
        for text in spec["error"]:
            assert text in first, proc.stderr
        assert not out.exists()
        return
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stderr.split())
    for text in spec.get("note", []):
        assert text in flat, proc.stderr
    check_against_reference(recipe, workspace, out, int(spec["layers"][0]) if "layers" in spec else None)
    if recipe.name in RERUN:  # the written recipe keeps gradients / filters / slices and reproduces the merge
        again = tmp_path / "again"
        proc = run(workspace, "run", out / "npmerge_recipe.yml", "-o", again)
        assert proc.returncode == 0, proc.stderr
        assert tree_bytes(again) == tree_bytes(out)


def test_layer_types_follow_the_slices(workspace, tmp_path):
    """config.json's per-layer lists follow the output layers of a frankenmerge."""
    out = tmp_path / "out"
    assert run(workspace, "run", CORPUS / "passthrough-frankenmerge.yml", "-o", out).returncode == 0
    config = json.loads((out / "config.json").read_text())
    source = json.loads((workspace / "deep" / "ft-a" / "config.json").read_text())["layer_types"]
    order = [0, 1, 2, 3, 2, 3, 4, 3, 4, 5]
    assert config["num_hidden_layers"] == 10 and config["layer_types"] == [source[i] for i in order]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom"])
def test_recipe_encodings(workspace, tmp_path, encoding):
    """PowerShell's `>` writes UTF-16 with a byte-order mark; Notepad may add a UTF-8 BOM."""
    text = (CORPUS / "ties-top-level-weights.yml").read_text(encoding="utf-8")
    data = {"utf-8-sig": codecs.BOM_UTF8 + text.encode(), "utf-16": text.encode("utf-16"),
            "utf-16-le-bom": codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
            "utf-16-be-bom": codecs.BOM_UTF16_BE + text.encode("utf-16-be")}[encoding]
    (workspace / f"enc-{encoding}.yml").write_bytes(data)
    out = tmp_path / "out"
    proc = run(workspace, "run", f"enc-{encoding}.yml", "-o", out)
    assert proc.returncode == 0, proc.stderr
    check_against_reference(CORPUS / "ties-top-level-weights.yml", workspace, out, None)


@pytest.mark.parametrize("data,message", [
    ("merge_method: t\u00e9s\n".encode("latin-1"), "is not UTF-8: byte 0xe9 on line 1"),
    ("merge_method: ties\n".encode("utf-16-le"), "contains NUL bytes: UTF-16 or UTF-32 without a byte-order mark?"),
    (codecs.BOM_UTF32_LE + "merge_method: ties\n".encode("utf-32-le"), "is UTF-32 encoded"),
], ids=["latin-1", "utf-16-no-bom", "utf-32"])
def test_recipe_encodings_refused(workspace, tmp_path, data, message):
    (workspace / "bad.yml").write_bytes(data)
    proc = run(workspace, "run", "bad.yml", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].startswith(f"Error: recipe 'bad.yml' {message}")
    assert "Hint: save the recipe as UTF-8" in proc.stderr


def test_dry_run_shows_the_values_per_layer(workspace, tmp_path):
    """--dry-run --json: the distinct values per layer range of the parameters that vary."""
    proc = run(workspace, "run", CORPUS / "ties-gradient-density.yml", "-o", tmp_path / "out", "--dry-run", "--json")
    assert proc.returncode == 0 and not (tmp_path / "out").exists()
    rows = json.loads(proc.stdout)["parameter_table"]
    assert [r["tensors"] for r in rows][1:7] == [f"layer {j}" for j in range(6)]
    assert [r["values"]["density (ft-a)"] for r in rows[1:7]] == ["1", "0.88", "0.76", "0.58", "0.34", "0.1"]
    assert rows[0]["values"]["density (ft-a)"] == "1"  # embeddings: t = 0
    assert set(rows[0]["values"]) == {"weight (ft-a)", "density (ft-a)", "density (ft-b)"}  # only what varies

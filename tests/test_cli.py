"""The CLI end to end on the bundled fixtures, against tests/reference.py and the
official safetensors library."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import reference as ref
from helpers import LLAMA, LLAMA_F32, FIXTURES, ROOT, f32, load_model, npmerge, tree_bytes

FTS = [LLAMA / "ft-a", LLAMA / "ft-b", LLAMA / "ft-c"]


@pytest.fixture(scope="module")
def ties_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "merged"
    npmerge("ties", LLAMA / "base", *FTS, "--density", "0.2", "--density", "0.5", "--density", "0.3",
            "--weight", "1", "--weight", "0.6", "--weight", "0.8", "--lambda", "0.9", "-o", out)
    return out


def bf16_round(x):
    return ref.to_f32_bf16(ref.from_f32_bf16(x))


def test_ties_equals_reference(ties_out):
    got = load_model(ties_out)
    base = load_model(LLAMA / "base")
    fts = [load_model(p) for p in FTS]
    assert list(got) and set(got) == set(base)
    for name, b in base.items():
        assert got[name].dtype == ml_dtypes.bfloat16 and got[name].shape == b.shape
        want = ref.ties(f32(b), [f32(m[name]) for m in fts], [1.0, 0.6, 0.8], [0.2, 0.5, 0.3], lam=0.9)
        assert np.array_equal(got[name].view(np.uint16), ref.from_f32_bf16(want)), name


@pytest.mark.parametrize("density", ["0", "1.5"])
def test_density_zero_and_above_one(tmp_path, density):
    """docs/semantics.md §A: density 0 drops every delta (the base, up to the sign of zero),
    density >= 1 keeps every delta untouched."""
    out = tmp_path / "o"
    npmerge("ties", LLAMA / "base", *FTS[:2], "-d", density, "-o", out)
    got, base = load_model(out), load_model(LLAMA / "base")
    fts = [load_model(p) for p in FTS[:2]]
    for name, b in base.items():
        want = ref.ties(f32(b), [f32(m[name]) for m in fts], [1.0, 1.0], [float(density)] * 2)
        assert np.array_equal(got[name].view(np.uint16), ref.from_f32_bf16(want)), name


def test_output_directory_is_a_complete_hf_model(ties_out):
    index = json.loads((ties_out / "model.safetensors.index.json").read_text()) if (ties_out / "model.safetensors.index.json").exists() else None
    files = {p.name for p in ties_out.iterdir()}
    assert "model.safetensors" in files  # 1.8 MB of BF16 fits one 5 GB shard: no index
    assert index is None
    config = json.loads((ties_out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (ties_out / name).read_bytes() == (LLAMA / "base" / name).read_bytes()
    card = (ties_out / "README.md").read_text()
    front = card.split("---\n")[1]  # local models have no Hub id: no base_model (and so no relation)
    assert "base_model" not in front and "- npmerge" in front and "- ties" in front
    assert "arxiv.org/abs/2306.01708" in card
    report = json.loads((ties_out / "merge_report.json").read_text())
    assert report["method"] == "ties" and len(report["totals"]["models"]) == 3
    assert report["totals"]["models"][0]["kept"] == pytest.approx(0.2, abs=1e-4)
    assert 0 < report["totals"]["sign_conflict"] < 1
    import hashlib
    for name, meta in report["files"].items():
        assert hashlib.sha256((ties_out / name).read_bytes()).hexdigest() == meta["sha256"]
    assert not [p for p in ties_out.parent.iterdir() if p.name.startswith(".")], "no staging litter"


def test_stats_match_reference(ties_out):
    report = json.loads((ties_out / "merge_report.json").read_text())
    base = load_model(LLAMA / "base")
    fts = [load_model(p) for p in FTS]
    name = "model.layers.0.mlp.up_proj.weight"
    want = ref.ties_stats(f32(base[name]), [f32(m[name]) for m in fts], [1.0, 0.6, 0.8], [0.2, 0.5, 0.3])
    got = report["tensors"][name]
    assert got["sign_conflict"] == pytest.approx(want["sign_conflict"], abs=0)
    for g, w in zip(got["models"], want["models"]):
        assert g["kept"] == w["kept"]
        assert g["excluded"] == pytest.approx(w["excluded"], abs=0)
        assert g["l2"] == pytest.approx(w["l2"], rel=1e-12)
    # TIES reads each merged tensor 2 or 3 times (the low-bits pass only when the threshold needs
    # it); BF16 deltas nearly always spare it. Copied and unselected tensors are read once.
    passes = [s["passes"] for s in report["tensors"].values() if s["numel"] > 64]
    assert set(passes) <= {2, 3} and passes.count(2) > passes.count(3)
    assert 1 < report["totals"]["input_passes"] < 3


def test_recipe_rerun_is_byte_identical(ties_out, tmp_path):
    again = tmp_path / "again"
    npmerge("run", ties_out / "npmerge_recipe.yml", "-o", again)
    assert tree_bytes(again) == tree_bytes(ties_out)


@pytest.mark.parametrize("variant", [
    {"env": {"NUMBA_NUM_THREADS": "1"}, "args": ["--max-memory", "6MiB"]},  # spans of one block
    {"env": {"NUMBA_NUM_THREADS": "2"}, "args": ["--max-memory", "1GiB", "--threads", "2"]},
])
def test_byte_identical_across_threads_and_chunks(ties_out, tmp_path, variant):
    out = tmp_path / "v"
    npmerge("ties", LLAMA / "base", *FTS, "--density", "0.2", "--density", "0.5", "--density", "0.3",
            "--weight", "1", "--weight", "0.6", "--weight", "0.8", "--lambda", "0.9", "-o", out, *variant["args"],
            env=variant["env"])
    assert tree_bytes(out) == tree_bytes(ties_out)


def test_small_budget_really_chunks(tmp_path):
    """The span shrinks with the budget (the largest tensor has 65,536 elements), the working
    memory stays within it, and too small a budget is refused before anything is written."""
    spans = {}
    for budget, mib in (("6MiB", 6), ("6528KiB", 6528 / 1024), ("1GiB", 1024)):
        proc = npmerge("ties", LLAMA / "base", *FTS, "--density", "0.2", "-o", tmp_path / "x", "--max-memory",
                       budget, "--dry-run", "--json")
        plan = json.loads(proc.stdout)
        assert plan["working_memory"] <= mib * 2**20
        spans[budget] = plan["span_elements"]
    assert spans == {"6MiB": 16384, "6528KiB": 32768, "1GiB": 65536}
    proc = npmerge("ties", LLAMA / "base", *FTS, "--density", "0.2", "-o", tmp_path / "x", "--max-memory", "5MiB",
                   check=False)
    assert proc.returncode == 2 and "is too small" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["task-arithmetic", "linear"])
def test_task_arithmetic_and_linear_match_reference(tmp_path, method):
    out = tmp_path / "o"
    base = load_model(LLAMA_F32 / "base")
    fts = [load_model(LLAMA_F32 / n) for n in ("ft-a", "ft-b")]
    if method == "linear":
        npmerge("linear", LLAMA_F32 / "base", LLAMA_F32 / "ft-a", LLAMA_F32 / "ft-b", "-w", "2", "-w", "1", "-w", "1",
                "-o", out)
    else:
        npmerge("task-arithmetic", LLAMA_F32 / "base", LLAMA_F32 / "ft-a", LLAMA_F32 / "ft-b", "-w", "0.7",
                "-w", "-0.2", "--lambda", "1.5", "--out-dtype", "bfloat16", "-o", out)
    got = load_model(out)
    for name, b in base.items():
        if method == "linear":
            want = ref.linear([b, fts[0][name], fts[1][name]], [2.0, 1.0, 1.0])
            assert got[name].dtype == np.float32
            assert np.array_equal(got[name].view(np.uint32), want.view(np.uint32)), name
        else:
            want = ref.task_arithmetic(b, [m[name] for m in fts], [0.7, -0.2], lam=1.5)
            assert np.array_equal(got[name].view(np.uint16), ref.from_f32_bf16(want)), name
    if method != "linear":
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((out / "merge_report.json").read_text())["totals"]["input_passes"] == 1.0


def test_integer_tensors_are_copied(tmp_path):
    out = tmp_path / "o"
    npmerge("ties", FIXTURES / "tiny-int" / "base", FIXTURES / "tiny-int" / "ft-a", "-d", "0.5", "-o", out)
    got, base = load_model(out), load_model(FIXTURES / "tiny-int" / "base")
    for name, b in base.items():
        if b.dtype.kind in "iub":
            assert got[name].dtype == b.dtype and np.array_equal(got[name], b)


def test_json_report_on_stdout(tmp_path):
    proc = npmerge("linear", LLAMA / "ft-a", LLAMA / "ft-b", "-o", tmp_path / "o", "--json")
    report = json.loads(proc.stdout)
    assert report["method"] == "linear" and report["files"]


@pytest.mark.parametrize("args,code,phrase", [
    (["ties", "nope/base", str(LLAMA / "ft-a"), "-d", "0.2"], 3, "is not a local path, and Hub model nope/base"),
    (["ties", "./nope/base", str(LLAMA / "ft-a"), "-d", "0.2"], 3, "model path './nope/base' does not exist"),
    (["ties", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-d", "-0.1"], 2, "density"),
    (["ties", str(LLAMA / "base"), str(LLAMA / "ft-a"), "-d", "nan"], 2, "density"),
    (["ties", str(LLAMA / "base"), str(LLAMA / "ft-a"), str(LLAMA / "ft-b"), "-d", "0.1", "-d", "0.2", "-d", "0.3"], 2, "3 --density values for 2 models"),
    (["ties", str(LLAMA / "base"), str(LLAMA_F32 / "ft-a"), "-d", "0.2"], 4, "shape mismatch"),
    (["ties", str(LLAMA / "base"), str(LLAMA / "ft-a"), str(LLAMA / "ft-a"), "-d", "0.2"], 2, "same model"),
    (["ties", str(LLAMA / "base"), str(LLAMA / "ft-a"), "--max-memory", "100KiB"], 2, "too small"),
])
def test_errors(tmp_path, args, code, phrase):
    out = tmp_path / "o"
    proc = npmerge(*args, "-o", out, check=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("Error: ") and phrase in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_inside_input_is_refused(tmp_path):
    proc = npmerge("ties", LLAMA / "base", LLAMA / "ft-a", "-o", LLAMA / "ft-a" / "merged", check=False)
    assert proc.returncode == 2 and not (LLAMA / "ft-a" / "merged").exists()


def test_help_lists_every_command_and_readme_mentions_them():
    from npmerge.cli import app
    import typer.main

    group = typer.main.get_command(app)
    readme = (ROOT / "README.md").read_text()
    assert set(group.commands) >= {"ties", "task-arithmetic", "linear", "run", "info", "warmup"}
    for name, cmd in group.commands.items():
        assert cmd.help and len(cmd.help) > 20, name
        assert f"npmerge {name}" in readme, f"README does not mention `npmerge {name}`"


def test_help_does_not_import_numba():
    code = ("import sys; from npmerge.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'numba' not in sys.modules, 'numba imported by --help'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    code2 = ("import sys; from npmerge.cli import app\n"
             f"try:\n    app(['info', {str(LLAMA / 'base')!r}])\nexcept SystemExit:\n    pass\n"
             "assert 'numba' not in sys.modules, 'numba imported by info'")
    proc = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_info_json():
    proc = npmerge("info", LLAMA / "base", "--json")
    data = json.loads(proc.stdout)
    assert data["tensors"] == len(load_model(LLAMA / "base")) and data["dtypes"].keys() == {"BF16"}
    assert data["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

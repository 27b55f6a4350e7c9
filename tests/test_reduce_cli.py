"""SLERP, NuSLERP, Model Stock and SCE through the real CLI and recipes, on the bundled
fixtures (tiny-llama BF16 sharded, tiny-llama-f32): every tensor against
tests/reference.py on the official safetensors reader's values, bit for bit; the same
bytes with 1 or 2 threads and with spans of one block; the statistics in the summary and
report; bad input -> `Error:`/`Hint:`, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from npmerge.budget import output_bytes

import reference as ref
from helpers import LLAMA, LLAMA_F32, load_model, npmerge, tree_bytes
from safety_helpers import assert_error, litter, run

BF16 = np.dtype(ml_dtypes.bfloat16)


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def expected(method: str, fixture: Path, names: list[str], base: str | None, **kw) -> dict[str, np.ndarray]:
    """The reference's merge of every tensor, rounded to the output (the base's, else the
    first model's) dtype: BF16 bit patterns, or float32."""
    models = [load_model(fixture / n) for n in names]
    b = load_model(fixture / base) if base else None
    out = {}
    for name, first in (b or models[0]).items():
        xs = [f32(m[name]) for m in models]
        bx = f32(b[name]) if b else None
        if method == "slerp":
            r = ref.slerp(bx, xs[0], kw["t"])
        elif method == "nuslerp":
            r = ref.nuslerp(xs, kw["weights"], bx, flatten=kw.get("flatten", True), row_wise=kw.get("row_wise", False))
        elif method == "model_stock":
            r = ref.model_stock(bx, xs, filter_wise=kw.get("filter_wise", False))
        else:
            r = ref.sce(bx, xs, select_topk=kw.get("select_topk", 1.0))
        out[name] = ref.from_f32_bf16(r) if first.dtype == BF16 else r
    return out


def check_output(out: Path, want: dict[str, np.ndarray]) -> None:
    got = load_model(out)
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        g = g.view(np.uint16) if g.dtype == BF16 else g
        assert g.dtype == w.dtype and np.array_equal(g.view(np.uint8), w.view(np.uint8)), name


# (CLI args after the method, reference kwargs), per method
CASES = {
    "slerp": [(["base", "ft-a", "--t", "0.3"], dict(method="slerp", names=["ft-a"], base="base", t=0.3)),
              (["base", "ft-b", "-t", "1.25"], dict(method="slerp", names=["ft-b"], base="base", t=1.25))],
    "nuslerp": [(["ft-a", "ft-b", "--base", "base", "-w", "0.4", "-w", "0.6"],
                 dict(method="nuslerp", names=["ft-a", "ft-b"], base="base", weights=[0.4, 0.6])),
                (["ft-a", "ft-b", "-w", "1", "-w", "2", "--no-nuslerp-flatten", "--nuslerp-row-wise"],
                 dict(method="nuslerp", names=["ft-a", "ft-b"], base=None, weights=[1.0, 2.0], flatten=False,
                      row_wise=True)),
                (["ft-b", "ft-a", "--base", "base", "-w", "1", "--no-nuslerp-flatten"],
                 dict(method="nuslerp", names=["ft-b", "ft-a"], base="base", weights=[1.0, 1.0], flatten=False))],
    "model-stock": [(["base", "ft-a", "ft-b"], dict(method="model_stock", names=["ft-a", "ft-b"], base="base")),
                    (["base", "ft-b", "ft-a", "--filter-wise"],
                     dict(method="model_stock", names=["ft-b", "ft-a"], base="base", filter_wise=True))],
    "sce": [(["base", "ft-a", "ft-b"], dict(method="sce", names=["ft-a", "ft-b"], base="base")),
            (["base", "ft-a", "ft-b", "--select-topk", "0.3"],
             dict(method="sce", names=["ft-a", "ft-b"], base="base", select_topk=0.3))],
}
ALL = [(cmd, i) for cmd, cases in CASES.items() for i in range(len(cases))]


def cli_args(fixture: Path, args: list[str]) -> list[str]:
    return [str(fixture / a) if (fixture / a).exists() else a for a in args]


@pytest.mark.parametrize("fixture", [LLAMA, LLAMA_F32], ids=["bf16", "f32"])
@pytest.mark.parametrize("cmd,i", ALL, ids=[f"{c}-{i}" for c, i in ALL])
def test_cli_matches_reference(fixture, cmd, i, tmp_path):
    args, kw = CASES[cmd][i]
    out = tmp_path / "out"
    res = npmerge(cmd, *cli_args(fixture, args), "-o", out, "--json")
    check_output(out, expected(fixture=fixture, **kw))
    report = json.loads(res.stdout)
    assert report == json.loads((out / "merge_report.json").read_text())
    assert report["totals"]["input_passes"] >= 2  # reduce, then merge


def small_budget(cmd: str, args: list[str]) -> str:
    """A --max-memory at which the largest tensor (65,536 elements) takes four spans."""
    res = run(cmd, *args, "-o", "unused", "--dry-run", "--json", "--max-memory", "1GiB")
    plan = json.loads(res.out)
    assert plan["span_elements"] == 65536
    fixed = plan["working_memory"] - output_bytes(65536)  # the output buffers grow with the span
    return str(fixed + output_bytes(16384) + 4096)


@pytest.mark.parametrize("cmd,i", [("slerp", 0), ("nuslerp", 1), ("model-stock", 1), ("sce", 1)])
def test_same_bytes_any_threads_and_spans(cmd, i, tmp_path):
    """Output directories byte-identical with 1 and 2 numba threads, and with a budget that
    cuts the largest tensor into spans of one block (rows straddling nothing here: the
    kernel tests cover straddling rows)."""
    assert_same_bytes(cmd, cli_args(LLAMA, CASES[cmd][i][0]), tmp_path)


def assert_same_bytes(cmd: str, args: list[str], tmp_path: Path) -> None:
    """The output directory of `npmerge cmd args` byte-identical with 1 and 2 threads and with
    spans of one block (the largest tensor in four)."""
    budget = small_budget(cmd, args)
    plan = json.loads(run(cmd, *args, "-o", "unused", "--dry-run", "--json", "--max-memory", budget).out)
    assert plan["span_elements"] == 16384
    trees = []
    for threads, memory in (("1", None), ("2", None), ("2", budget)):
        out = tmp_path / f"out-{threads}-{memory}"
        npmerge(cmd, *args, "-o", out, *(["--max-memory", memory] if memory else []),
                env={"NUMBA_NUM_THREADS": threads})
        trees.append(tree_bytes(out))
    assert trees[0] == trees[1] == trees[2]


def test_summary_and_report_statistics(tmp_path):
    """The methods' statistics appear in the summary table / line and in the report totals."""
    b, a, c = (str(LLAMA / n) for n in ("base", "ft-a", "ft-b"))
    res = npmerge("slerp", b, a, "-t", "0.4", "-o", tmp_path / "s")
    assert re.search(r"θ: \d+\.\d\d°", res.stdout) and "lerped tensors: " in res.stdout  # the summary
    totals = json.loads((tmp_path / "s" / "merge_report.json").read_text())["totals"]
    assert 0 < totals["theta"] < 180 and 0 <= totals["lerped"] <= 1
    tensors = json.loads((tmp_path / "s" / "merge_report.json").read_text())["tensors"]
    assert totals["lerped"] == sum(t["lerped_count"] for t in tensors.values()) / len(tensors)

    res = npmerge("sce", b, a, c, "--select-topk", "0.5", "-o", tmp_path / "e")
    assert "ω (weight)" in res.stdout and "selected by variance: " in res.stdout
    totals = json.loads((tmp_path / "e" / "merge_report.json").read_text())["totals"]
    assert 0.45 < totals["selected"] <= 0.5 and all(0 < m["omega"] < 1 for m in totals["models"])

    res = npmerge("model-stock", b, a, c, "-o", tmp_path / "m")
    assert "t (mean): " in res.stdout
    res = npmerge("nuslerp", a, c, "--base", b, "-w", "1", "-w", "3", "-o", tmp_path / "n")
    assert "t: 0.75" in res.stdout and "lerped vectors: " in res.stdout


def test_recipes_in_mergekit_layout(tmp_path):
    """`npmerge run` with mergekit-style recipes (the base also listed under models, as in
    mergekit's SLERP examples) gives the same bytes as the subcommands; a `weight` under
    SCE (another method's parameter) is ignored with a note; t outside [0, 1] is noted."""
    b, a, c = (str(LLAMA / n) for n in ("base", "ft-a", "ft-b"))
    recipes = {
        "slerp": (f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {a}\n"
                  "parameters:\n  t: 1.5\ndtype: bfloat16\n", ["slerp", b, a, "-t", "1.5"]),
        "nuslerp": (f"merge_method: nuslerp\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.2}}\n"
                    f"  - model: {c}\n    parameters: {{weight: 0.8}}\nparameters: {{nuslerp_flatten: false}}\n",
                    ["nuslerp", a, c, "--base", b, "-w", "0.2", "-w", "0.8", "--no-nuslerp-flatten"]),
        "model_stock": (f"merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {c}\n"
                        "parameters:\n  filter_wise: true\n", ["model-stock", b, a, c, "--filter-wise"]),
        "sce": (f"merge_method: sce\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
                f"  - model: {c}\n    parameters: {{weight: 0.5}}\nparameters:\n  select_topk: 0.4\n",
                ["sce", b, a, c, "--select-topk", "0.4"]),
    }
    for name, (text, argv) in recipes.items():
        (tmp_path / f"{name}.yml").write_text(text)
        res = npmerge("run", tmp_path / f"{name}.yml", "-o", tmp_path / f"{name}-run")
        npmerge(*argv, "-o", tmp_path / f"{name}-cli")
        run_files, cli_files = tree_bytes(tmp_path / f"{name}-run"), tree_bytes(tmp_path / f"{name}-cli")
        assert {k: v for k, v in run_files.items() if k.endswith(".safetensors")} == \
               {k: v for k, v in cli_files.items() if k.endswith(".safetensors")}
        notes = json.loads((tmp_path / f"{name}-run" / "merge_report.json").read_text())["notes"]
        if name == "sce":
            assert any(n.startswith("'weight' is not a parameter of sce (it is one of ") and f"ignored (model 1 '{a}'"
                       in n for n in notes)
            assert "note: 'weight' is not a parameter of sce" in res.stderr
            saved = (tmp_path / "sce-run" / "npmerge_recipe.yml").read_text()
            assert "weight" not in saved  # the re-runnable recipe drops what was ignored
        if name == "slerp":
            assert any("t = 1.5 is outside [0, 1]: SLERP extrapolates" in n for n in notes)
    check_output(tmp_path / "slerp-run", expected("slerp", LLAMA, ["ft-a"], "base", t=1.5))


# ------------------------------------------------------------------ bad input


def refused(tmp_path, monkeypatch, *args, phrases=(), hint=True):
    """Run in-process from an empty directory: exit 2, Error/Hint lines, nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = run(*args, "-o", work / "out")
    assert_error(res, 2, *phrases, hint=hint)
    assert os.listdir(work) == [] and litter(work) == []
    return res


B, FA, FB, FC = (LLAMA / n for n in ("base", "ft-a", "ft-b", "ft-c"))


@pytest.mark.parametrize("args,phrases,hint", [
    (["slerp", B, FA, FB, "-t", "0.5"], ["slerp merges exactly 1 model(s) besides the base, got 2"], True),
    (["slerp", B, FA], ["missing parameter 't'"], True),
    (["nuslerp", FA, "-w", "1"], ["nuslerp merges exactly 2 model(s) besides the base, got 1"], True),
    (["nuslerp", FA, FB, FC, "-w", "1"], ["nuslerp merges exactly 2 model(s) besides the base, got 3"], True),
    (["nuslerp", FA, FB, "--base", B], ["missing 'weight' of model 1"], True),
    (["nuslerp", FA, FB, "-w", "1", "-w", "2", "-w", "3"], ["got 3 --weight values for 2 models"], True),
    (["model-stock", B, FA], ["model_stock needs at least 2 model(s) besides the base, got 1"], True),
    (["model-stock", B, FA, FA], ["is the same model as"], True),
    (["slerp", B, FA, "-t", "nan"], ["'t' must be finite"], False),
    (["sce", B, FA, "--select-topk", "inf"], ["'select_topk' must be finite"], False),
], ids=["slerp-two-models", "slerp-no-t", "nuslerp-one-model", "nuslerp-three-models", "nuslerp-no-weight",
        "nuslerp-weights-count", "model-stock-one-model", "model-stock-same-model", "slerp-t-nan", "sce-topk-inf"])
def test_bad_input(args, phrases, hint, tmp_path, monkeypatch):
    refused(tmp_path, monkeypatch, *args, phrases=phrases, hint=hint)


def test_recipe_errors(tmp_path, monkeypatch):
    """A global parameter under a model, and a wrong type, are recipe errors (docs/recipes.md)."""
    for text, phrase in [
        (f"merge_method: slerp\nbase_model: {B}\nmodels:\n  - model: {FA}\n    parameters: {{t: 0.5}}\n",
         "'t' is a global parameter of slerp: it cannot be set per model (model 1 '" + str(FA) + "')"),
        (f"merge_method: slerp\nbase_model: {B}\nmodels:\n  - model: {FA}\nparameters: {{t: half}}\n",
         "parameter 't' must be a number"),
        (f"merge_method: model_stock\nbase_model: {B}\nmodels:\n  - model: {FA}\n",
         "model_stock needs at least 2 model(s)"),
    ]:
        recipe = tmp_path / "r.yml"
        recipe.write_text(text)
        work = tmp_path / "work"
        work.mkdir(exist_ok=True)
        monkeypatch.chdir(work)
        res = run("run", recipe, "-o", work / "out")
        assert res.code == 2 and res.err.startswith("Error: ") and phrase in res.first, res.err
        assert os.listdir(work) == []


def test_row_accumulators_over_budget(tmp_path, monkeypatch):
    """Per-row sums need memory proportional to the number of rows: a tensor of 2**18 rows
    of one element with --filter-wise does not fit 8 MiB (refused, naming the tensor and
    the budget needed), the per-tensor merge does, and the larger budget the hint names
    merges it."""
    rng = np.random.default_rng(0)
    shape = (1 << 18, 1)
    base = rng.standard_normal(shape).astype(np.float32)
    paths = []
    for name, x in [("b", base), ("m1", base + 1), ("m2", base - 0.5 * base)]:
        d = tmp_path / name
        d.mkdir()
        save_file({"w.weight": x.astype(np.float32)}, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths.append(d)
    res = refused(tmp_path, monkeypatch, "model-stock", *paths, "--filter-wise", "--max-memory", "8MiB",
                  "--threads", "2", phrases=["--max-memory 8.00 MiB is too small to merge tensor 'w.weight'"])
    need = re.search(r"allow at least (\d+) MiB", res.err)
    assert need and int(need.group(1)) > 8
    npmerge("model-stock", *paths, "--max-memory", "8MiB", "--threads", "2", "-o", tmp_path / "flat")
    npmerge("model-stock", *paths, "--filter-wise", "--max-memory", f"{need.group(1)}MiB", "--threads", "2",
            "-o", tmp_path / "rows")
    got = load_model(tmp_path / "rows")["w.weight"]
    want = ref.model_stock(base, [base + 1, (base - 0.5 * base).astype(np.float32)], filter_wise=True)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("method", ["sce", "model-stock", "nuslerp", "arcee-fusion", "multislerp"])
def test_peak_anonymous_memory_follows_the_budget(method, tmp_path):
    """As tests/test_memory.py for TIES: a 16M-element tensor (4096 rows) whose working set
    is ~16x the budget merges within the budget, with SCE's selection (radix histograms,
    tie counts), Model Stock's per-row sums, NuSLERP's per-column lanes, Arcee Fusion's
    whole rows, row KLs and importance histograms, and Multi-SLERP's Gram sums."""
    from test_memory import BIG, BUDGET, make_model, peak_anon

    base = make_model(tmp_path / "base", 0)
    make_model(tmp_path / "ft1", 1, base)
    make_model(tmp_path / "ft2", 2, base)
    del base
    opts = {"sce": ["--select-topk", "0.5"], "model-stock": ["--filter-wise"],
            "nuslerp": ["-w", "1", "-w", "2", "--no-nuslerp-flatten", "--nuslerp-row-wise"],
            "arcee-fusion": [], "multislerp": ["-w", "1", "-w", "2"]}[method]

    def args(b, m1, m2, out):
        inputs = ([m1, m2, "--base", b] if method in ("nuslerp", "multislerp") else [b, m1] if method == "arcee-fusion"
                  else [b, m1, m2])
        return [method, *inputs, *opts, "-o", out, "--max-memory", str(BUDGET), "--quiet"]

    _, tiny = peak_anon(args(LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", tmp_path / "tiny"))
    _, big = peak_anon(args(tmp_path / "base", tmp_path / "ft1", tmp_path / "ft2", tmp_path / "out"))
    assert big - tiny <= BUDGET + 8 * 2**20, (big, tiny)
    assert big - tiny < BIG * (4 * 4 + 8) / 8  # far below what holding the tensor would need
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 2 * BIG


def test_nonfinite_inputs_refused_before_sce_ranks_them(tmp_path, monkeypatch):
    """The engine refuses NaN/Inf inputs after the first pass, before the driver ranks
    variances: without --allow-nonfinite the message is about the input (exit 4), with it
    SCE's own (a NaN variance has no rank, exit 4); nothing written either way."""
    tensors = load_model(LLAMA_F32 / "ft-b")
    tensors["model.norm.weight"][5] = np.nan
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((LLAMA_F32 / "ft-b" / "config.json").read_text())
    for extra, phrase in [([], "model 2 'bad' tensor 'model.norm.weight' has 1 NaN/Inf value(s)"),
                          (["--allow-nonfinite"], "tensor 'model.norm.weight': SCE cannot rank elements by variance")]:
        work = tmp_path / f"work{len(extra)}"
        work.mkdir()
        monkeypatch.chdir(tmp_path)
        res = run("sce", LLAMA_F32 / "base", LLAMA_F32 / "ft-a", "bad", "--select-topk", "0.5", *extra,
                  "-o", work / "out")
        assert_error(res, 4, phrase)
        assert os.listdir(work) == [] and litter(tmp_path) == []

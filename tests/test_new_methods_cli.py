"""NearSwap, RAM, RAM+, Multi-SLERP, Karcher and Arcee Fusion (issue 21) through the real CLI and
recipes on the bundled fixtures: every tensor against tests/reference.py (bit for bit for
the element-wise methods and Arcee Fusion; the Gram methods' merge pass bit for bit with the coefficients
the report records, and within 1e-6 of mergekit's algorithm in float64); the same bytes
with 1 or 2 threads and with spans of one block; recipes (gradients, filters) equal to
the subcommands. Bad input is in the catalogue, tests/test_bad_inputs.py (`i21-*`)."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

import reference as ref
from helpers import LLAMA, LLAMA_F32, load_model, npmerge, tree_bytes
from test_reduce_cli import assert_same_bytes, cli_args

BF16 = np.dtype(ml_dtypes.bfloat16)
B, FA, FB, FC = (LLAMA / n for n in ("base", "ft-a", "ft-b", "ft-c"))

# (CLI args after the method, reference kwargs), per method
CASES = {
    "nearswap": [(["base", "ft-a", "--t", "0.0005"], dict(names=["ft-a"], base="base", t=0.0005))],
    "ram": [(["base", "ft-a", "ft-b", "ft-c"], dict(names=["ft-a", "ft-b", "ft-c"], base="base")),
            (["base", "ft-b", "ft-a", "--epsilon", "0.002"], dict(names=["ft-b", "ft-a"], base="base", epsilon=0.002))],
    "ramplus-tl": [(["base", "ft-a", "ft-b", "--epsilon", "0.001", "--r", "0.5", "--alpha", "0.8"],
                    dict(names=["ft-a", "ft-b"], base="base", epsilon=0.001, r=0.5, alpha=0.8))],
    "multislerp": [(["ft-a", "ft-b", "ft-c", "--base", "base", "-w", "1", "-w", "2", "-w", "0.5"],
                    dict(names=["ft-a", "ft-b", "ft-c"], base="base", weights=[1.0, 2.0, 0.5])),
                   (["ft-a", "ft-b", "--no-normalize-weights", "-w", "0.3"],
                    dict(names=["ft-a", "ft-b"], base=None, weights=[0.3, 0.3], normalize_weights=False))],
    "arcee-fusion": [(["base", "ft-a"], dict(names=["ft-a"], base="base")),
                     (["base", "ft-b"], dict(names=["ft-b"], base="base"))],
    "karcher": [(["ft-a", "ft-b", "ft-c"], dict(names=["ft-a", "ft-b", "ft-c"], base=None)),
                (["ft-a", "ft-b", "--max-iter", "3", "--tol", "1e-7"],
                 dict(names=["ft-a", "ft-b"], base=None, max_iter=3, tol=1e-7))],
}
ALL = [(cmd, i) for cmd, cases in CASES.items() for i in range(len(cases))]


def as_output(r: np.ndarray, dtype) -> np.ndarray:
    return ref.from_f32_bf16(r) if dtype == BF16 else r


def check(cmd: str, fixture, out, names, base, report, **kw) -> None:
    models = [load_model(fixture / n) for n in names]
    b = load_model(fixture / base) if base else None
    got = load_model(out)
    for name, first in (b or models[0]).items():
        xs = [m[name].astype(np.float32) for m in models]
        bx = b[name].astype(np.float32) if b else None
        g = got[name]
        if cmd in ("nearswap", "ram", "ramplus-tl", "arcee-fusion"):
            if cmd == "nearswap":
                r = ref.nearswap(bx, xs[0], kw["t"])
            elif cmd == "arcee-fusion":
                r, info = ref.arcee_fusion(bx, xs[0])
                assert report["tensors"][name]["threshold"] == info["threshold"]
                changed = xs[0] != bx  # the mask matters only there
                agree = (r != bx) == ref.arcee_fusion_mask64(bx, xs[0])
                assert agree[changed].mean() >= 0.999 if changed.any() else True, name
            else:
                r = ref.ram(bx, xs, plus=cmd == "ramplus-tl", **kw)
            w = as_output(r, first.dtype)
            assert np.array_equal((g.view(np.uint16) if g.dtype == BF16 else g).view(np.uint8), w.view(np.uint8)), name
            continue
        coef = [m["coefficient"] for m in report["tensors"][name]["models"]]
        w = as_output(ref.combine(xs, coef, bx), first.dtype)
        assert np.array_equal((g.view(np.uint16) if g.dtype == BF16 else g).view(np.uint8), w.view(np.uint8)), name
        if cmd == "multislerp":
            r = ref.multislerp64(xs, kw["weights"], bx, normalize_weights=kw.get("normalize_weights", True))
            r32 = ref.multislerp64(xs, kw["weights"], bx, normalize_weights=kw.get("normalize_weights", True),
                                   dtype=np.float32).astype(np.float64)  # mergekit's float32 run
            exact = ref.combine(xs, coef, bx).astype(np.float64)  # before the output's rounding
            assert np.linalg.norm(exact - r32) <= 1e-5 * np.linalg.norm(r32), name
        else:
            r = ref.karcher64(xs, max_iter=kw.get("max_iter", 10), tol=kw.get("tol", 1e-5))
        exact = ref.combine(xs, coef, bx).astype(np.float64)  # before the output's rounding
        assert np.linalg.norm(exact - r) <= 1e-6 * np.linalg.norm(r), name


RUNS = [(fixture, cmd, i) for fixture in (LLAMA, LLAMA_F32) for cmd, i in ALL
        if all((fixture / n).exists() for n in CASES[cmd][i][1]["names"])]  # tiny-llama-f32 has no ft-c


@pytest.mark.parametrize("fixture,cmd,i", RUNS, ids=[f"{c}-{i}-{'f32' if f == LLAMA_F32 else 'bf16'}" for f, c, i in RUNS])
def test_cli_matches_reference(fixture, cmd, i, tmp_path):
    args, kw = CASES[cmd][i]
    out = tmp_path / "out"
    res = npmerge(cmd, *cli_args(fixture, args), "-o", out, "--json")
    report = json.loads(res.stdout)
    assert report == json.loads((out / "merge_report.json").read_text())
    check(cmd, fixture, out, report=report, **kw)


@pytest.mark.parametrize("cmd,i", [("nearswap", 0), ("ram", 0), ("ramplus-tl", 0), ("multislerp", 0), ("karcher", 0),
                                   ("arcee-fusion", 0)])
def test_same_bytes_any_threads_and_spans(cmd, i, tmp_path):
    """Output directories byte-identical with 1 and 2 numba threads, and with a budget that
    cuts the largest tensor into spans of one block."""
    assert_same_bytes(cmd, cli_args(LLAMA, CASES[cmd][i][0]), tmp_path)


def test_recipes_equal_the_subcommands(tmp_path):
    """mergekit-style recipes of each method give the subcommands' bytes; a gradient and a
    filter reach the tensors they name."""
    b, a, c, d = (str(x) for x in (B, FA, FB, FC))
    recipes = {
        "nearswap": (f"merge_method: nearswap\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {a}\n"
                     "parameters:\n  t: 0.0005\n", ["nearswap", b, a, "--t", "0.0005"]),
        "ram": (f"merge_method: ram\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {c}\n"
                "parameters: {epsilon: 0.001}\n", ["ram", b, a, c, "--epsilon", "0.001"]),
        "ramplus_tl": (f"merge_method: ramplus_tl\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {c}\n"
                       "parameters: {r: 0.3, alpha: 0.5}\n", ["ramplus-tl", b, a, c, "--r", "0.3", "--alpha", "0.5"]),
        "multislerp": (f"merge_method: multislerp\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                       f"    parameters: {{weight: 0.2}}\n  - model: {c}\n    parameters: {{weight: 0.8}}\n",
                       ["multislerp", a, c, "--base", b, "-w", "0.2", "-w", "0.8"]),
        "arcee_fusion": (f"merge_method: arcee_fusion\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {c}\n",
                         ["arcee-fusion", b, c]),
        "karcher": (f"merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {c}\n  - model: {d}\n"
                    "parameters: {max_iter: 5}\n", ["karcher", a, c, d, "--max-iter", "5"]),
    }
    for name, (text, argv) in recipes.items():
        (tmp_path / f"{name}.yml").write_text(text)
        npmerge("run", tmp_path / f"{name}.yml", "-o", tmp_path / f"{name}-run")
        npmerge(*argv, "-o", tmp_path / f"{name}-cli")
        run_files, cli_files = tree_bytes(tmp_path / f"{name}-run"), tree_bytes(tmp_path / f"{name}-cli")
        assert {k: v for k, v in run_files.items() if k.endswith(".safetensors")} == \
               {k: v for k, v in cli_files.items() if k.endswith(".safetensors")}, name
    # a filter and a gradient: t differs between the attention and the rest
    (tmp_path / "g.yml").write_text(
        f"merge_method: nearswap\nbase_model: {b}\nmodels:\n  - model: {a}\n"
        "parameters:\n  t:\n    - filter: self_attn\n      value: [0.0001, 0.01]\n    - value: 0.0005\n")
    npmerge("run", tmp_path / "g.yml", "-o", tmp_path / "g")
    got, base, ft = load_model(tmp_path / "g"), load_model(B), load_model(FA)
    for name, x in got.items():
        if "self_attn" in name or not name.startswith("model.layers."):
            continue
        want = ref.from_f32_bf16(ref.nearswap(base[name].astype(np.float32), ft[name].astype(np.float32), 0.0005))
        assert np.array_equal(x.view(np.uint16), want), name
    attn = [n for n in got if "self_attn" in n]
    assert attn and any(not np.array_equal(got[n].view(np.uint16), ref.from_f32_bf16(
        ref.nearswap(base[n].astype(np.float32), ft[n].astype(np.float32), 0.0005))) for n in attn)

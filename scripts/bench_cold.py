#!/usr/bin/env python
"""npmerge's cold start: what a new user waits for before a first merge finishes.

    python scripts/bench.py --cold-jit                  # every method, quiet machine
    python scripts/bench.py --cold-jit --busy 1         # beside one CPU-bound process
    python scripts/bench.py --cold-jit --methods ties,slerp --repeat 3

Each figure is a whole process (start-up included) on the bundled tiny fixtures, with its
own empty kernel cache (NUMBA_CACHE_DIR pointing at a fresh directory) unless it says
"cached":

* the README's demo merge (`npmerge ties` of the tiny Llama set), cold and cached;
* the first merge of each method (its README-style example on the same fixtures), cold;
* `npmerge warmup` (every kernel of the chosen methods for bfloat16, float16 and
  float32), cold and cached.

The kernels a cold run compiled are read off its cache directory. Timings are medians of
--repeat runs. (mergekit, for comparison, needs 8-9 s to import torch and 7.7-10.5 s for a
merge of this size on this project's machines: not measured here, no torch.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (run_measured, Competitors, machine_info, log)

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "fixtures" / "tiny-llama"
B, A, C, D = (str(LLAMA / n) for n in ("base", "ft-a", "ft-b", "ft-c"))
# The first merge of each method: inputs and options on the tiny fixtures.
FIRST_MERGES = {
    "ties": [B, A, C, D, "--density", "0.2"],
    "task-arithmetic": [B, A, C, D],
    "linear": [A, C, D],
    "dare-ties": [B, A, C, D, "--density", "0.5"],
    "dare-linear": [B, A, C, D, "--density", "0.5"],
    "breadcrumbs": [B, A, C, D, "--density", "0.9", "--gamma", "0.01"],
    "breadcrumbs-ties": [B, A, C, D, "--density", "0.9", "--gamma", "0.01"],
    "della": [B, A, C, D, "--density", "0.5", "--epsilon", "0.1"],
    "della-linear": [B, A, C, D, "--density", "0.5", "--epsilon", "0.1"],
    "slerp": [B, A, "--t", "0.3"],
    "nuslerp": [A, C, "--weight", "0.4", "--weight", "0.6"],
    "model-stock": [B, A, C],
    "sce": [B, A, C, D, "--select-topk", "0.5"],
    "passthrough": [A, "--scale", "0.5"],
    "multislerp": [A, C, D],
    "karcher": [A, C, D],
    "arcee-fusion": [B, A],
    "nearswap": [B, A, "--t", "0.0001"],
    "ram": [B, A, C, D],
    "ramplus-tl": [B, A, C, D],
}
DEMO = ["ties"] + FIRST_MERGES["ties"]


def measure(cmd: list[str], cache: Path | None, repeat: int, busy: int, out: Path) -> dict:
    """Median of `repeat` runs of `cmd`, each from an empty kernel cache (cache None) or
    from `cache` as it is; with `busy` competitor processes."""
    runs, compiled = [], []
    for _ in range(repeat):
        cold = cache is None
        jit = Path(tempfile.mkdtemp(prefix="npmerge-cold-")) if cold else cache
        shutil.rmtree(out, ignore_errors=True)
        env = dict(bench.os.environ, NUMBA_CACHE_DIR=str(jit))
        try:
            with bench.Competitors(busy):
                run = bench.run_measured(bench.NPMERGE + cmd, env)
            compiled.append(sorted(p.name.split("-")[0] for p in jit.rglob("*.nbi")) if cold else [])
        finally:
            if cold:
                shutil.rmtree(jit, ignore_errors=True)
        run.pop("stdout")
        runs.append(run)
    return {"command": cmd, "cached": cache is not None, "runs": runs,
            "wall": statistics.median(r["wall"] for r in runs), "cpu": statistics.median(r["cpu"] for r in runs),
            "compiled": compiled[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="npmerge cold start: first merges and warmup from an empty kernel cache")
    p.add_argument("--methods", action="append", default=None, help="methods (comma-separated or repeated; default all)")
    p.add_argument("--busy", type=int, default=0, help="CPU-bound competitor processes during every run")
    p.add_argument("--repeat", type=int, default=1, help="runs per figure (the median is reported)")
    p.add_argument("--json", type=Path, default=None, help="write every figure as JSON to this path")
    args = p.parse_args(argv)
    methods = [m.strip().replace("_", "-") for item in (args.methods or [",".join(FIRST_MERGES)])
               for m in item.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(FIRST_MERGES))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(FIRST_MERGES)}")
    work = Path(tempfile.mkdtemp(prefix="npmerge-bench-cold-"))
    out = work / "out"
    r: dict = {"benchmark": "npmerge cold start", "machine": bench.machine_info(work), "busy": args.busy,
               "repeat": args.repeat}
    try:
        bench.log("demo merge, empty kernel cache ...")
        r["demo_cold"] = measure(DEMO + ["-o", str(out), "--force"], None, args.repeat, args.busy, out)
        r["first_merge"] = {}
        for m in methods:
            bench.log(f"first {m} merge, empty kernel cache ...")
            r["first_merge"][m] = measure([m] + FIRST_MERGES[m] + ["-o", str(out), "--force"], None, args.repeat,
                                          args.busy, out)
        warm = ["warmup"] + [x for m in methods for x in ("--method", m)]
        bench.log("npmerge warmup, empty kernel cache ...")
        filled = work / "kernels"
        r["warmup_cold"] = measure(warm, None, args.repeat, args.busy, out)
        bench.run_measured(bench.NPMERGE + warm, dict(bench.os.environ, NUMBA_CACHE_DIR=str(filled)))
        r["warmup_cached"] = measure(warm, filled, args.repeat, args.busy, out)
        r["demo_cached"] = measure(DEMO + ["-o", str(out), "--force"], filled, args.repeat, args.busy, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    render(r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
        bench.log(f"wrote {args.json}")
    return 0


def render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Cold start (tiny fixtures; whole process; median of {r['repeat']}"
                    + (f"; {r['busy']} busy competitor(s)" if r["busy"] else "") + ")")
    for c in ("run", "kernel cache", "wall s", "CPU s", "kernels compiled"):
        t.add_column(c, justify="left" if c in ("run", "kernel cache") else "right")

    def row(what, x):
        t.add_row(what, "filled" if x["cached"] else "empty", f"{x['wall']:.2f}", f"{x['cpu']:.2f}",
                  str(len(x["compiled"])) if not x["cached"] else "0")
    row("README demo merge (ties)", r["demo_cold"])
    for m, x in r["first_merge"].items():
        row(f"first {m} merge", x)
    row("npmerge warmup (bf16, f16, f32)", r["warmup_cold"])
    row("npmerge warmup", r["warmup_cached"])
    row("README demo merge (ties)", r["demo_cached"])
    Console(width=120).print(t)


if __name__ == "__main__":
    sys.exit(main())

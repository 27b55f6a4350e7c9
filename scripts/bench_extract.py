#!/usr/bin/env python
"""LoRA extraction benchmark (issue 23): `npmerge extract-lora` of a bench set's fine-tune
against its base, and the time per module beside NumPy's own gesdd on the same Δ.

    python scripts/bench_extract.py --params 1B --rank 64
    python scripts/bench_extract.py --params 1B --rank 64 --include 'layers\\.0\\.'   # a subset

1. The data is scripts/bench.py's (`<cache>/<size>-<n>ft`, reused when complete, else a
   set with one fine-tune is generated): BF16, noise-like fine-tunes (τ ~ N(0, 1e-3²)),
   the hard case for a low-rank approximation (every singular value matters).
2. The whole extraction as one process, inputs read once before (page cache warm):
   wall, CPU, peak anonymous memory (polled) and peak RSS; the adapter's size; the
   report's overall kept energy and error.
3. Per distinct module shape (the first module of each): the extraction of that module
   alone, in this process on one thread (read Δ, SVD, rounding, error check, write), beside
   `np.linalg.svd(Δ, full_matrices=False)` (gesdd) on the same float64 Δ, also on one BLAS
   thread. mergekit (torch) is not installed here, so it is not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402

import bench  # noqa: E402  (scripts/bench.py: the data set, floors and process measurement)


def bench_set(cache: Path, size: str, seed: int) -> Path:
    """A complete bench set with at least one fine-tune (generated if there is none)."""
    for d in sorted(cache.glob(f"{size}-*ft")):
        n = int(d.name.split("-")[1][:-2])
        if n >= 1 and bench.marker_ok(d, size, n, seed):
            return d
    d = cache / f"{size}-1ft"
    bench.generate(d, size, 1, seed, max(1, min(4, os.cpu_count() or 1)))
    (d / bench.MARKER).write_text(json.dumps({"generator": bench.GENERATOR_VERSION, "params": size, "finetunes": 1,
                                              "seed": seed, "files": {str(p.relative_to(d)): p.stat().st_size
                                                                      for p in d.rglob("*.safetensors")}}))
    return d


def per_module(base: Path, ft: Path, rank: int, names: list[str], work: Path) -> list[dict]:
    """One module extracted alone (in process, one thread) beside gesdd on its Δ."""
    from npmerge import blas
    from npmerge.extract import Options, plan_extract
    from npmerge.extract_run import execute
    from npmerge.io.models import open_model, source

    rows = []
    for name in names:
        module = name[:-len(".weight")]
        out = work / "one"
        shutil.rmtree(out, ignore_errors=True)
        plan = plan_extract(str(base), str(ft), Options(rank=rank, include=(f"^{re.escape(module)}$",)), threads=1,
                            out=out)
        try:
            started = time.perf_counter()
            execute(plan, out)
            ours = time.perf_counter() - started
        finally:
            plan.close()
        b, f = open_model(str(base)), open_model(str(ft))
        shape = tuple(b.tensors[name].info.shape)
        x, y = np.empty(shape, np.float32), np.empty(shape, np.float32)
        source(b, name).read(0, x.size, x.reshape(-1))
        source(f, name).read(0, y.size, y.reshape(-1))
        delta = (y - x).astype(np.float64)
        b.close()
        f.close()
        with blas.one_thread():
            started = time.perf_counter()
            np.linalg.svd(delta, full_matrices=False)
            gesdd = time.perf_counter() - started
        rows.append({"module": module, "shape": list(shape), "extract": ours, "gesdd": gesdd})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="1B", choices=list(bench.SIZES))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--ft", type=int, default=1, help="which fine-tune of the set (default 1)")
    p.add_argument("--include", action="append", default=[], help="extract only these modules (regex, repeatable)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-memory", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-modules", action="store_true", help="skip the per-module comparison with gesdd")
    xdg = os.environ.get("XDG_CACHE_HOME")
    p.add_argument("--cache", type=Path, default=(Path(xdg) if xdg else Path.home() / ".cache") / "npmerge-bench")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    d = bench_set(args.cache, args.params, args.seed)
    base, ft = d / "base", d / f"ft-{args.ft}"
    runs = args.cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    out = runs / "extract-lora"
    shutil.rmtree(out, ignore_errors=True)
    cmd = bench.NPMERGE + ["extract-lora", str(base), str(ft), "--rank", str(args.rank), "-o", str(out), "-q",
                           "--json"]
    cmd += [a for r in args.include for a in ("--include", r)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--max-memory", args.max_memory] if args.max_memory else []
    inputs = [f for m in (base, ft) for f in sorted(m.glob("*.safetensors"))]
    buf = bytearray(bench.READ_BUFFER)
    bench.read_all(inputs, buf)
    run = bench.run_measured(cmd)
    report = json.loads(run.pop("stdout"))
    modules = report["modules"]
    result = {"params": args.params, "rank": args.rank, "include": args.include, "cpus": os.cpu_count(),
              "threads": args.threads or os.cpu_count(), "run": run, "modules": len(modules),
              "adapter_bytes": bench.dir_bytes(out), "energy": report["totals"]["energy"],
              "error": report["totals"]["error"],
              "worst_error_over_optimum": max(m["error"] / m["optimal_error"] for m in modules.values())}
    shutil.rmtree(out, ignore_errors=True)
    if not args.no_modules:
        first: dict[tuple, str] = {}
        for m in modules.values():
            first.setdefault(tuple(m["shape"]), m["tensor"])
        with tempfile.TemporaryDirectory(dir=runs) as work:
            result["per_module"] = per_module(base, ft, args.rank, list(first.values()), Path(work))

    print(f"extract-lora --rank {args.rank}: {args.params} ft-{args.ft} against its base, {len(modules)} modules "
          f"({result['cpus']} CPUs, {result['threads']} threads)")
    print(f"  wall {run['wall']:.1f} s  CPU {run['cpu']:.1f} s  peak anon {run['peak_anon'] / 2**20:.0f} MiB  "
          f"peak RSS {run['max_rss'] / 2**20:.0f} MiB  adapter {result['adapter_bytes'] / 1e6:.1f} MB")
    print(f"  energy kept {result['energy']:.4f}, relative error {result['error']:.4f}, worst module error / "
          f"optimum {result['worst_error_over_optimum']:.6f} (BF16 factors)")
    for r in result.get("per_module", []):
        print(f"  {r['module']:40s} {'x'.join(map(str, r['shape'])):>10s}  extract {r['extract']:6.2f} s  "
              f"gesdd {r['gesdd']:6.2f} s  ({r['extract'] / r['gesdd']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

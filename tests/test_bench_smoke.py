"""Smoke test of scripts/bench.py: it runs end to end on the tiny set and reports sane figures.

No timing assertions: only that every figure the benchmark is about exists and is positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_ties(tmp_path):
    out = tmp_path / "out" / "b.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--params", "tiny", "--repeat", "1",
           "--methods", "ties", "--busy", "1", "--cold", "--cache", str(tmp_path / "cache"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = json.loads(out.read_text())

    assert r["machine"]["nproc"] >= 1 and r["machine"]["mem_total"] > 0
    d = r["dataset"]
    assert d["input_bytes"] > 0 and d["output_bytes"] > 0
    assert 4e6 < d["parameters_per_model"] < 6e6
    # the set was generated with a completion marker, in the cache dir (not the repo)
    assert (tmp_path / "cache" / "tiny-3ft" / ".npmerge-bench-complete.json").is_file()
    assert not (tmp_path / "cache" / "runs").exists()  # merge outputs are removed

    fl = r["floor"]
    assert fl["read"]["bytes"] == d["input_bytes"]
    assert fl["write"]["bytes"] == d["output_bytes"]
    for key in ("read", "write", "memory"):
        assert fl[key]["seconds"] > 0 and fl[key]["gbps"] > 0
    assert fl["io_floor_seconds"] > 0

    for key in ("python", "help", "jit_warm"):  # the cold start is --cold-jit's (below)
        assert r["startup"][key]["wall"] > 0
    assert r["startup"]["jit_warm"]["jit_compiled"] is False

    # under load (--busy 1) each method also runs with one thread, for the ratio to it
    assert [(m["method"], m["threads"], m["busy"]) for m in r["merges"]] == [("ties", None, 1), ("ties", 1, 1)]
    assert r["config"]["cold"] is True
    ties = r["merges"][0]
    assert ties["ratios"]["wall_over_1thread"] > 0 and r["merges"][1]["ratios"]["wall_over_1thread"] == 1
    assert len(ties["runs"]) == 1
    assert ties["runs"][0]["output_bytes"] >= d["output_bytes"]
    for key in ("wall", "cpu", "max_rss", "peak_anon"):
        assert ties["median"][key] > 0, key
    for key in ("wall_over_io_floor", "input_gbps", "cpu_over_wall", "peak_anon_over_budget", "passes"):
        assert ties["ratios"][key] > 0, key
    assert ties["plan"]["memory_budget"] > 0
    assert "Floors" in proc.stdout and "Merges" in proc.stdout


def test_bench_cold_jit(tmp_path):
    """--cold-jit: the demo merge and a method's first merge from empty kernel caches, warmup
    cold and cached; every figure present and positive. (Cold by design: the one test that
    compiles kernels the session already compiled; passthrough has the fewest.)"""
    out = tmp_path / "cold.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--cold-jit", "--methods", "passthrough", "--repeat", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = json.loads(out.read_text())
    for key in ("demo_cold", "warmup_cold", "warmup_cached", "demo_cached"):
        assert r[key]["wall"] > 0 and r[key]["cpu"] > 0, key
    assert list(r["first_merge"]) == ["passthrough"] and r["first_merge"]["passthrough"]["wall"] > 0
    assert r["demo_cold"]["compiled"] and r["demo_cached"]["cached"] and not r["demo_cold"]["cached"]
    assert any(k.startswith("passthrough.scale") for k in r["first_merge"]["passthrough"]["compiled"])
    assert "Cold start" in proc.stdout


def test_bench_extract_tiny(tmp_path):
    """scripts/bench_extract.py end to end on the tiny set: the whole run and one module per shape."""
    out = tmp_path / "e.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_extract.py"), "--params", "tiny", "--rank", "4",
           "--include", r"layers\.0\.", "--cache", str(tmp_path / "cache"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = json.loads(out.read_text())
    assert r["modules"] == 7 and r["adapter_bytes"] > 0 and 0 < r["energy"] < 1
    assert 1 <= r["worst_error_over_optimum"] < 1 + 1e-3
    for key in ("wall", "cpu", "max_rss", "peak_anon"):
        assert r["run"][key] > 0, key
    assert {tuple(m["shape"]) for m in r["per_module"]} == {(256, 704), (704, 256), (128, 256), (256, 256)}
    assert all(m["extract"] > 0 and m["gesdd"] > 0 for m in r["per_module"])
    assert not list((tmp_path / "cache" / "runs").iterdir())  # outputs removed

"""Bounded memory as a functional test: merging a checkpoint whose largest tensor's
working set is ~16x the budget keeps the process's peak anonymous memory within the
budget (plus the fixed cost of Python, NumPy and Numba measured on a tiny merge)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import LLAMA

BIG = 16 * 2**20  # elements of the big tensor: its TIES working set is 16M x 24 B = 384 MiB
BUDGET = 24 * 2**20


def peak_anon(args) -> tuple[int, int]:
    """Run npmerge; return (exit code, peak RssAnon in bytes, polled every 2 ms)."""
    proc = subprocess.Popen([sys.executable, "-m", "npmerge", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0

    def poll():
        nonlocal peak
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.002)

    t = threading.Thread(target=poll)
    t.start()
    _, err = proc.communicate(timeout=600)
    t.join()
    assert proc.returncode == 0, err.decode()
    return proc.returncode, peak


def make_model(path, seed, base=None):
    rng = np.random.default_rng(seed)
    big = rng.standard_normal(BIG, dtype=np.float32) * 0.02
    small = rng.standard_normal((64, 64), dtype=np.float32) * 0.02
    if base is not None:
        big = base["big"].astype(np.float32).ravel() + rng.laplace(0, 1e-3, BIG).astype(np.float32)
        small = base["small"].astype(np.float32) + 1e-3
    tensors = {"big": big.reshape(4096, -1).astype(ml_dtypes.bfloat16), "small": small.astype(ml_dtypes.bfloat16)}
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def test_peak_anonymous_memory_follows_the_budget(tmp_path):
    base = make_model(tmp_path / "base", 0)
    make_model(tmp_path / "ft1", 1, base)
    make_model(tmp_path / "ft2", 2, base)
    del base
    common = ["--density", "0.3", "--max-memory", str(BUDGET), "--quiet"]
    _, tiny = peak_anon(["ties", LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", "-o", tmp_path / "tiny", *common])
    _, big = peak_anon(["ties", tmp_path / "base", tmp_path / "ft1", tmp_path / "ft2", "-o", tmp_path / "out", *common])
    working_set = BIG * (4 * 4 + 8)
    assert big - tiny <= BUDGET + 8 * 2**20, (big, tiny)
    assert big - tiny < working_set / 8  # far below what holding the tensor would need
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 2 * BIG


@pytest.mark.parametrize("method, extra", [("ties", {"density": 0.5}), ("della", {"density": 0.5, "epsilon": 0.1}),
                                           ("slerp", {"t": 0.3}), ("sce", {"select_topk": 0.5})])
def test_each_driver_is_built_once_and_holds_no_buffers_after_its_tensor(tmp_path, monkeypatch, method, extra):
    """The plan builds one driver per merged tensor (kept on its TensorJob), the budget and
    the engine use that one, and the engine drops its buffers once the tensor is merged:
    a finished merge holds no driver memory beyond small results."""
    from npmerge import api
    from npmerge.methods import registry
    from npmerge.recipe import Recipe

    built = []
    real, get = registry.get(method), registry.get
    counting = dataclasses.replace(real, driver=lambda ctx: built.append(ctx.name) or real.driver(ctx))
    monkeypatch.setattr(registry, "get", lambda name: counting if get(name) is real else get(name))
    models = [str(LLAMA / m) for m in ("base", "ft-a", "ft-b")]
    recipe = Recipe.from_cli(method, models[0], models[1:2] if method == "slerp" else models[1:], params=extra)
    plan = api.plan_merge(recipe, max_memory="64MiB", threads=2)
    merged = [j for j in plan.jobs if not j.copy]
    assert sorted(built) == sorted(j.name for j in merged)  # one each, at plan time
    api.execute(plan, tmp_path / "out")
    assert sorted(built) == sorted(j.name for j in merged)  # none more to run them
    for job in merged:
        assert held_bytes(job.driver) < 4096, (job.name, vars(job.driver))


def held_bytes(obj, depth: int = 4) -> int:
    """Bytes of the NumPy arrays an object holds: in its attributes, lists, tuples, dicts
    and the objects among them (a few levels deep)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if depth == 0 or isinstance(obj, (str, bytes, int, float, type(None))):
        return 0
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        items = [getattr(obj, f) for f in getattr(obj, "_fields", ())]
    return sum(held_bytes(v, depth - 1) for v in items)

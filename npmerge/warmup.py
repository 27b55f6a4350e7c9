"""Compile (and cache) every kernel once, on tiny inputs of the exact types the engine uses."""

from __future__ import annotations

import time

import numpy as np

from . import kernels
from .dtypes import DECODABLE, DTYPES, ENCODABLE, count_nonfinite, decode, encode


def compile_all() -> float:
    """Run every method on a tiny tensor through the engine's own code path, the
    stand-alone conversion kernels and the LoRA product: after this, a merge compiles nothing."""
    started = time.perf_counter()
    threads = kernels.set_threads(None)
    n = 8
    base = np.zeros(n, np.float32)
    for code in DECODABLE:
        raw = np.zeros(n, DTYPES[code].storage)
        raw.flags.writeable = False
        decode(raw, code, np.empty(n, np.float32))
        decode(raw, code, np.empty(n, np.float32), base)
    for code in ENCODABLE:
        raw = np.empty(n, DTYPES[code].storage)
        encode(base, code, raw)
        count_nonfinite(raw, code)
    from .engine import run_arrays
    from .methods import registry

    rng = np.random.default_rng(0)
    models = [rng.standard_normal(4 * n).astype(np.float32) for _ in range(3)]
    for method in registry.all_methods().values():
        count = min(2, method.max_models or 2)
        model_params = [{p.name: (0.5 if p.name == "density" or p.default is None else p.default)
                         for p in method.model_params if p.default is not None or not p.optional}] * count
        for variant in ({}, *method.warmup_variants):
            params = {**(method.warmup_params or {}), **variant}
            run_arrays(method.name, models[0] if method.base != "none" else None, models[1:1 + count], params,
                       model_params, threads=threads, shape=(4, n))
    # LoRA adapters' B @ A (io/lora_target.py passes C-contiguous float32 factors)
    kernels.load("lora").lowrank_rows(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32), 1.0, 1,
                                      np.empty(7, np.float32))
    return time.perf_counter() - started

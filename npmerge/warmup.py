"""Compile (and cache) every kernel once, on tiny inputs of the exact types the engine uses."""

from __future__ import annotations

import time

import numpy as np

from . import kernels
from .constants import BLOCK
from .dtypes import DECODABLE, DTYPES, ENCODABLE, count_nonfinite, decode, encode


def compile_all() -> float:
    started = time.perf_counter()
    kernels.set_threads(None)
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
    from .methods import registry
    from .methods.family import TensorMerge

    rows = np.ones((2, n), np.float32)
    for method in registry.all_methods().values():
        params = [{"weight": 1.0, "density": 0.5}] * 2
        tm = TensorMerge(method, {p.name: p.default for p in method.global_params}, params, n,
                         method.uses_base, kernels.set_threads(None))
        for p in tm.passes:
            tm.feed(p, rows, base if method.uses_base else np.empty(0, np.float32), np.empty(n, np.float32))
            tm.end_pass(p)
    sel = kernels.load("select")
    sel.block_stats(rows, BLOCK, np.empty((2, 1), np.float64), np.zeros(2, np.int64))
    # rows of ones never need the low-bits pass, so compile it explicitly
    hist = np.zeros((kernels.set_threads(None), 2, sel.LO_BUCKETS), np.int64)
    sel.hist_lo(rows.view(np.uint32), np.zeros(2, np.int64), hist)
    return time.perf_counter() - started

"""Compile (and cache) the kernels ahead of the first merge: `npmerge warmup`.

Kernels are compiled per storage dtype (kernels/span.py), so warming up means running
every method once on a tiny tensor of each dtype a merge will read, through the
engine's own code path: inputs of dtype X written as X (how checkpoints are merged),
and a base of dtype X with float32 task vectors (how LoRA adapters are merged). After
that a merge of those dtypes compiles nothing.
"""

from __future__ import annotations

import time

import numpy as np

from . import kernels
from .dtypes import DTYPES, ENCODABLE, count_nonfinite, decode, encode

DEFAULT_DTYPES = ("BF16", "F16", "F32")  # what checkpoints are stored in


def compile_kernels(dtypes=DEFAULT_DTYPES, methods=None, lora: bool = True) -> float:
    """Compile every kernel `methods` (names; None: all) use on inputs of `dtypes`
    (safetensors codes) and return the seconds it took."""
    from .arrays import run_arrays
    from .methods import registry

    started = time.perf_counter()
    threads = kernels.threads(None)
    chosen = registry.all_methods().values() if methods is None else [registry.get(m) for m in methods]
    n = 8
    for code in dict.fromkeys([*dtypes, "F32"]):  # the stand-alone conversions (computed sources, vocabularies)
        raw = np.zeros(n, DTYPES[code].storage)
        raw.flags.writeable = False
        decode(raw, code, np.empty(n, np.float32))
        decode(raw, code, np.empty(n, np.float32), np.zeros(n, np.float32))
        if code in ENCODABLE:
            raw = np.empty(n, DTYPES[code].storage)
            encode(np.zeros(n, np.float32), code, raw)
            count_nonfinite(raw, code)
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(4 * n).astype(np.float32) for _ in range(3)]
    for code in dtypes:
        for method in chosen:
            count = min(2, method.max_models or 2)
            model_params = [{p.name: (0.5 if p.name == "density" or p.default is None else p.default)
                             for p in method.model_params if p.default is not None or not p.optional}] * count
            has_base = method.base != "none"
            combos = [(code, code)] + ([(code, "F32")] if lora and has_base and code != "F32" else [])
            for base_dtype, model_dtype in combos:
                raw = [_stored(v, base_dtype if i == 0 else model_dtype) for i, v in enumerate(values)]
                for variant in ({}, *method.warmup_variants):
                    params = {**(method.warmup_params or {}), **variant}
                    run_arrays(method.name, raw[0] if has_base else None, raw[1:1 + count], params, model_params,
                               dtype=base_dtype, model_dtype=model_dtype, out_dtype=code, threads=threads,
                               shape=(4, n))
    if lora:  # LoRA adapters' B @ A (io/lora_target.py passes C-contiguous float32 factors)
        kernels.load("lora").lowrank_rows(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32), 1.0, 1,
                                          np.empty(7, np.float32), 0, 2)
    return time.perf_counter() - started


def _stored(values: np.ndarray, code: str) -> np.ndarray:
    """float32 values in the raw storage form of `code`."""
    raw = np.empty(values.size, DTYPES[code].storage)
    encode(values, code, raw)
    return raw

"""The reduction rule on the host side (docs/semantics.md §A.1): a block's 8 lanes combined,
and block sums added exactly. The kernels' side is kernels/span.py (`lanes8`, `sumsq`)
and kernels/reduce.py (`exact_rows`); tests/reference.py implements the rule apart."""

from __future__ import annotations

import math

import numpy as np


def combine_lanes(lanes: np.ndarray) -> np.ndarray:
    """((A0+A1)+(A2+A3))+((A4+A5)+(A6+A7)) over the last axis (8 float64 lanes)."""
    a = lanes
    return ((a[..., 0] + a[..., 1]) + (a[..., 2] + a[..., 3])) + ((a[..., 4] + a[..., 5]) + (a[..., 6] + a[..., 7]))


def exact_sum(values) -> float:
    """Block sums added exactly and rounded once (math.fsum); if any is not finite, the
    IEEE sum of the non-finite ones (math.fsum would raise on +Inf + -Inf)."""
    values = [float(v) for v in np.asarray(values, np.float64).ravel()]
    special = [v for v in values if not math.isfinite(v)]
    if special:
        total = 0.0
        for v in special:
            total += v
        return total
    return math.fsum(values)

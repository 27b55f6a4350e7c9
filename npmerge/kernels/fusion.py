"""Span kernels of Arcee Fusion (docs/semantics.md §C): the KL divergence between the
softmaxes of each row of the model and of the base, the importance |Δ|·KL of every
element (float64), the radix histograms that find its exact quartiles, and the masked
merge.

`row_kl` gives each row to one thread, which reads it whole (the driver's whole_rows)
and sums in float64 by the reduction rule relative to the row (§A.1: blocks, 8 lanes,
block sums added exactly), so results depend neither on threads nor on spans. The
other operations are ordinary span kernels over blocks, with the engine's first-pass
checks left to the engine (the row pass reads rows, not blocks).

Importance keys: a float64 importance x maps to a 64-bit key that orders like x (x < 0
only through rounding of a KL of nearly equal rows); the k-th smallest key is found one
16-bit digit at a time, from the top: four histogram passes, each counting the next digit
of the elements whose higher digits match the ones found so far (counts are integers, so
any thread or span count gives the same answer).
"""

import math
from collections import namedtuple

import numpy as np
from numba import njit

from .bits import HELPER, JIT, f64_bits
from .reduce import exact_rows
from .span import encode, lanes8, load_rows

HIST = 0
MERGE = 1

SOFTMAX_EPS = 1e-8  # added to both softmaxes before the KL, as mergekit

# One thread's buffers: a decoded row of the model and of the base (or a block of task
# vectors), the output block, both rows' exponentials (float64), block sums of one row and
# its exact total, 8 lanes.
Scratch = namedtuple("Scratch", "rows base o ex part total lanes")


def scratch(C: int, block: int) -> Scratch:
    cap = max(C, block)
    return Scratch(np.empty((1, cap), np.float32), np.empty(cap, np.float32), np.empty(block, np.float32),
                   np.empty((2, C), np.float64), np.empty((1, max(1, -(-C // block))), np.float64), np.empty(1, np.float64),
                   np.empty(8, np.float64))


@njit(**HELPER)
def _row_sum(ex, C, block, kl, za, zb, sc):
    """The reduction rule over one row of the terms ex[0] (kl False: a softmax's
    normaliser, ex[0] = exp(f64(x) - max x)) or p·log(p/q), p = ex[0]/za + eps,
    q = ex[1]/zb + eps."""
    part, lanes = sc.part, sc.lanes
    nb = (C + block - 1) // block
    for k in range(nb):
        for q in range(8):
            lanes[q] = 0.0
        s = k * block
        for e in range(min(block, C - s)):
            p = ex[0, s + e]
            if kl:
                p = p / za + SOFTMAX_EPS
                q = ex[1, s + e] / zb + SOFTMAX_EPS
                p = p * math.log(p / q)
            lanes[e & 7] += p
        part[0, k] = lanes8(lanes)
    exact_rows(part, sc.total)
    return sc.total[0]


@njit(**JIT)
def row_kl(inp, r0, r1, C, block, kl, sc):
    """kl[r] = sum over row r of p·log(p/q), p and q the softmaxes (float64, shifted by the
    row's maximum) of the model's and the base's row, each + 1e-8; rows r0..r1."""
    x, base, ex = sc.rows[0], sc.base, sc.ex
    for r in range(r0, r1):
        load_rows(inp, False, r * C, C, sc.rows, base)
        a, b = x[0], base[0]
        for e in range(1, C):
            a = x[e] if x[e] > a else a
            b = base[e] if base[e] > b else b
        a64, b64 = np.float64(a), np.float64(b)
        for e in range(C):
            ex[0, e] = math.exp(np.float64(base[e]) - b64)
        zb = _row_sum(ex, C, block, False, 1.0, 1.0, sc)
        for e in range(C):
            ex[1, e] = ex[0, e]
            ex[0, e] = math.exp(np.float64(x[e]) - a64)
        za = _row_sum(ex, C, block, False, 1.0, 1.0, sc)
        kl[r] = _row_sum(ex, C, block, True, za, zb, sc)


MIN64 = np.int64(-(2**63))


@njit(**HELPER)
def key64(x):
    """k(x): an int64 whose order is the float order of x (-0 just below +0)."""
    bits = f64_bits(x)
    return bits if bits >= 0 else (MIN64 - bits) - 1


@njit(**JIT)
def fusion(inp, out, op, lo, a, z, block, C, kl, level, prefixes, h, thr, kept, sc):
    """Elements a..z of the task vector d = M - B (float32) with importance
    x = f64(|d|)·kl[row] (float64), u = k(x) with its sign bit flipped (unsigned order):
    HIST   digit `level` of u (16 bits, from the top) counted in h[j] for the elements
           whose higher digits equal prefixes[j] (level 0: every element, in h[0])
    MERGE  o = B + d·fl32(x >= thr), kept[0] += #{x >= thr}; returns how many encoded
           values are Inf/NaN (h, kept: the thread's own)."""
    rows, base, o = sc.rows, sc.base, sc.o
    d = rows[0]
    shift = 48 - 16 * level
    above = (np.int64(1) << (16 * level)) - 1
    nbad = 0
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, True, s, n, rows, base)
        for e in range(n):
            x = np.float64(abs(d[e])) * kl[(s + e) // C]
            if op == MERGE:
                keep = x >= thr
                kept[0] += keep
                o[e] = base[e] + d[e] * np.float32(keep)
                continue
            u = key64(x) ^ MIN64
            digit = (u >> shift) & 0xFFFF
            if level == 0:
                h[0, digit] += 1
                continue
            prefix = (u >> (shift + 16)) & above
            for j in range(prefixes.shape[0]):
                if prefix == prefixes[j]:
                    h[j, digit] += 1
        if op == MERGE:
            nbad += encode(out, o, n, s - lo)
    return nbad

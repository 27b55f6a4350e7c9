"""Span kernels of the methods that merge each element on its own: NearSwap and RAM /
RAM+ (docs/semantics.md §C). Float32 throughout, one rounding per operation in the
written order (tests/reference.py `nearswap`, `ram`); the engine's first-pass checks run
inside them (span.check_block), so each input is decoded once per pass.

RAM+ needs per-tensor counts before it merges: op RAM_COUNT counts, per model, the
elements whose delta it alone keeps and those it shares (integers: any thread or span
count gives the same totals); RAM_MERGE merges (and counts the same, for the report).
"""

from collections import namedtuple

import numpy as np
from numba import njit

from .bits import JIT
from .span import check_block, encode, load_rows

RAM_COUNT = 0
RAM_MERGE = 1

# One thread's block buffers: decoded rows and base, the output, task vectors (NearSwap's
# checks), per element the number of models that keep their delta (RAM).
Scratch = namedtuple("Scratch", "rows base o delta kept")


def scratch(nm: int, block: int) -> Scratch:
    return Scratch(np.empty((nm, block), np.float32), np.empty(block, np.float32), np.empty(block, np.float32),
                   np.empty((1, block), np.float32), np.empty(block, np.int32))


@njit(**JIT)
def nearswap(inp, out, lo, a, z, block, t, check, sums, bad, sc):
    """o = w*M + (1 - w)*B with w = clamp(fl32(1 / max(|B - M|, fl32(1e-6))) * t, 0, 1)
    over elements a..z (t: float32; NaN propagates); return how many encoded values are
    Inf/NaN."""
    rows, base, o, delta = sc.rows, sc.base, sc.o, sc.delta
    one, zero, floor = np.float32(1.0), np.float32(0.0), np.float32(1e-6)
    nbad = 0
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, False, s, n, rows, base)
        x = rows[0]
        if check:  # the engine's checks see the task vector
            for e in range(n):
                delta[0, e] = x[e] - base[e]
            check_block(delta, base, n, True, sums, s // block, bad)
        for e in range(n):
            d = abs(base[e] - x[e])
            w = (one / (floor if d < floor else d)) * t
            w = zero if w < zero else (one if w > one else w)
            o[e] = w * x[e] + (one - w) * base[e]
        nbad += encode(out, o, n, s - lo)
    return nbad


@njit(**JIT)
def ram(inp, out, op, lo, a, z, block, eps, lam, counts, check, sums, bad, sc):
    """RAM over elements a..z of the task vectors tau_i = M_i - B: tau_i is kept where
    |tau_i| > eps; c = how many models keep theirs. counts[2i] += elements model i keeps
    alone (c == 1), counts[2i + 1] += those it keeps with others (the thread's own).
    RAM_MERGE: o = B + (((+0 + t_0) + t_1) + ...), t_i = tau_i * lam[i] where model i
    keeps alone, tau_i / fl32(c) where shared, +0 where not kept. Returns how many encoded
    values are Inf/NaN."""
    rows, base, o, kept = sc.rows, sc.base, sc.o, sc.kept
    nm = rows.shape[0]
    zero = np.float32(0.0)
    nbad = 0
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, True, s, n, rows, base)
        if check:
            check_block(rows, base, n, True, sums, s // block, bad)
        for e in range(n):
            kept[e] = 0
        for i in range(nm):
            x = rows[i]
            for e in range(n):
                kept[e] += abs(x[e]) > eps
        for i in range(nm):
            x = rows[i]
            alone = shared = 0
            for e in range(n):
                k = abs(x[e]) > eps
                alone += k and kept[e] == 1
                shared += k and kept[e] > 1
            counts[2 * i] += alone
            counts[2 * i + 1] += shared
        if op == RAM_COUNT:
            continue
        for e in range(n):
            o[e] = zero
        for i in range(nm):
            x, li = rows[i], lam[i]
            for e in range(n):
                c = kept[e]
                t = zero
                if abs(x[e]) > eps:
                    t = x[e] * li if c == 1 else x[e] / np.float32(c)
                o[e] += t
        for e in range(n):
            o[e] = base[e] + o[e]
        nbad += encode(out, o, n, s - lo)
    return nbad

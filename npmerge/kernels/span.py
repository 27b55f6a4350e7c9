"""Block plumbing shared by every span kernel: any input -> float32 rows of one block,
float32 results -> the output's storage, and the engine's first-pass checks (delta
norms, NaN/Inf counts).

A span kernel is a small serial `nogil` function over one *piece* of a span (a range of
whole blocks); the engine's workers (npmerge/workers.py) run the pieces of a span on
their threads. Inside a piece the kernel runs the whole pipeline block by block
(decode -> method math -> encode), so decoded float32 rows never leave the cache.

Inputs reach a kernel as one tuple `inp = (dec_base, dec_models, rnd, addrs, flags,
luts, has_base)`:

    dec_*   the address of the decoder of the base's and of the models' storage dtype
            (codecs.py); the models share one (the engine decodes models of mixed dtypes
            to float32 first)
    rnd     the address of the rounder of a recipe's `dtype:` (applied to model values)
    addrs   int64 addresses of element 0 of each input's storage (slot 0 the base, 1.. the
            models): a read-only memory map, or a float32 buffer a computed source filled,
            shifted so that element indices stay absolute. An int64 array gives one
            compiled signature for any number of models; kernels only read through it.
    flags   int64 per slot: DELTA when the source delivers task-vector values (a LoRA
            adapter) instead of model values
    luts    the address of the decode tables (dtypes.span_luts)

The output is `out = (encoder, addr)`: the address of the output dtype's encoder and of
the span's element `lo` in the output buffer. Conversions are C functions called through
their addresses (bits.call_*), so each kernel is compiled once whatever the dtypes.
"""

import numpy as np
from numba import njit

from ..dtypes import SPAN_DELTA as DELTA
from .bits import HELPER, JIT, address, call_int5, call_void, call_void3, f32_bits

EXP32 = 0x7F800000


# ------------------------------------------------------------------ rows of a block


@njit(**HELPER)
def _prepare(inp, deltas, n, rows, base):
    """Decoded values -> what kernels see: a recipe's `dtype:` rounds every model value
    (not a DELTA input's task vector); then model values become task vectors M - B
    (float32) when `deltas`, and a DELTA input becomes model values B + tau when not."""
    rnd, flags, luts, has_base = inp[2], inp[4], inp[5], inp[6]
    if has_base and (flags[0] & DELTA) == 0:
        call_void3(rnd, n, address(base), luts)
    for i in range(rows.shape[0]):
        if (flags[1 + i] & DELTA) == 0:
            call_void3(rnd, n, address(rows[i]), luts)
    if not has_base:
        return
    for i in range(rows.shape[0]):
        r = rows[i]
        is_delta = (flags[1 + i] & DELTA) != 0
        if deltas and not is_delta:
            for e in range(n):
                r[e] = r[e] - base[e]
        elif is_delta and not deltas:
            for e in range(n):
                r[e] = base[e] + r[e]


@njit(**HELPER)
def load_rows(inp, deltas, lo, n, rows, base):
    """One block of every input: base[:n] (if there is a base) and rows[i, :n] for each
    model, as task vectors M - B when `deltas`, else as model values."""
    dec_base, dec_models, addrs, luts = inp[0], inp[1], inp[3], inp[5]
    call_void(dec_base, addrs[0], 0, lo, n, address(base), luts)
    for i in range(rows.shape[0]):
        call_void(dec_models, addrs[1 + i], 0, lo, n, address(rows[i]), luts)
    _prepare(inp, deltas, n, rows, base)


@njit(**HELPER)
def gather_rows(inp, deltas, idx, n, rows, base):
    """load_rows() of the elements idx[:n] (scattered positions)."""
    dec_base, dec_models, addrs, luts = inp[0], inp[1], inp[3], inp[5]
    call_void(dec_base, addrs[0], address(idx), 0, n, address(base), luts)
    for i in range(rows.shape[0]):
        call_void(dec_models, addrs[1 + i], address(idx), 0, n, address(rows[i]), luts)
    _prepare(inp, deltas, n, rows, base)


@njit(**HELPER)
def load_one(inp, slot, lo, n, dst):
    """dst[:n] = elements lo..lo+n-1 of input `slot` alone (0 the base), rounded as
    load_rows rounds it."""
    call_void(inp[0] if slot == 0 else inp[1], inp[3][slot], 0, lo, n, address(dst), inp[5])
    if (inp[4][slot] & DELTA) == 0:
        call_void3(inp[2], n, address(dst), inp[5])


@njit(**HELPER)
def encode(out, vals, n, at):
    """Encode vals[:n] into the output at element `at` (relative to the span's first);
    return how many encoded values are Inf/NaN."""
    return call_int5(out[0], address(vals), n, out[1], 0, at)


@njit(**HELPER)
def scatter(out, vals, n, idx, lo):
    """encode() of vals[j] into element idx[j] - lo of the output, for j < n."""
    return call_int5(out[0], address(vals), n, out[1], address(idx), lo)


@njit(inline="always")
def thin_step(rem, q, m):
    """The rank rule's even thinning (docs/semantics.md §A.3) at the next element of a tie
    group: the j-th of m is kept iff r + q >= m, with r = j*q mod m the running remainder.
    Returns (kept, the next remainder)."""
    kept = rem + q >= m
    return kept, rem + q - (m if kept else 0)


# ------------------------------------------------------------------ checks and sums


@njit(**HELPER)
def count_nonfinite(x, n):
    """NaN/Inf among x[:n] (exponent bits all ones; an integer loop that vectorises)."""
    bad = 0
    for e in range(n):
        bad += (f32_bits(x[e]) & EXP32) == EXP32
    return bad


@njit(**HELPER)
def sumsq(x, n):
    """float64 sum of x[:n]**2 by the reduction rule (docs/semantics.md §A): element e goes to
    accumulator e mod 8 in increasing e, combined ((A0+A1)+(A2+A3))+((A4+A5)+(A6+A7)).
    Squares of float32 values are exact in float64. `x` starts a block (or a row)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    main = n - n % 8
    for e in range(0, main, 8):
        v0 = np.float64(x[e]); v1 = np.float64(x[e + 1]); v2 = np.float64(x[e + 2]); v3 = np.float64(x[e + 3])
        v4 = np.float64(x[e + 4]); v5 = np.float64(x[e + 5]); v6 = np.float64(x[e + 6]); v7 = np.float64(x[e + 7])
        a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3
        a4 += v4 * v4; a5 += v5 * v5; a6 += v6 * v6; a7 += v7 * v7
    tail = n - main  # the last elements continue lanes 0, 1, ...
    if tail > 0:
        a0 += np.float64(x[main]) * np.float64(x[main])
    if tail > 1:
        a1 += np.float64(x[main + 1]) * np.float64(x[main + 1])
    if tail > 2:
        a2 += np.float64(x[main + 2]) * np.float64(x[main + 2])
    if tail > 3:
        a3 += np.float64(x[main + 3]) * np.float64(x[main + 3])
    if tail > 4:
        a4 += np.float64(x[main + 4]) * np.float64(x[main + 4])
    if tail > 5:
        a5 += np.float64(x[main + 5]) * np.float64(x[main + 5])
    if tail > 6:
        a6 += np.float64(x[main + 6]) * np.float64(x[main + 6])
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(**HELPER)
def lanes8(lanes):
    """The reduction rule's combine of 8 float64 lanes: ((A0+A1)+(A2+A3))+((A4+A5)+(A6+A7))."""
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


@njit(**HELPER)
def check_block(rows, base, n, has_base, sums, gb, bad):
    """The engine's first-pass checks on one decoded block (block gb of the tensor):
    float64 sums of squares of the rows into sums[i, gb] (skipped if `sums` has no
    columns), NaN/Inf counts into bad[0] (base) and bad[1 + i]."""
    if has_base:
        bad[0] += count_nonfinite(base, n)
    for i in range(rows.shape[0]):
        bad[1 + i] += count_nonfinite(rows[i], n)
        if sums.shape[1] != 0:
            sums[i, gb] = sumsq(rows[i], n)


@njit(**JIT)
def check(inp, a, z, block, sums, bad, rows, base):
    """check_block over elements a..z (a on the block grid) for drivers whose kernels do
    not run it themselves: rows are task vectors when there is a base."""
    has_base = inp[6]
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        check_block(rows, base, n, has_base, sums, s // block, bad)

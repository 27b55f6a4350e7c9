"""Block plumbing shared by every span kernel: any input -> float32 rows of one block,
float32 results -> the output's storage, and the engine's first-pass checks (delta
norms, NaN/Inf counts).

A span kernel is a small serial `nogil` function over one *piece* of a span (a range of
whole blocks); the engine's workers (npmerge/workers.py) run the pieces of a span on
their threads. Inside a piece the kernel runs the whole pipeline block by block
(decode -> method math -> encode), so decoded float32 rows never leave the cache.

Inputs reach a kernel as one tuple `inp = (bk, mk, rnd, addrs, flags, luts)`:

    bk, mk  the storage kind of the base and of every model, as a *marker*: a value whose
            numba type selects the decoder when the kernel is compiled (dtypes.SPAN_KIND:
            np.uint16(0) is BF16, np.int16(0) F16, np.float32(0) F32, ...; bk None: no
            base). A kernel therefore compiles only the conversions its tensor needs, and
            each (kernel, dtypes) pair is compiled once and cached on disk.
    rnd     a recipe's `dtype:` rounding of model values: None, or the BF16/F16 marker
    addrs   int64 addresses of element 0 of each input's storage (slot 0 the base, 1.. the
            models): a read-only memory map, or a float32 buffer a computed source filled,
            shifted so that element indices stay absolute. An int64 array gives one
            compiled signature for any number of models; kernels only read through it.
    flags   int64 per slot: DELTA when the source delivers task-vector values (a LoRA
            adapter) instead of model values
    luts    float32 decode tables (dtypes.span_luts)

The output is `out = (ok, addr)`: the output kind marker and the address of the span's
element `lo` in the output buffer.
"""

import numpy as np
from numba import carray, njit, types
from numba.extending import overload

from ..dtypes import SPAN_DELTA as DELTA
from .bits import bits_f32, f32_bits
from .bits import voidptr as _voidptr
from .convert import bf16_bits, f16_bits

# Offsets of the decode tables in the one float32 `luts` array (dtypes.span_luts).
LUT_F16, LUT_E4M3, LUT_E5M2 = 0, 65536, 65536 + 256
EXP32 = 0x7F800000
JIT = dict(cache=True, nogil=True)
HELPER = dict(nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)


# ------------------------------------------------------------------ storage kinds

@njit(inline="always")
def _bf16(raw, luts):
    return bits_f32(np.uint32(raw) << 16)


@njit(inline="always")
def _f16(raw, luts):
    return luts[LUT_F16 + np.int64(raw)]


@njit(inline="always")
def _e4m3(raw, luts):
    return luts[LUT_E4M3 + np.int64(raw)]


@njit(inline="always")
def _e5m2(raw, luts):
    return luts[LUT_E5M2 + np.int64(raw)]


@njit(inline="always")
def _f32(raw, luts):
    return raw


@njit(inline="always")
def _f64(raw, luts):
    return np.float32(raw)  # round to nearest even


# marker type -> (storage dtype, bytes per element, raw -> float32)
_DECODERS = {
    types.uint16: (np.uint16, 2, _bf16), types.int16: (np.uint16, 2, _f16),
    types.uint8: (np.uint8, 1, _e4m3), types.int8: (np.uint8, 1, _e5m2),
    types.float32: (np.float32, 4, _f32), types.float64: (np.float64, 8, _f64),
}


def decode(kind, luts, addr, lo, n, dst):
    """dst[:n] = float32 values of elements lo .. lo+n-1 of one input (exact widening;
    F64 rounds to nearest even). kind None: nothing (no base)."""


def gather(kind, luts, addr, idx, n, dst):
    """dst[:n] = float32 values of the elements idx[:n] of one input."""


@overload(decode)
def _decode(kind, luts, addr, lo, n, dst):
    if isinstance(kind, types.NoneType):
        return lambda kind, luts, addr, lo, n, dst: None
    storage, size, value = _DECODERS[kind]

    def impl(kind, luts, addr, lo, n, dst):
        src = carray(_voidptr(addr + size * lo), (n,), storage)
        for e in range(n):
            dst[e] = value(src[e], luts)
    return impl


@overload(gather)
def _gather(kind, luts, addr, idx, n, dst):
    if isinstance(kind, types.NoneType):
        return lambda kind, luts, addr, idx, n, dst: None
    storage, size, value = _DECODERS[kind]

    def impl(kind, luts, addr, idx, n, dst):
        for j in range(n):
            dst[j] = value(carray(_voidptr(addr + size * idx[j]), (1,), storage)[0], luts)
    return impl


def round_to(rnd, luts, n, dst):
    """Round dst[:n] to BF16 or F16 values (a recipe's `dtype:`); rnd None: nothing."""


@overload(round_to)
def _round_to(rnd, luts, n, dst):
    if isinstance(rnd, types.NoneType):
        return lambda rnd, luts, n, dst: None
    if rnd == types.uint16:
        def bf16(rnd, luts, n, dst):
            for e in range(n):
                dst[e] = bits_f32(np.uint32(bf16_bits(dst[e])) << 16)
        return bf16

    def f16(rnd, luts, n, dst):
        for e in range(n):
            dst[e] = luts[LUT_F16 + f16_bits(dst[e])]
    return f16


# marker type -> (storage dtype, bytes per element, float32 -> storage, exponent mask of storage)
@njit(inline="always")
def _to_bf16(x):
    return np.uint16(bf16_bits(x))


@njit(inline="always")
def _to_f16(x):
    return np.uint16(f16_bits(x))


@njit(inline="always")
def _to_f32(x):
    return x


@njit(inline="always")
def _to_f64(x):
    return np.float64(x)


@njit(inline="always")
def _bad_bf16(h):
    return (h & 0x7F80) == 0x7F80


@njit(inline="always")
def _bad_f16(h):
    return (h & 0x7C00) == 0x7C00


@njit(inline="always")
def _bad_float(x):
    return not np.isfinite(x)


_ENCODERS = {
    types.uint16: (np.uint16, 2, _to_bf16, _bad_bf16), types.int16: (np.uint16, 2, _to_f16, _bad_f16),
    types.float32: (np.float32, 4, _to_f32, _bad_float), types.float64: (np.float64, 8, _to_f64, _bad_float),
}


def encode(kind, vals, n, addr, at):
    """Encode vals[:n] into the output at element `at` (BF16/F16 round to nearest even,
    F32 copy, F64 widen); return how many encoded values are Inf/NaN."""


def scatter(kind, vals, n, addr, idx, lo):
    """encode() of vals[j] into element idx[j] - lo of the output, for j < n."""


@overload(encode)
def _encode(kind, vals, n, addr, at):
    if isinstance(kind, types.NoneType):  # a pass without output
        return lambda kind, vals, n, addr, at: 0
    storage, size, to, bad = _ENCODERS[kind]

    def impl(kind, vals, n, addr, at):
        dst = carray(_voidptr(addr + size * at), (n,), storage)
        count = 0
        for e in range(n):
            h = to(vals[e])
            dst[e] = h
            count += bad(h)
        return count
    return impl


@overload(scatter)
def _scatter(kind, vals, n, addr, idx, lo):
    storage, size, to, bad = _ENCODERS[kind]

    def impl(kind, vals, n, addr, idx, lo):
        count = 0
        for j in range(n):
            h = to(vals[j])
            carray(_voidptr(addr + size * (idx[j] - lo)), (1,), storage)[0] = h
            count += bad(h)
        return count
    return impl


# ------------------------------------------------------------------ rows of a block


@njit(**HELPER)
def _prepare(inp, deltas, n, rows, base):
    """Decoded values -> what kernels see: a recipe's `dtype:` rounds every model value
    (not a DELTA input's task vector); then model values become task vectors M - B
    (float32) when `deltas`, and a DELTA input becomes model values B + tau when not."""
    bk, rnd, flags, luts = inp[0], inp[2], inp[4], inp[5]
    if rnd is not None:
        if bk is not None and (flags[0] & DELTA) == 0:
            round_to(rnd, luts, n, base)
        for i in range(rows.shape[0]):
            if (flags[1 + i] & DELTA) == 0:
                round_to(rnd, luts, n, rows[i])
    if bk is None:
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
    bk, mk, rnd, addrs, flags, luts = inp
    decode(bk, luts, addrs[0], lo, n, base)
    for i in range(rows.shape[0]):
        decode(mk, luts, addrs[1 + i], lo, n, rows[i])
    _prepare(inp, deltas, n, rows, base)


@njit(**HELPER)
def gather_rows(inp, deltas, idx, n, rows, base):
    """load_rows() of the elements idx[:n] (scattered positions)."""
    bk, mk, rnd, addrs, flags, luts = inp
    gather(bk, luts, addrs[0], idx, n, base)
    for i in range(rows.shape[0]):
        gather(mk, luts, addrs[1 + i], idx, n, rows[i])
    _prepare(inp, deltas, n, rows, base)


@njit(**HELPER)
def load_one(inp, slot, lo, n, dst):
    """dst[:n] = elements lo..lo+n-1 of input `slot` alone (0 the base), rounded as
    load_rows rounds it."""
    bk, mk, rnd, addrs, flags, luts = inp
    if slot == 0:
        decode(bk, luts, addrs[0], lo, n, dst)
    else:
        decode(mk, luts, addrs[slot], lo, n, dst)
    if rnd is not None and (flags[slot] & DELTA) == 0:
        round_to(rnd, luts, n, dst)


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
    """float64 sum of x[:n]**2 by the reduction rule (SEMANTICS-2 A): element e goes to
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
    has_base = inp[0] is not None
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        check_block(rows, base, n, has_base, sums, s // block, bad)


@njit(**HELPER)
def mulmod(a, b, m):
    """(a * b) % m for 0 <= a, b < m < 2**62 without overflow (double and add): the
    remainder of the rank rule's even thinning at a tie ordinal (SEMANTICS.md)."""
    r = 0
    a = a % m
    while b > 0:
        if b & 1:
            r += a
            if r >= m:
                r -= m
        a += a
        if a >= m:
            a -= m
        b >>= 1
    return r

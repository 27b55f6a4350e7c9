"""Block plumbing shared by the fused span kernels: any input -> float32 rows of one
block, a block of float32 results -> the output's storage, and the engine's first-pass
check (delta norms, NaN/Inf counts).

A span kernel covers a large range of one tensor (MiBs) in one parallel region; inside
it each thread takes cache-sized blocks and runs the whole pipeline on them (decode ->
method math -> encode), so decoded float32 rows never leave the cache and there is one
barrier per span instead of one per kernel per small chunk.

Inputs are passed as *addresses* plus a *mode* per input (slot 0 the base, 1.. the
models), not as arrays: numba types a tuple of arrays by its length and a typed List
costs a JIT compile in every process, while an int64 array of addresses gives one
compiled signature for any number of models and any mix of dtypes. An address points
at element 0 of the whole tensor's raw storage (a read-only memory map, kept alive by
the engine for the call), or at a float32 buffer a non-mapped source filled, shifted so
that element indices stay absolute. Kernels only ever read through input addresses.

mode = storage kind (low 3 bits) | DELTA when the source delivers task-vector values
(a LoRA adapter) instead of model values. `rnd` rounds every model-valued input to
BF16 or F16 first (a recipe's `dtype:`).
"""

import numba
import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..dtypes import SPAN_DELTA as DELTA
from ..dtypes import SPAN_KIND, SPAN_ROUND
from .convert import bf16_bits, f16_bits

BF16, F16, F32, F64 = SPAN_KIND["BF16"], SPAN_KIND["F16"], SPAN_KIND["F32"], SPAN_KIND["F64"]
E4M3 = SPAN_KIND["F8_E4M3"]
KIND = 7
# Offsets of the decode tables in the one float32 `luts` array (dtypes.span_luts).
LUT_F16, LUT_E4M3, LUT_E5M2 = 0, 65536, 65536 + 256
ROUND_NONE, ROUND_BF16 = SPAN_ROUND[None], SPAN_ROUND["BF16"]
EXP32 = 0x7F800000


@intrinsic
def _voidptr(typingctx, addr):
    """int64 address -> void* (for numba.carray)."""
    sig = types.voidptr(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@njit(cache=True, nogil=True)
def load(addr, mode, luts, rnd, lo, n, dst):
    """dst[:n] = float32 values of elements lo .. lo+n-1 of one input (exact widening;
    F64 rounds to nearest even), then rounded to BF16/F16 if `rnd` (model values only)."""
    kind = mode & KIND
    if kind == BF16:
        s16 = carray(_voidptr(addr + 2 * lo), (n,), np.uint16)
        for e in range(n):
            dst[e] = np.uint32(np.uint32(s16[e]) << 16).view(np.float32)
    elif kind == F32:
        s32 = carray(_voidptr(addr + 4 * lo), (n,), np.float32)
        for e in range(n):
            dst[e] = s32[e]
    elif kind == F16:
        h16 = carray(_voidptr(addr + 2 * lo), (n,), np.uint16)
        for e in range(n):
            dst[e] = luts[LUT_F16 + np.int64(h16[e])]
    elif kind == F64:
        s64 = carray(_voidptr(addr + 8 * lo), (n,), np.float64)
        for e in range(n):
            dst[e] = np.float32(s64[e])
    else:
        s8 = carray(_voidptr(addr + lo), (n,), np.uint8)
        off = LUT_E4M3 if kind == E4M3 else LUT_E5M2
        for e in range(n):
            dst[e] = luts[off + np.int64(s8[e])]
    if rnd != ROUND_NONE and (mode & DELTA) == 0:
        if rnd == ROUND_BF16:
            for e in range(n):
                dst[e] = np.uint32(np.uint32(bf16_bits(dst[e])) << 16).view(np.float32)
        else:
            for e in range(n):
                dst[e] = luts[LUT_F16 + f16_bits(dst[e])]


@njit(cache=True, nogil=True)
def load_rows(addrs, modes, luts, rnd, has_base, deltas, lo, n, rows, base):
    """One block of every input: base[:n] (if has_base) and rows[i, :n] for each model,
    as task vectors M - B (float32 subtraction) when `deltas`, else as model values
    (a DELTA input then becomes B + tau)."""
    nm = addrs.shape[0] - 1
    if has_base:
        load(addrs[0], modes[0], luts, rnd, lo, n, base)
    for i in range(nm):
        r = rows[i]
        load(addrs[1 + i], modes[1 + i], luts, rnd, lo, n, r)
        if has_base:
            is_delta = (modes[1 + i] & DELTA) != 0
            if deltas and not is_delta:
                for e in range(n):
                    r[e] = r[e] - base[e]
            elif is_delta and not deltas:
                for e in range(n):
                    r[e] = base[e] + r[e]


@njit(cache=True, nogil=True)
def store(vals, n, out_addr, out_mode, at):
    """Encode vals[:n] into the output buffer at element `at` (BF16/F16 round to nearest
    even, F32 copy, F64 widen); return how many encoded values are Inf/NaN."""
    bad = 0
    vbits = vals.view(np.uint32)
    if out_mode == BF16:
        o16 = carray(_voidptr(out_addr + 2 * at), (n,), np.uint16)
        for e in range(n):
            h = bf16_bits(vals[e])
            o16[e] = np.uint16(h)
            bad += (h & 0x7F80) == 0x7F80
    elif out_mode == F16:
        h16 = carray(_voidptr(out_addr + 2 * at), (n,), np.uint16)
        for e in range(n):
            h = f16_bits(vals[e])
            h16[e] = np.uint16(h)
            bad += (h & 0x7C00) == 0x7C00
    elif out_mode == F32:
        o32 = carray(_voidptr(out_addr + 4 * at), (n,), np.float32)
        for e in range(n):
            o32[e] = vals[e]
            bad += (vbits[e] & EXP32) == EXP32
    else:
        o64 = carray(_voidptr(out_addr + 8 * at), (n,), np.float64)
        for e in range(n):
            o64[e] = np.float64(vals[e])
            bad += (vbits[e] & EXP32) == EXP32
    return bad


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def count_nonfinite(x, n):
    """NaN/Inf among x[:n] (exponent bits all ones; an integer loop that vectorises)."""
    bits = x.view(np.uint32)
    bad = 0
    for e in range(n):
        bad += (bits[e] & EXP32) == EXP32
    return bad


@njit(cache=True, nogil=True)
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
    lanes = np.array([a0, a1, a2, a3, a4, a5, a6, a7])
    for e in range(main, n):
        v = np.float64(x[e])
        lanes[e - main] += v * v
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


@njit(cache=True, nogil=True)
def check_block(rows, base, n, has_base, sums, gb, bad):
    """The engine's first-pass checks on one decoded block (block gb of the tensor):
    float64 sums of squares of the rows into sums[i, gb] (skipped if `sums` has no
    columns), NaN/Inf counts into bad[0] (base) and bad[1 + i]."""
    if has_base:
        bad[0] = count_nonfinite(base, n)
    for i in range(rows.shape[0]):
        bad[1 + i] = count_nonfinite(rows[i], n)
        if sums.shape[1] != 0:
            sums[i, gb] = sumsq(rows[i], n)


@njit(cache=True, nogil=True)
def block_scratch(nt, nm, block):
    """Decode buffers (rows, base) for each of nt threads of a parallel region, allocated
    once per call and taken with numba.get_thread_id(). Blocks that allocated their own
    made a region slower with two threads than with one (TIES's tie count: 4.3 vs 1.9 ns
    per element on the 1B set's tensors). Callers pass nt: numba.get_num_threads() in a
    kernel would make it uncacheable."""
    return np.empty((nt, nm, block), np.float32), np.empty((nt, block), np.float32)


@njit(parallel=True, cache=True, nogil=True)
def check(addrs, modes, luts, rnd, has_base, lo, hi, block, sums, bad, threads):
    """check_block over elements lo..hi (lo a multiple of `block`) for drivers whose
    kernels do not run it themselves: rows are task vectors when there is a base."""
    nm = addrs.shape[0] - 1
    nb = (hi - lo + block - 1) // block
    rows_t, base_t = block_scratch(threads, nm, block)
    for b in prange(nb):
        s = lo + b * block
        n = min(block, hi - s)
        t = numba.get_thread_id()
        load_rows(addrs, modes, luts, rnd, has_base, has_base, s, n, rows_t[t], base_t[t])
        check_block(rows_t[t], base_t[t], n, has_base, sums, lo // block + b, bad[b])

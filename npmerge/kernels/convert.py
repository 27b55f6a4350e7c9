"""Numba kernels: raw storage chunks <-> float32 work arrays.

Import this module only through `npmerge.kernels.load("convert")` (which picks a
writable JIT cache directory first); the drivers are `npmerge.dtypes.decode` and
`npmerge.dtypes.encode`, which validate and normalise arguments before calling here.

Conventions, so that numba compiles exactly one signature per kernel and storage
dtype and every signature is cached on disk:

* all arrays are flat, 1-D, C-contiguous;
* inputs (`src`, `base`, `lut`) are read-only arrays, outputs writable;
* work arrays and lookup tables are always float32; raw storage is uint16 (BF16,
  F16), uint8 (FP8), float32 or float64;
* "no base" is an empty float32 array: `dst[i] = f32(src[i]) - base[i]` when
  `base.size != 0`, else `dst[i] = f32(src[i])`, in float32 arithmetic.

Kernels never raise on user data (NaN/Inf/overflow are encoded, not rejected) and
never touch Python objects, so they run with the GIL released. No fastmath: the
results must be bit-exact (round-to-nearest-even, NaN/Inf and subnormals kept).

Inputs may be memory-mapped views at offsets that are not a multiple of the element
size. Numba types every array as aligned, so the loads are declared with the
element's natural alignment; that is fine on x86-64 and AArch64 (LLVM's vector loads
for these loops are unaligned loads anyway) and the driver copies misaligned input
to an aligned buffer on other architectures.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .bits import JIT, bits_f32, f32_bits


# --------------------------------------------------------------------- decode


@njit(**JIT)
def decode_bf16(src, base, dst):
    """uint16 BF16 bit patterns -> float32 (exact: the pattern is the float32's top half)."""
    n = dst.shape[0]
    if base.shape[0] != 0:
        for i in range(n):
            dst[i] = bits_f32(np.uint32(src[i]) << 16) - base[i]
    else:
        for i in range(n):
            dst[i] = bits_f32(np.uint32(src[i]) << 16)


@njit(**JIT)
def decode_lut(src, lut, base, dst):
    """uint16 / uint8 bit patterns -> float32 through a float32 table (F16, FP8)."""
    n = dst.shape[0]
    if base.shape[0] != 0:
        for i in range(n):
            dst[i] = lut[src[i]] - base[i]
    else:
        for i in range(n):
            dst[i] = lut[src[i]]


@njit(**JIT)
def decode_f32(src, base, dst):
    """float32 -> float32 (copy, or difference with base)."""
    n = dst.shape[0]
    if base.shape[0] != 0:
        for i in range(n):
            dst[i] = src[i] - base[i]
    else:
        for i in range(n):
            dst[i] = src[i]


@njit(**JIT)
def decode_f64(src, base, dst):
    """float64 -> float32, rounded to nearest even (as NumPy's astype), then - base."""
    n = dst.shape[0]
    if base.shape[0] != 0:
        for i in range(n):
            dst[i] = np.float32(src[i]) - base[i]
    else:
        for i in range(n):
            dst[i] = np.float32(src[i])


# --------------------------------------------------------------------- encode


@njit(**JIT)
def bf16_bits(x):
    """float32 -> BF16 bit pattern (as int64), round-to-nearest-even on the bit pattern.

    Overflow rounds to +-Inf, Inf stays Inf, subnormals round like normals (no
    flush). Every NaN becomes sign | 0x7FC0, the quiet NaN ml_dtypes produces.
    """
    u = np.int64(f32_bits(np.float32(x)))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u >> 16) & 0x8000) | 0x7FC0
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@njit(**JIT)
def f16_bits(x):
    """float32 -> IEEE binary16 bit pattern (as int64), round-to-nearest-even incl. subnormals.

    Bit-identical to NumPy's float32 -> float16 cast (checked on all 2**32 inputs):
    |x| >= 65520 -> +-Inf, ties to even at every exponent, |x| <= 2**-25 -> +-0. A NaN
    keeps its sign and the top ten bits of its payload (sign | 0x7C00 | payload >> 13),
    with 0x7C01 when those bits are all zero so that it stays a NaN (NumPy's
    npy_floatbits_to_halfbits; a signalling NaN stays signalling).

    Branch-free so that LLVM vectorises the loops that call it. Half subnormals
    (|x| < 2**-14) use one float32 addition: |x| + 0.5 rounds |x| to a multiple of
    2**-24 (RNE, exact for the sum's exponent), whose low bits are then the half's
    bits. The sum is never subnormal, so even a process running with FTZ/DAZ set gets
    the same result.
    """
    u = np.int64(f32_bits(np.float32(x)))
    a = u & 0x7FFFFFFF
    ax = bits_f32(np.uint32(a))
    # |x| < 2**-14: subnormal half or zero
    sub = np.int64(f32_bits(np.float32(ax + np.float32(0.5)))) - 0x3F000000
    # normal half: rebias the exponent (127 -> 15) and round on the bit pattern;
    # a carry out of the mantissa bumps the exponent (65520 -> Inf)
    nrm = (a - 0x37FFF001 + ((a >> 13) & 1)) >> 13
    payload = (a >> 13) & 0x3FF
    nan = 0x7C00 | payload | (1 if payload == 0 else 0)
    h = sub if a < 0x38800000 else nrm
    h = 0x7C00 if a >= 0x47800000 else h  # |x| >= 2**16 and Inf
    h = nan if a > 0x7F800000 else h
    return ((u >> 16) & 0x8000) | h


@njit(**JIT)
def encode_bf16(src, dst):
    """float32 -> BF16 bit patterns (bf16_bits)."""
    n = dst.shape[0]
    for i in range(n):
        dst[i] = np.uint16(bf16_bits(src[i]))


@njit(**JIT)
def encode_f16(src, dst):
    """float32 -> binary16 bit patterns (f16_bits)."""
    n = dst.shape[0]
    for i in range(n):
        dst[i] = np.uint16(f16_bits(src[i]))


@njit(**JIT)
def encode_f32(src, dst):
    """float32 -> float32 (copy)."""
    n = dst.shape[0]
    for i in range(n):
        dst[i] = src[i]


@njit(**JIT)
def encode_f64(src, dst):
    """float32 -> float64 (exact widening)."""
    n = dst.shape[0]
    for i in range(n):
        dst[i] = np.float64(src[i])


# --------------------------------------------------------------------- checks


@njit(**JIT)
def count_all_ones(bits, mask):
    """How many of `bits` have every bit of `mask` set: with an exponent mask, the
    encoded values that are Inf or NaN (e.g. a finite float32 that overflowed F16)."""
    total = 0
    for i in range(bits.shape[0]):
        total += (bits[i] & mask) == mask
    return total

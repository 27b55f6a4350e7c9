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
from numba import njit, prange

_JIT = dict(parallel=True, cache=True, nogil=True)


# --------------------------------------------------------------------- decode


@njit(**_JIT)
def decode_bf16(src, base, dst):
    """uint16 BF16 bit patterns -> float32 (exact: the pattern is the float32's top half)."""
    n = dst.shape[0]
    if base.shape[0] != 0:
        for i in prange(n):
            dst[i] = np.uint32(np.uint32(src[i]) << 16).view(np.float32) - base[i]
    else:
        for i in prange(n):
            dst[i] = np.uint32(np.uint32(src[i]) << 16).view(np.float32)


@njit(**_JIT)
def decode_lut(src, lut, base, dst):
    """uint16 / uint8 bit patterns -> float32 through a float32 table (F16, FP8)."""
    n = dst.shape[0]
    if base.shape[0] != 0:
        for i in prange(n):
            dst[i] = lut[src[i]] - base[i]
    else:
        for i in prange(n):
            dst[i] = lut[src[i]]


@njit(**_JIT)
def decode_f32(src, base, dst):
    """float32 -> float32 (copy, or difference with base)."""
    n = dst.shape[0]
    if base.shape[0] != 0:
        for i in prange(n):
            dst[i] = src[i] - base[i]
    else:
        for i in prange(n):
            dst[i] = src[i]


@njit(**_JIT)
def decode_f64(src, base, dst):
    """float64 -> float32, rounded to nearest even (as NumPy's astype), then - base."""
    n = dst.shape[0]
    if base.shape[0] != 0:
        for i in prange(n):
            dst[i] = np.float32(src[i]) - base[i]
    else:
        for i in prange(n):
            dst[i] = np.float32(src[i])


# --------------------------------------------------------------------- encode


@njit(**_JIT)
def encode_bf16(src, dst):
    """float32 -> BF16 bit patterns, round-to-nearest-even on the bit pattern.

    Overflow rounds to +-Inf, Inf stays Inf, subnormals round like normals (no
    flush). Every NaN becomes sign | 0x7FC0, the quiet NaN ml_dtypes produces.
    """
    n = dst.shape[0]
    for i in prange(n):
        u = np.int64(np.float32(src[i]).view(np.uint32))
        if (u & 0x7FFFFFFF) > 0x7F800000:
            h = ((u >> 16) & 0x8000) | 0x7FC0
        else:
            h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        dst[i] = np.uint16(h)


@njit(**_JIT)
def encode_f16(src, dst):
    """float32 -> IEEE binary16 bit patterns, round-to-nearest-even incl. subnormals.

    Bit-identical to NumPy's float32 -> float16 cast: |x| >= 65520 -> +-Inf, ties to
    even at every exponent, |x| <= 2**-25 -> +-0. A NaN keeps its sign and the top
    ten bits of its payload (sign | 0x7C00 | payload >> 13), with 0x7C01 when those
    bits are all zero so that it stays a NaN (NumPy's npy_floatbits_to_halfbits).
    """
    n = dst.shape[0]
    for i in prange(n):
        u = np.int64(np.float32(src[i]).view(np.uint32))
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        if a > 0x7F800000:  # NaN
            m = (a >> 13) & 0x3FF
            h = 0x7C00 | m
            if m == 0:
                h = 0x7C01
        elif a >= 0x477FF000:  # >= 65520 (halfway to 2**16, ties to even: Inf), Inf
            h = 0x7C00
        elif a >= 0x38800000:  # normal half: rebias the exponent 127 -> 15, round
            b = a - 0x38000000
            h = (b + 0xFFF + ((b >> 13) & 1)) >> 13
        elif a > 0x33000000:  # (2**-25, 2**-14): subnormal half, units of 2**-24
            shift = 126 - (a >> 23)  # 14 .. 24
            m = (a & 0x7FFFFF) | 0x800000
            h = (m + ((1 << (shift - 1)) - 1) + ((m >> shift) & 1)) >> shift
        else:  # <= 2**-25 (2**-25 itself ties to even: zero)
            h = 0
        dst[i] = np.uint16(sign | h)


@njit(**_JIT)
def encode_f32(src, dst):
    """float32 -> float32 (copy)."""
    n = dst.shape[0]
    for i in prange(n):
        dst[i] = src[i]


@njit(**_JIT)
def encode_f64(src, dst):
    """float32 -> float64 (exact widening)."""
    n = dst.shape[0]
    for i in prange(n):
        dst[i] = np.float64(src[i])

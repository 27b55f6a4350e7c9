"""Storage <-> float32 conversions that span kernels call through function pointers.

Each storage dtype has a decoder, each output dtype an encoder, each `dtype:` rounding a
rounder: small C-callable functions (numba cfuncs), compiled and cached the first time a
merge reads or writes that dtype. A span kernel takes their addresses (plain int64s) and
calls them through bits.call_*, so every kernel is compiled once for all dtypes; a run
compiles the conversions of its own dtypes only. The indirect call costs nothing next to
the block of thousands of elements it converts.

Every argument is an int64 (addresses and counts):

    decoder(src, idx, lo, n, dst, luts)   dst[j] = f32 of element lo + j (idx 0), or of
                                          element idx[j] (idx: address of int64 indices)
    encoder(vals, n, out, idx, at)        element at + j (idx 0), or idx[j] - at, of the
                                          output = vals[j] rounded once; returns how many
                                          encoded values are Inf/NaN
    rounder(n, vals, luts)                vals[j] rounded to BF16 or F16 values

`luts` is the address of dtypes.span_luts() (decode tables of F16 and the FP8 formats).
Decoding is exact (F64 rounds to nearest even); BF16 and F16 encode round to nearest
even (convert.bf16_bits, convert.f16_bits); F64 widens exactly.
"""

import numpy as np
from numba import carray, cfunc, njit, types

from .bits import CACHE, bits_f32, voidptr
from .convert import bf16_bits, f16_bits

I64 = types.int64
DECODER = types.void(I64, I64, I64, I64, I64, I64)
ENCODER = types.int64(I64, I64, I64, I64, I64)
ROUNDER = types.void(I64, I64, I64)

LUT_F16, LUT_E4M3, LUT_E5M2 = 0, 65536, 65536 + 256
_LUTS = 65536 + 512
_ANY = 1 << 62  # the length of a view whose element indices come from the caller (no bounds checks)


# ------------------------------------------------------------------ decoders


@njit(inline="always")
def _decode(src, run, idx, n, dst, luts, value):
    """src: the input from element 0 (for idx), run: its elements lo.. (exact length:
    indexing a view from 0 lets LLVM vectorise the loop)."""
    d = carray(voidptr(dst), (n,), np.float32)
    lut = carray(voidptr(luts), (_LUTS,), np.float32)
    if idx != 0:
        ix = carray(voidptr(idx), (n,), np.int64)
        for j in range(n):
            d[j] = value(src[ix[j]], lut)
    else:
        for j in range(n):
            d[j] = value(run[j], lut)


@njit(inline="always")
def _bf16(raw, lut):
    return bits_f32(np.uint32(raw) << 16)


@njit(inline="always")
def _f16(raw, lut):
    return lut[LUT_F16 + np.int64(raw)]


@njit(inline="always")
def _e4m3(raw, lut):
    return lut[LUT_E4M3 + np.int64(raw)]


@njit(inline="always")
def _e5m2(raw, lut):
    return lut[LUT_E5M2 + np.int64(raw)]


@njit(inline="always")
def _same(raw, lut):
    return raw


@njit(inline="always")
def _narrow(raw, lut):
    return np.float32(raw)


def decode_bf16(src, idx, lo, n, dst, luts):
    _decode(carray(voidptr(src), (_ANY,), np.uint16), carray(voidptr(src + 2 * lo), (n,), np.uint16), idx, n, dst, luts,
            _bf16)


def decode_f16(src, idx, lo, n, dst, luts):
    _decode(carray(voidptr(src), (_ANY,), np.uint16), carray(voidptr(src + 2 * lo), (n,), np.uint16), idx, n, dst, luts,
            _f16)


def decode_f8_e4m3(src, idx, lo, n, dst, luts):
    _decode(carray(voidptr(src), (_ANY,), np.uint8), carray(voidptr(src + 1 * lo), (n,), np.uint8), idx, n, dst, luts,
            _e4m3)


def decode_f8_e5m2(src, idx, lo, n, dst, luts):
    _decode(carray(voidptr(src), (_ANY,), np.uint8), carray(voidptr(src + 1 * lo), (n,), np.uint8), idx, n, dst, luts,
            _e5m2)


def decode_f32(src, idx, lo, n, dst, luts):
    _decode(carray(voidptr(src), (_ANY,), np.float32), carray(voidptr(src + 4 * lo), (n,), np.float32), idx, n, dst, luts,
            _same)


def decode_f64(src, idx, lo, n, dst, luts):
    _decode(carray(voidptr(src), (_ANY,), np.float64), carray(voidptr(src + 8 * lo), (n,), np.float64), idx, n, dst, luts,
            _narrow)


def decode_none(src, idx, lo, n, dst, luts):
    """No input (a merge without a base)."""


# ------------------------------------------------------------------ encoders


@njit(inline="always")
def _encode(vals, n, out, run, idx, at, to, bad):
    """out: the output from element 0 (for idx), run: its elements at.. (exact length)."""
    v = carray(voidptr(vals), (n,), np.float32)
    count = 0
    if idx != 0:
        ix = carray(voidptr(idx), (n,), np.int64)
        for j in range(n):
            h = to(v[j])
            out[ix[j] - at] = h
            count += bad(h)
    else:
        for j in range(n):
            h = to(v[j])
            run[j] = h
            count += bad(h)
    return count


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


def encode_bf16(vals, n, out, idx, at):
    return _encode(vals, n, carray(voidptr(out), (_ANY,), np.uint16), carray(voidptr(out + 2 * at), (n,), np.uint16), idx,
                   at, _to_bf16, _bad_bf16)


def encode_f16(vals, n, out, idx, at):
    return _encode(vals, n, carray(voidptr(out), (_ANY,), np.uint16), carray(voidptr(out + 2 * at), (n,), np.uint16), idx,
                   at, _to_f16, _bad_f16)


def encode_f32(vals, n, out, idx, at):
    return _encode(vals, n, carray(voidptr(out), (_ANY,), np.float32), carray(voidptr(out + 4 * at), (n,), np.float32), idx,
                   at, _to_f32, _bad_float)


def encode_f64(vals, n, out, idx, at):
    return _encode(vals, n, carray(voidptr(out), (_ANY,), np.float64), carray(voidptr(out + 8 * at), (n,), np.float64), idx,
                   at, _to_f64, _bad_float)


def encode_none(vals, n, out, idx, at):
    """No output (a pass that only reads)."""
    return 0


# ------------------------------------------------------------------ rounders


def round_bf16(n, vals, luts):
    v = carray(voidptr(vals), (n,), np.float32)
    for j in range(n):
        v[j] = bits_f32(np.uint32(bf16_bits(v[j])) << 16)


def round_f16(n, vals, luts):
    v = carray(voidptr(vals), (n,), np.float32)
    lut = carray(voidptr(luts), (_LUTS,), np.float32)
    for j in range(n):
        v[j] = lut[LUT_F16 + f16_bits(v[j])]


def round_none(n, vals, luts):
    """No rounding."""


_FUNCTIONS = {
    DECODER: {"BF16": decode_bf16, "F16": decode_f16, "F8_E4M3": decode_f8_e4m3, "F8_E5M2": decode_f8_e5m2,
              "F32": decode_f32, "F64": decode_f64, None: decode_none},
    ENCODER: {"BF16": encode_bf16, "F16": encode_f16, "F32": encode_f32, "F64": encode_f64, None: encode_none},
    ROUNDER: {"BF16": round_bf16, "F16": round_f16, None: round_none},
}
_compiled: dict = {}


def _get(sig, code):
    key = (sig, code)
    if key not in _compiled:
        _compiled[key] = cfunc(sig, cache=CACHE, nopython=True)(_FUNCTIONS[sig][code])
    return _compiled[key]


def decoder(code: str | None) -> int:
    """The address of the decoder of a storage dtype (None: of no input)."""
    return _get(DECODER, code).address


def encoder(code: str | None) -> int:
    """The address of the encoder of an output dtype (None: no output)."""
    return _get(ENCODER, code).address


def rounder(code: str | None) -> int:
    """The address of the rounder of a recipe's `dtype:` (None or F32: none)."""
    return _get(ROUNDER, None if code == "F32" else code).address

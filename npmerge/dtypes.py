"""The dtype table: safetensors code <-> raw storage NumPy dtype <-> size, and the
drivers that turn raw chunks into float32 work arrays and back.

Raw views never use ml_dtypes: BF16 and F16 are read as uint16 bit patterns, FP8 as
uint8, and decoded inside Numba kernels (kernels/convert.py). The table order is the
official library's enum order, which its writer sorts by (descending) so that our
headers are byte-identical to `safetensors.numpy.save_file`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # safetensors code, e.g. "BF16"
    bits: int  # bits per element (F4 and F6 are packed below a byte)
    storage: np.dtype | None  # NumPy dtype of the raw view; None when not mappable
    kind: str  # "float", "int", "uint", "bool", "complex"
    order: int  # position in the official enum; the writer sorts by it, descending

    @property
    def itemsize(self) -> int:
        return self.bits // 8

    @property
    def is_float(self) -> bool:
        return self.kind == "float"


_TABLE = [
    # name, bits, storage, kind
    ("BOOL", 8, np.uint8, "bool"),
    ("F4", 4, None, "float"),
    ("F6_E2M3", 6, None, "float"),
    ("F6_E3M2", 6, None, "float"),
    ("U8", 8, np.uint8, "uint"),
    ("I8", 8, np.int8, "int"),
    ("F8_E5M2", 8, np.uint8, "float"),
    ("F8_E4M3", 8, np.uint8, "float"),
    ("F8_E8M0", 8, np.uint8, "float"),
    ("F8_E4M3FNUZ", 8, np.uint8, "float"),
    ("F8_E5M2FNUZ", 8, np.uint8, "float"),
    ("I16", 16, np.int16, "int"),
    ("U16", 16, np.uint16, "uint"),
    ("F16", 16, np.uint16, "float"),
    ("BF16", 16, np.uint16, "float"),
    ("I32", 32, np.int32, "int"),
    ("U32", 32, np.uint32, "uint"),
    ("F32", 32, np.float32, "float"),
    ("C64", 64, np.complex64, "complex"),
    ("F64", 64, np.float64, "float"),
    ("I64", 64, np.int64, "int"),
    ("U64", 64, np.uint64, "uint"),
]

DTYPES: dict[str, DType] = {
    name: DType(name, bits, np.dtype(storage).newbyteorder("<") if storage else None, kind, i)
    for i, (name, bits, storage, kind) in enumerate(_TABLE)
}

# Float dtypes npmerge can decode to float32 and merge.
DECODABLE = ("F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64")
# Float dtypes npmerge can write as merge output.
ENCODABLE = ("F16", "BF16", "F32", "F64")

# User-facing spellings accepted by --out-dtype / recipe `out_dtype`.
ALIASES = {
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "f32": "F32", "float": "F32",
    "float64": "F64", "fp64": "F64", "f64": "F64",
}

SPAN_DELTA = 8  # span kernels' input flag: the source delivers task-vector values (kernels/span.py)
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}

# config.json's torch_dtype / dtype spelling of each output dtype.
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def lookup(name: str) -> DType:
    """The DType for a safetensors code (exact, case-sensitive, as the format)."""
    return DTYPES[name]


def parse_user_dtype(text: str) -> str:
    """Map a user's dtype spelling (bfloat16, bf16, BF16, …) to an encodable code."""
    code = ALIASES.get(text.strip().lower(), text.strip().upper())
    if code not in ENCODABLE:
        from .errors import RecipeError

        raise RecipeError(
            f"unsupported output dtype '{text}'",
            hint="choose one of: bfloat16, float16, float32, float64",
        )
    return code


# ---------------------------------------------------------------------------
# Drivers: raw storage chunks <-> float32 work arrays.
#
# The Numba kernels live in kernels/convert.py and are imported on first use only.
# Arguments are normalised here so that numba sees one signature per kernel and
# storage dtype: plain (non-subclass) 1-D C-contiguous arrays, inputs read-only,
# outputs writable, work arrays and lookup tables float32, "no base" = an empty
# read-only float32 array.

_convert = None  # the kernels module, once loaded
_LUTS: dict[str, np.ndarray] = {}  # read-only float32 decode tables, built on first use
_NO_BASE: np.ndarray | None = None  # the shared empty read-only float32 "no base"

# Aliases for raw bit-pattern dtypes: a float16 / ml_dtypes view of the same bytes is
# accepted and reinterpreted as the storage dtype (never converted).
_BIT_ALIASES = {
    "F16": ("float16", "int16"),
    "BF16": ("bfloat16", "int16"),
    "F8_E4M3": ("float8_e4m3fn", "int8"),
    "F8_E5M2": ("float8_e5m2", "int8"),
}

# Misaligned element loads are fine here; elsewhere copy misaligned input first.
_UNALIGNED_OK = None


def _kernels():
    global _convert
    if _convert is None:
        from .kernels import load

        _convert = load("convert")
    return _convert


def unaligned_ok() -> bool:
    global _UNALIGNED_OK
    if _UNALIGNED_OK is None:
        import platform

        _UNALIGNED_OK = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "aarch64", "arm64"}
    return _UNALIGNED_OK


def _readonly(a: np.ndarray) -> np.ndarray:
    """A plain-ndarray read-only view (memmap subclasses and writability never reach numba)."""
    v = a.view(np.ndarray)
    v.flags.writeable = False
    return v


def span_luts() -> np.ndarray:
    """The span kernels' decode tables in one read-only float32 array: F16 (65,536
    entries), then F8_E4M3 and F8_E5M2 (256 each)."""
    global _SPAN_LUTS
    if _SPAN_LUTS is None:
        _SPAN_LUTS = _readonly(np.concatenate([_lut("F16"), _lut("F8_E4M3"), _lut("F8_E5M2")]))
    return _SPAN_LUTS


_SPAN_LUTS: np.ndarray | None = None


def _no_base() -> np.ndarray:
    global _NO_BASE
    if _NO_BASE is None:
        _NO_BASE = _readonly(np.empty(0, dtype=np.float32))
    return _NO_BASE


def lut_f16() -> np.ndarray:
    """float32 values of all 65,536 IEEE binary16 patterns (NumPy's own conversion)."""
    with np.errstate(invalid="ignore"):
        return np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


def lut_f8_e5m2() -> np.ndarray:
    """float32 values of all 256 F8_E5M2 patterns (IEEE-like: Inf at 0x7C, NaN above).

    E5M2 is the top byte of binary16, so each pattern is decoded as binary16 `b << 8`.
    """
    with np.errstate(invalid="ignore"):
        return (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)


def lut_f8_e4m3() -> np.ndarray:
    """float32 values of all 256 F8_E4M3 (float8_e4m3fn) patterns.

    Bias 7, 3 mantissa bits, subnormals m * 2**-9, no Inf; S.1111.111 (0x7F, 0xFF)
    is NaN (decoded as sign | 0x7FC00000); max finite +-448.
    """
    b = np.arange(256, dtype=np.uint32)
    sign = (b >> 7) << 31
    exp = (b >> 3) & 0xF
    man = b & 0x7
    bits = ((exp + (127 - 7)) << 23) | (man << 20)  # normal numbers
    sub = np.ldexp(man.astype(np.float32), -9).view(np.uint32)  # exp == 0: exact
    bits = np.where(exp == 0, sub, bits)
    bits = np.where((exp == 0xF) & (man == 0x7), np.uint32(0x7FC00000), bits)
    return (bits | sign).astype(np.uint32).view(np.float32)


_LUT_BUILDERS = {"F16": lut_f16, "F8_E5M2": lut_f8_e5m2, "F8_E4M3": lut_f8_e4m3}


def _lut(code: str) -> np.ndarray:
    lut = _LUTS.get(code)
    if lut is None:
        lut = _readonly(np.ascontiguousarray(_LUT_BUILDERS[code](), dtype=np.float32))
        _LUTS[code] = lut
    return lut


def _flat(a, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{what} must be a NumPy array, got {type(a).__name__}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    return a.reshape(-1) if a.ndim != 1 else a


def _as_storage(a: np.ndarray, code: str, what: str) -> np.ndarray:
    storage = DTYPES[code].storage
    if a.dtype == storage:
        return a
    if a.dtype.name in _BIT_ALIASES.get(code, ()) and a.dtype.itemsize == storage.itemsize:
        return a.view(storage)
    raise ValueError(f"{what} for {code} must have dtype {storage.name} (raw storage), got {a.dtype}")


def _check_float32(a: np.ndarray, n: int, what: str) -> None:
    if a.dtype != np.float32:
        raise ValueError(f"{what} must be float32, got {a.dtype}")
    if a.shape[0] != n:
        raise ValueError(f"{what} has {a.shape[0]} elements, expected {n}")


def _check_overlap(out: np.ndarray, inp: np.ndarray, what: str) -> None:
    """Allow exact in-place use (same start, same element size); reject partial overlap."""
    if inp.size and np.may_share_memory(out, inp):
        same = (
            out.__array_interface__["data"][0] == inp.__array_interface__["data"][0]
            and out.dtype.itemsize == inp.dtype.itemsize
        )
        if not same:
            raise ValueError(f"out overlaps {what} without being the same buffer")


def decode(raw: np.ndarray, code: str, out: np.ndarray, base: np.ndarray | None = None) -> None:
    """out[:] = f32(raw) (- base). raw: 1-D storage-dtype array (uint16 for BF16/F16, uint8 for F8, float32, float64); out/base: float32 1-D of the same length.

    Exact: BF16, F16, FP8 and F32 widen exactly, F64 rounds to nearest even (as
    `astype(np.float32)`); the base difference is one float32 subtraction. `raw` may be
    a read-only, misaligned memory map; `out` may be `base` itself (in place).
    Raises ValueError for a code outside DECODABLE or mismatched arrays.
    """
    if code not in DECODABLE:
        raise ValueError(f"cannot decode dtype {code!r}; decodable: {', '.join(DECODABLE)}")
    raw = _as_storage(_flat(raw, "raw"), code, "raw")
    out = _flat(out, "out")
    n = raw.shape[0]
    _check_float32(out, n, "out")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    _check_overlap(out, raw, "raw")
    if base is not None:
        base = _flat(base, "base")
        _check_float32(base, n, "base")
        _check_overlap(out, base, "base")
    if n == 0:
        return
    if not raw.flags.aligned and not unaligned_ok():
        raw = raw.copy()
    k = _kernels()
    b = _no_base() if base is None else _readonly(base if base.flags.aligned or unaligned_ok() else base.copy())
    if not out.flags.aligned and not unaligned_ok():
        tmp = np.empty(n, dtype=np.float32)
        _decode(k, _readonly(raw), code, b, tmp)
        out[...] = tmp
    else:
        _decode(k, _readonly(raw), code, b, out.view(np.ndarray))


def _decode(k, src: np.ndarray, code: str, b: np.ndarray, dst: np.ndarray) -> None:
    if code == "BF16":
        k.decode_bf16(src, b, dst)
    elif code == "F32":
        k.decode_f32(src, b, dst)
    elif code == "F64":
        k.decode_f64(src, b, dst)
    else:  # F16, F8_E4M3, F8_E5M2
        k.decode_lut(src, _lut(code), b, dst)


def encode(src: np.ndarray, code: str, out: np.ndarray) -> None:
    """out[:] = src rounded once to `code` (BF16/F16 RNE, F32 copy, F64 widen); out is the storage-dtype 1-D array.

    BF16 matches ml_dtypes bit for bit (every NaN -> sign | 0x7FC0); F16 matches
    NumPy's float32 -> float16 cast bit for bit (NaN keeps sign and top payload bits).
    Overflow rounds to Inf. Raises ValueError for a code outside ENCODABLE.
    """
    if code not in ENCODABLE:
        raise ValueError(f"cannot encode dtype {code!r}; encodable: {', '.join(ENCODABLE)}")
    src = _flat(src, "src")
    n = src.shape[0]
    _check_float32(src, n, "src")
    out = _as_storage(_flat(out, "out"), code, "out")
    if out.shape[0] != n:
        raise ValueError(f"out has {out.shape[0]} elements, expected {n}")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    _check_overlap(out, src, "src")
    if n == 0:
        return
    k = _kernels()
    s = _readonly(src if src.flags.aligned or unaligned_ok() else src.copy())
    if not out.flags.aligned and not unaligned_ok():
        tmp = np.empty(n, dtype=out.dtype)
        _encode(k, s, code, tmp)
        out[...] = tmp
    else:
        _encode(k, s, code, out.view(np.ndarray))


def encode_f64(src: np.ndarray, code: str, out: np.ndarray) -> None:
    """out[:] = float64 `src` rounded once to `code` (F32 and F64 directly; BF16/F16 through
    float32 rounded to odd, then encode()'s round-to-nearest-even: float32 keeps more than two
    extra bits, so the two steps round like one). For values computed in float64, e.g. LoRA
    factors from an SVD, where rounding to float32 first would round twice."""
    src = _flat(src, "src")
    if src.dtype != np.float64:
        raise ValueError(f"src must be float64, not {src.dtype}")
    if code in ("F32", "F64"):
        _as_storage(_flat(out, "out"), code, "out")[...] = src
        return
    near = src.astype(np.float32)
    wide = near.astype(np.float64)
    inexact = wide != src
    # round to odd: truncate toward zero, then set the last bit of an inexact result
    over = inexact & (np.abs(wide) > np.abs(src))
    near[over] = np.nextafter(near[over], np.float32(0))
    bits = near.view(np.uint32)
    bits[inexact] |= np.uint32(1)
    encode(near, code, out)


def _encode(k, s: np.ndarray, code: str, dst: np.ndarray) -> None:
    if code == "BF16":
        k.encode_bf16(s, dst)
    elif code == "F16":
        k.encode_f16(s, dst)
    elif code == "F32":
        k.encode_f32(s, dst)
    else:  # F64
        k.encode_f64(s, dst)



_EXPONENT = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
             "F32": (np.uint32, 0x7F800000), "F64": (np.uint64, 0x7FF0000000000000)}


def count_nonfinite(raw: np.ndarray, code: str) -> int:
    """Inf/NaN values in an encoded 1-D chunk of an ENCODABLE dtype (exponent bits all ones)."""
    uint, mask = _EXPONENT[code]
    return int(_kernels().count_all_ones(_readonly(raw.view(uint)), uint(mask)))

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

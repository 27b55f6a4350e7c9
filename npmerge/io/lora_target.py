"""One base tensor as a LoRA adapter changes it: the float32 task vector, read on the fly.

A `LoraTarget` is made by io/lora.py's `LoraAdapter` (which validates everything) and
read by the engine through `read_delta(start, n, out, base)`, one range of flat
elements at a time: only the rows of the factors that the range touches are decoded,
and the low-rank product is the exact, thread-count independent kernel of
kernels/lora.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..dtypes import decode
from .checkpoint import TensorRef


@dataclass(frozen=True)
class LoraTarget:
    """What an adapter does to one base tensor, `name`, of shape `shape`.

    Up to two parts, added: a replacement tensor `full` (task vector full - base), a
    low-rank product of `a` and `b` (scale * B @ A, or its transpose), or `bias`, a
    vector added as scale * bias. Only `full` needs the base to compute the delta.
    """

    name: str
    module: str
    shape: tuple[int, ...]
    scale: float = 0.0
    a: TensorRef | None = None
    b: TensorRef | None = None
    transposed: bool = False
    embedding: bool = False
    full: TensorRef | None = None
    bias: TensorRef | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rank(self) -> int | None:
        return None if self.a is None else self.a.info.shape[0]

    @property
    def needs_base(self) -> bool:
        return self.full is not None

    @property
    def kind(self) -> str:
        parts = (["replacement"] if self.full else []) + (
            ["embedding low-rank" if self.embedding else "low-rank"] if self.a else []) + (
            ["lora bias"] if self.bias else [])
        return " + ".join(parts)

    def lowrank_shape(self, transposed: bool) -> tuple[int, int]:
        out, inn = self.b.info.shape[0], self.a.info.shape[1]
        return (inn, out) if transposed else (out, inn)

    def work_bytes(self, n: int) -> int:
        """Upper bound of the scratch memory one read_delta of n elements allocates."""
        total = 4 * n if self.full is not None and (self.a or self.bias) else 0
        if self.a is not None:
            cols = max(self.shape[1], 1)
            total += 4 * self.rank * (n // cols + 2 + cols) * (2 if self.transposed else 1)
        if self.bias is not None:
            total += 16 * n
        return total

    def read_delta(self, start: int, n: int, out: np.ndarray, base: np.ndarray | None = None) -> None:
        """out[:n] = the float32 task vector, flat row-major elements [start, start + n).

        Low-rank: fl32(scale * sum_j f64(B[o, j]) * f64(A[j, i])), see kernels/lora.py;
        lora bias: fl32(scale * f64(b)); replacement: f32(full) - base in float32, where
        `base` holds the base tensor's float32 elements [start, start + n) (required
        when `needs_base`). Two parts are added in float32. Reads only the rows of the
        factors the range touches: memory r * (rows + in) floats, or r * (rows + out).
        """
        if not (0 <= start and 0 <= n and start + n <= self.numel):
            raise ValueError(f"range [{start}, {start + n}) outside '{self.name}' ({self.numel} elements)")
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (n,)
                and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError(f"out must be a writable contiguous float32 array of shape ({n},)")
        if self.full is not None and (base is None or base.shape != (n,) or base.dtype != np.float32):
            raise ValueError(f"'{self.name}' is replaced by the adapter: pass its base float32 elements")
        parts = [read for read, on in ((self._replacement, self.full), (self._lowrank, self.a),
                                        (self._bias, self.bias)) if on is not None]
        if n == 0:
            return
        if not parts:
            out[...] = 0.0
            return
        parts[0](start, n, out, base)
        if len(parts) > 1:  # replacement + low-rank, or replacement + lora bias
            tmp = np.empty(n, np.float32)
            parts[1](start, n, tmp, base)
            out += tmp

    def _replacement(self, start, n, dst, base) -> None:
        decode(self.full.file.flat(self.full.info.name)[start:start + n], self.full.info.dtype.name, dst, base)

    def _lowrank(self, start, n, dst, base) -> None:
        from .. import kernels, workers

        cols = self.shape[1]
        p0, p1 = start // cols, -(-(start + n) // cols)
        if self.transposed:  # (B @ A)^T = A^T @ B^T: rows p of A^T are columns p of A
            left = np.ascontiguousarray(_decode_cols(self.a, p0, p1).T)
            right = np.ascontiguousarray(_decode_rows(self.b, 0, self.b.info.shape[0]).T)
        else:
            left = _decode_rows(self.b, p0, p1)
            right = _decode_rows(self.a, 0, self.a.info.shape[0])
        k, scale, offset = kernels.load("lora"), float(self.scale), start - p0 * cols
        rows = p1 - p0
        step = max(1, -(-rows // (4 * workers.current().threads)))  # a few ranges per thread
        ranges = [(r, min(rows, r + step)) for r in range(0, rows, step)]
        workers.current().run(lambda i, t: k.lowrank_rows(left, right, scale, offset, dst, *ranges[i]), len(ranges))

    def _bias(self, start, n, dst, base) -> None:
        b = _decode_rows(self.bias, start, start + n)
        dst[...] = (np.float64(self.scale) * b.astype(np.float64)).astype(np.float32)


def _f32(raw: np.ndarray, code: str) -> np.ndarray:
    """Exact float32 copy of a block of F16 / BF16 / F32 factor storage.

    NumPy, not the parallel decode kernels: factor blocks are small and many, and a
    parallel launch per block costs more than the conversion."""
    if code == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if code == "F16":
        return raw.view(np.float16).astype(np.float32)
    return np.array(raw, np.float32)


def _decode_rows(ref: TensorRef, r0: int, r1: int) -> np.ndarray:
    """Rows (or, for a vector, elements) r0..r1 of a factor as float32."""
    return _f32(ref.file.view(ref.info.name)[r0:r1], ref.info.dtype.name)


def _decode_cols(ref: TensorRef, c0: int, c1: int) -> np.ndarray:
    return _f32(ref.file.view(ref.info.name)[:, c0:c1], ref.info.dtype.name)

"""Tensor sources: where the values of one input tensor come from.

The engine never asks what kind of source it reads. A source either exposes the
tensor's raw storage in place (`raw()`: a read-only flat view the span kernels decode
directly, e.g. a memory-mapped safetensors tensor), or computes float32 values of any
element range on request (`read()`: e.g. a LoRA delta B·A, or embedding rows permuted to
another vocabulary). `is_delta` says the values are a task vector against the merge's
base rather than model values.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import decode
from .checkpoint import TensorRef


class TensorSource:
    """Interface; see the module docstring."""

    label: str  # the model it belongs to, for messages
    name: str  # the input tensor's name in that model
    shape: tuple[int, ...]
    dtype: str  # storage code of raw(), or of what the values were computed from
    is_delta: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes read from disk per pass (progress accounting)."""
        raise NotImplementedError

    def raw(self) -> np.ndarray | None:
        """The whole tensor's raw storage as a read-only flat view, or None."""
        return None

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        """out[:n] = float32 values of elements start .. start+n-1 (flat, row-major)."""
        raise NotImplementedError

    def work_bytes(self, n: int) -> int:
        """Scratch memory one read() of n elements allocates (the plan's budget asks)."""
        return 0

    @property
    def cache_bytes(self) -> int:
        """Memory that would let this computed source compute its values once for all
        passes (0: nothing to gain). The plan calls enable_cache() when the budget allows."""
        return 0

    def enable_cache(self, chunk: int) -> None:
        """Compute all values once (at most `chunk` elements per step) and keep them until
        release(), exposed by raw() as float32 storage (see cache_bytes)."""

    def prefetch(self) -> None:
        """Hint that the tensor will be read soon (e.g. start readahead)."""

    def release(self) -> None:
        """The tensor is done: its pages (and any cache) may be dropped."""


class MappedSource(TensorSource):
    """A tensor of a safetensors file, read through the file's memory map."""

    def __init__(self, ref: TensorRef, label: str):
        self.ref = ref
        self.label = label
        self.name = ref.info.name
        self.shape = ref.info.shape
        self.dtype = ref.info.dtype.name

    @property
    def nbytes(self) -> int:
        return self.ref.info.nbytes

    def raw(self) -> np.ndarray:
        return self.ref.file.flat(self.name)

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        decode(self.raw()[start:start + n], self.dtype, out[:n])

    def prefetch(self) -> None:
        self.ref.file.advise(self.name, "willneed")

    def release(self) -> None:
        self.ref.file.advise(self.name, "dontneed")


class ZeroSource(TensorSource):
    """A task vector of zeros: a tensor an adapter does not touch. Reads nothing; the
    engine's span buffer is filled with +0.0 once (kernels only read it, span after
    span), so M - B = 0 exactly and B + 0 = B."""

    is_delta = True
    dtype = "F32"

    def __init__(self, name: str, shape: tuple[int, ...], label: str):
        self.name = name
        self.shape = tuple(shape)
        self.label = label
        self._zeroed: np.ndarray | None = None  # the buffer already all zeros

    @property
    def nbytes(self) -> int:
        return 0

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        if out is not self._zeroed:
            out[...] = 0.0
            self._zeroed = out

    def release(self) -> None:
        self._zeroed = None


class ArraySource(TensorSource):
    """An in-memory array in raw storage form (tests, small computed tensors)."""

    def __init__(self, raw: np.ndarray, dtype: str, shape: tuple[int, ...] | None = None, label: str = "array",
                 name: str = "tensor", is_delta: bool = False):
        flat = np.ascontiguousarray(raw).reshape(-1)
        flat.flags.writeable = False
        self._raw = flat
        self.dtype = dtype
        self.shape = tuple(shape) if shape is not None else tuple(np.shape(raw))
        self.label = label
        self.name = name
        self.is_delta = is_delta

    @property
    def nbytes(self) -> int:
        return self._raw.nbytes

    def raw(self) -> np.ndarray:
        return self._raw

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        decode(self._raw[start:start + n], self.dtype, out[:n])

"""A merged tensor's sources as span kernel inputs (the engine's input side; the budget
sizes its buffers)."""

from __future__ import annotations

import numpy as np

from . import kernels
from .constants import BLOCK
from .dtypes import DECODABLE, SPAN_DELTA, span_luts, unaligned_ok
from .io.sources import TensorSource
from .methods.protocol import Span


class SpanInputs:
    """A merged tensor's sources as span kernel inputs: slot 0 the base (if any), then
    the models. Raw storage is decoded in place; other sources fill a float32 buffer per
    span, addressed so that element indices stay absolute. The kernels take one storage
    kind for all models, so models stored in different dtypes are all decoded into such
    buffers (rare). Kernels only read the buffers and a source's values depend only on
    the range, so a buffer that already holds a span's range (the next pass over a
    one-span tensor) is not filled again."""

    def __init__(self, base: TensorSource | None, models: tuple[TensorSource, ...], span: int, rnd: str | None,
                 block: int = BLOCK, rows: int = 0):
        self.block = block
        self.rows = rows  # computed sources fill whole rows of this length around each span (0: the span)
        self.sources = [base] + list(models)
        n = len(self.sources)
        self.addrs = np.zeros(n, np.int64)
        flags = np.zeros(n, np.int64)
        self._keep: list[np.ndarray] = []  # raw views and buffers, alive while the kernels run
        self._computed: list[tuple[int, TensorSource, np.ndarray]] = []
        in_place = self.in_place(base, models)
        for slot, src in enumerate(self.sources):
            if src is None:
                continue
            if in_place[slot]:
                raw = src.raw()
                self.addrs[slot] = raw.ctypes.data
                self._keep.append(raw)
            else:
                buf = np.empty(max(span + 2 * rows, 1), np.float32)
                self._computed.append((slot, src, buf))
                self._keep.append(buf)
            if src.is_delta:
                flags[slot] = SPAN_DELTA
        codecs = kernels.load("codecs")
        kinds = [(s.dtype if in_place[slot] else "F32") if s is not None else None for slot, s in enumerate(self.sources)]
        self.inp = (codecs.decoder(kinds[0]), codecs.decoder(kinds[1]), codecs.rounder(rnd), self.addrs, flags,
                    span_luts().ctypes.data, base is not None)
        self._filled: list[tuple[int, int] | None] = [None] * len(self._computed)  # range each buffer holds
        self._check_scratch: list = []  # the check pass's block buffers per thread (Span.run_checks)

    @staticmethod
    def in_place(base: TensorSource | None, models) -> list[bool]:
        """Per slot: is the source decoded from its raw storage in place (else through a
        float32 span buffer)? Models are in place only if all of them are, in one dtype."""
        def mappable(src) -> bool:
            raw = src.raw() if src is not None else None
            aligned = raw is not None and (raw.ctypes.data % max(raw.itemsize, 1) == 0 or unaligned_ok())
            return raw is not None and raw.size > 0 and aligned and src.dtype in DECODABLE
        together = all(mappable(m) for m in models) and len({m.dtype for m in models}) <= 1
        return [base is not None and mappable(base)] + [together] * len(models)

    @classmethod
    def buffer_bytes(cls, base: TensorSource | None, models, span: int, rows: int = 0) -> int:
        """Float32 span buffers for the sources that are not decoded in place."""
        slots = [base, *models]
        return 4 * (span + 2 * rows) * sum(1 for s, ok in zip(slots, cls.in_place(base, models))
                                           if s is not None and not ok)

    def span(self, lo: int, hi: int, workers) -> Span:
        for i, (slot, src, buf) in enumerate(self._computed):
            a, b = lo, hi
            if self.rows:  # the whole rows the span touches
                a, b = lo - lo % self.rows, min(src.numel, hi + (-hi) % self.rows)
            if self._filled[i] != (a, b):  # a tensor in one span is computed once, not once per pass
                src.read(a, b - a, buf)
                self._filled[i] = (a, b)
            self.addrs[slot] = buf.ctypes.data - 4 * a
        return Span(lo, hi, self.block, self.inp, workers, check_scratch=self._check_scratch)

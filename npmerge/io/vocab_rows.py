"""Vocabulary-sized tensors in output-vocabulary row order: `PermutedRows` reads one
model's embedding or head rows permuted (and filled) by an `OutputVocab`, in bounded
memory; `VocabRowsSource` is that as an engine tensor source.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from ..constants import BLOCK
from ..errors import IncompatibleModels
from ..reduction import combine_lanes, exact_sum
from .sources import TensorSource
from .vocab import COPY, MEAN, PAD, ZERO, OutputVocab

_LANES = 8


# ----------------------------------------------------------------- the tensor source


class PermutedRows:
    """One model's vocabulary-sized tensor in output-vocabulary row order: a tensor source.

    `tensors[j]` = (raw, code): input j's copy of the same tensor as a 2-D raw storage
    view [in_rows[j], hidden] (as `SafetensorsFile.view` returns it) and its safetensors
    dtype; None for inputs never read (only the model itself and the donors of its
    COPY/MEAN rows are). `read` touches only the rows it returns.
    """

    def __init__(self, vocab: OutputVocab, model: int, tensors: Sequence[tuple[np.ndarray, str] | None],
                 chunk: int = 1 << 20):
        if len(tensors) != len(vocab.rows):
            raise ValueError(f"need one tensor entry per input model ({len(vocab.rows)}), got {len(tensors)}")
        self.vocab = vocab
        self.model = model
        self.map = vocab.rows[model]
        hidden = None
        for j, t in enumerate(tensors):
            if t is None:
                continue
            raw, _code = t
            if not raw.flags.c_contiguous:
                raise ValueError(f"tensor of {vocab.labels[j]} must be a C-contiguous view (as the file maps it)")
            if raw.ndim != 2 or raw.shape[0] != vocab.in_rows[j]:
                raise ValueError(f"tensor of {vocab.labels[j]} has shape {raw.shape}, expected "
                                 f"[{vocab.in_rows[j]}, hidden]")
            if hidden is not None and raw.shape[1] != hidden:
                raise ValueError(f"tensor of {vocab.labels[j]} has {raw.shape[1]} columns, expected {hidden}")
            hidden = raw.shape[1]
        if tensors[model] is None:
            raise ValueError(f"the tensor of {vocab.labels[model]} itself is required")
        self.tensors = list(tensors)
        self.hidden = int(hidden)
        self.shape = (vocab.size, self.hidden)
        self.numel = vocab.size * self.hidden
        self.chunk = max(1, int(chunk))  # elements per step of the padding-row pass (its scratch: see work_bytes)
        self._pad: np.ndarray | None = None

    # -- public ------------------------------------------------------------
    def read(self, start: int, n: int, out: np.ndarray) -> None:
        """out[:n] = elements [start, start+n) of the permuted tensor (flat, row-major).

        Runs of consecutive input rows are decoded straight into `out`; filled rows go
        through a temporary of at most n + 2 * hidden floats.
        """
        if start < 0 or n < 0 or start + n > self.numel:
            raise ValueError(f"elements [{start}, {start + n}) outside the tensor's {self.numel}")
        if out.dtype != np.float32 or out.ndim != 1 or out.shape[0] != n:
            raise ValueError("out must be a 1-D float32 array of length n")
        if n == 0:
            return
        from ..dtypes import decode

        h = self.hidden
        r0, r1 = start // h, (start + n - 1) // h + 1
        idx = self.map[r0:r1]
        own = idx >= 0
        # runs of output rows that are consecutive input rows (one slice of the input), or filled rows
        cut = np.nonzero((own[1:] != own[:-1]) | (own[1:] & (idx[1:] != idx[:-1] + 1)))[0] + 1
        bounds = [0, *cut.tolist(), len(idx)]
        raw, code = self.tensors[self.model]
        flat = raw.reshape(-1)
        for a, b in zip(bounds[:-1], bounds[1:]):
            e0, e1 = max(start, (r0 + a) * h), min(start + n, (r0 + b) * h)
            o0, o1 = e0 - start, e1 - start
            if own[a]:
                s0 = int(idx[a]) * h + e0 - (r0 + a) * h
                decode(flat[s0:s0 + (e1 - e0)], code, out[o0:o1])
            else:
                block = self.rows(r0 + a, r0 + b).reshape(-1)
                out[o0:o1] = block[e0 - (r0 + a) * h:e1 - (r0 + a) * h]

    def rows(self, a: int, b: int) -> np.ndarray:
        """Output rows [a, b) as a new float32 array [b - a, hidden]."""
        res = np.empty((b - a, self.hidden), dtype=np.float32)
        idx = self.map[a:b]
        own = idx >= 0
        if own.all():
            res[:] = self._decode(self.model, idx)
            return res
        if own.any():
            res[own] = self._decode(self.model, idx[own])
        where = np.nonzero(~own)[0]
        ids = where + a
        kinds = self.vocab.fill[ids]
        for kind in np.unique(kinds):
            sel = kinds == kind
            pos, tid = where[sel], ids[sel]
            if kind == ZERO:
                res[pos] = 0.0
            elif kind == COPY:
                donors = self.vocab.donor[tid]
                for j in np.unique(donors):
                    d = donors == j
                    res[pos[d]] = self._decode(int(j), self.vocab.rows[j][tid[d]])
            elif kind == MEAN:
                res[pos] = self._mean(tid)
            elif kind == PAD:
                res[pos] = self.pad_row()
            else:  # OWN cannot reach here: the model has the row
                raise AssertionError(f"fill kind {kind} for a missing row")
        return res

    def pad_row(self) -> np.ndarray:
        """The value of padding rows: per column, the docs/semantics.md §A mean over output rows [0, n_tokens)
        (computed once, `chunk` elements at a time)."""
        if self._pad is None:
            self._pad = _column_mean(self, self.vocab.n_tokens)
        return self._pad

    @staticmethod
    def work_bytes(vocab: OutputVocab, hidden: int, n: int, chunk: int) -> int:
        """Scratch one read() of n elements may allocate, the padding-row pass (with `chunk`) included.

        Filled rows (at most n + 2 * hidden elements) cost up to ~40 bytes per element
        (the float32 rows, a raw copy and its float32 decode, a MEAN row's float64 sum and
        its temporaries); decoding in place costs nothing beyond a possible copy of an
        unaligned raw range (8 bytes per element at most).
        """
        read = 40 * (n + 2 * hidden) + 8 * n
        if vocab.size == vocab.n_tokens:
            return read
        blocks = -(-vocab.n_tokens // BLOCK)
        step = max(chunk, _LANES * hidden) + 2 * hidden
        return read + 40 * step + 16 * hidden * (blocks + 6)

    # -- internals ------------------------------------------------------------
    def _decode(self, j: int, row_idx: np.ndarray) -> np.ndarray:
        from ..dtypes import decode

        t = self.tensors[j]
        if t is None:
            who = self.vocab.labels[self.model]
            raise ValueError(f"the tensor of {self.vocab.labels[j]} is needed for {who}'s rows")
        raw, code = t
        picked = np.ascontiguousarray(raw[np.asarray(row_idx, dtype=np.int64)])
        out = np.empty(picked.size, dtype=np.float32)
        decode(picked.reshape(-1), code, out)
        return out.reshape(len(row_idx), self.hidden)

    def _mean(self, tid: np.ndarray) -> np.ndarray:
        acc = np.zeros((len(tid), self.hidden), dtype=np.float64)
        count = np.zeros(len(tid), dtype=np.int64)
        for j, r in enumerate(self.vocab.rows):
            have = r[tid] >= 0
            if have.any():
                acc[have] += self._decode(j, r[tid[have]])
                count += have
        return (acc / count[:, None]).astype(np.float32)


class VocabRowsSource(TensorSource):
    """A model's vocabulary-sized tensor as the engine reads it (a computed source): its
    rows in output-vocabulary order, `PermutedRows` over the inputs' feeding tensors.

    `inputs[j]`: input j's source of the same output tensor (a tied model's embeddings
    for `lm_head`), or None. Only the model itself and the donors of the rows it lacks
    are read. The row reader is built at the first read, with the engine's span as the
    padding pass's step, and dropped on release().
    """

    def __init__(self, vocab: OutputVocab, model: int, inputs: Sequence[TensorSource | None], label: str):
        own = inputs[model]
        self.vocab, self.model, self.inputs = vocab, model, list(inputs)
        self.label = label
        self.name = own.name
        self.dtype = own.dtype
        self.hidden = int(own.shape[1])
        self.shape = (vocab.size, self.hidden)
        lacking = vocab.rows[model] < 0
        need = {model}
        need.update(int(j) for j in np.unique(vocab.donor[lacking & (vocab.fill == COPY)]))
        if (lacking & (vocab.fill == MEAN)).any():
            mean = lacking & (vocab.fill == MEAN)
            need.update(j for j, r in enumerate(vocab.rows) if (r[mean] >= 0).any())
        self.needed = tuple(sorted(need))
        missing = [j for j in self.needed if self.inputs[j] is None]
        if missing:
            raise ValueError(f"rows of {label} need the tensors of " + ", ".join(vocab.labels[j] for j in missing))
        computed = next((self.inputs[j] for j in self.needed if self.inputs[j].raw() is None), None)
        if computed is not None:
            raise IncompatibleModels(f"'{computed.name}' of {computed.label} is computed, not stored (a LoRA "
                                     "adapter?): its rows cannot be mapped to the output vocabulary",
                                     hint="merge the adapter into its model first, or merge without a tokenizer "
                                          "source")
        self._rows: PermutedRows | None = None

    @property
    def nbytes(self) -> int:
        return self.inputs[self.model].nbytes

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        if self._rows is None:
            views = [self._view(j) if j in self.needed else None for j in range(len(self.inputs))]
            self._rows = PermutedRows(self.vocab, self.model, views, chunk=max(n, out.shape[0]))
        self._rows.read(start, n, out[:n])

    def work_bytes(self, n: int) -> int:
        return PermutedRows.work_bytes(self.vocab, self.hidden, n, n)

    def fingerprint(self) -> str:
        return row_map_fingerprint(self.vocab, self.model, self.hidden)

    def prefetch(self) -> None:
        for j in self.needed:
            self.inputs[j].prefetch()

    def release(self) -> None:
        self._rows = None
        for j in self.needed:
            self.inputs[j].release()

    def _view(self, j: int) -> tuple[np.ndarray, str]:
        src = self.inputs[j]
        return src.raw().reshape(src.shape), src.dtype


def row_map_fingerprint(vocab: OutputVocab, model: int, hidden: int) -> str:
    """sha256 of model's row map, the fill rules and the sizes: identifies the row mapping (not
    the input bytes), so a resume never mixes two vocabularies."""
    h = hashlib.sha256(f"{model}:{vocab.size}:{vocab.n_tokens}:{hidden}".encode())
    for a in (*vocab.rows, vocab.fill, vocab.donor):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _column_mean(src: PermutedRows, n: int) -> np.ndarray:
    """Per column of output rows [0, n): fl32(sum / n), the sum by the docs/semantics.md §A rule over rows."""
    h = src.hidden
    if n == 0:
        return np.zeros(h, dtype=np.float32)
    step = max(_LANES, src.chunk // max(h, 1) // _LANES * _LANES)  # rows per decoded piece, a multiple of 8
    block_sums = []
    for b0 in range(0, n, BLOCK):
        b1 = min(n, b0 + BLOCK)
        acc = np.zeros((_LANES, h), dtype=np.float64)
        for p0 in range(b0, b1, step):
            x = src.rows(p0, min(b1, p0 + step))
            for k in range(0, x.shape[0], _LANES):
                m = min(_LANES, x.shape[0] - k)
                acc[:m] += x[k:k + m]
        block_sums.append(combine_lanes(acc.T))
    sums = np.stack(block_sums, axis=1)
    total = np.array([exact_sum(col) for col in sums], dtype=np.float64)
    return (total / n).astype(np.float32)

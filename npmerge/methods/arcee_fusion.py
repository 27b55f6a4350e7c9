"""Arcee Fusion (docs/semantics.md §C): keep the fine-tune's delta where its importance,
|Δ| times the KL divergence between the softmaxes of the model's and the base's row, is
at least median + 1.5·IQR of the tensor's importances; elsewhere keep the base.

Passes (kernels/fusion.py): "rows" the row KLs (float64, each row read whole by one
thread); "hist_hi" and "hist_lo" the exact quartiles (radix histograms of the float32
importance keys: mergekit sorts a sample of 1M elements of larger tensors instead);
"merge". The threshold is float32 arithmetic on the quartiles, as mergekit's.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..constants import BLOCK
from .protocol import Driver, Span, Stat, TensorContext
from .registry import Method, register

BUCKETS = 1 << 16


def quartile_ranks(n: int) -> list[int]:
    """The 0-based ascending ranks mergekit reads: ⌊q·(n − 1)⌋ for q = 1/4, 1/2, 3/4."""
    return [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]


def key_value(key: int) -> np.float32:
    """The float32 whose importance key (kernels/fusion.py) is `key`."""
    bits = key - 0x80000000 if key >= 0x80000000 else 0xFFFFFFFF - key
    return np.array([bits], np.uint32).view(np.float32)[0]


class FusionDriver(Driver):
    def __init__(self, ctx: TensorContext):
        super().__init__(ctx, ["rows", "hist_hi", "hist_lo", "merge"] if ctx.numel else ["merge"])
        self.nrows, self.C = ctx.rows
        self.whole_rows = self.C
        self.ranks = quartile_ranks(ctx.numel)
        self.kl = np.zeros(0, np.float64)
        self.thr = np.float32(np.inf)
        self.slots = np.zeros(0, np.int64)
        self.found: list[tuple[int, int]] = []  # per rank: (top 16 bits, rank inside that bucket)
        self.quartiles = [0.0, 0.0, 0.0]
        self.kept = 0
        self._h = self._buffers = None

    def work_bytes(self, span: int) -> int:
        """Row KLs; per thread two decoded rows and their exponentials, a row's block sums
        and three histograms."""
        per_thread = 8 * max(self.C, BLOCK) + 16 * self.C + 8 * -(-self.C // BLOCK) + 3 * BUCKETS * 8
        return 8 * self.nrows + self.ctx.threads * per_thread

    def kernel_for(self, pass_name: str) -> str:
        return "fusion.row_kl" if pass_name == "rows" else "fusion.fusion"

    def feed(self, pass_name: str, span: Span) -> int:
        k = kernels.load("fusion")
        threads = span.workers.threads
        if self._buffers is None:
            self._buffers = [k.scratch(self.C, span.block) for _ in range(threads)]
            self.kl = np.zeros(self.nrows, np.float64)
        sc = self._buffers
        if pass_name == "rows":  # the rows that start in the span
            r0, r1 = -(-span.lo // self.C), min(self.nrows, -(-span.hi // self.C))
            step = max(1, -(-(r1 - r0) // (4 * threads)))
            ranges = [(r, min(r1, r + step)) for r in range(r0, r1, step)]
            span.workers.run(lambda p, t: k.row_kl(span.inp, *ranges[p], self.C, span.block, self.kl, sc[t]),
                             len(ranges))
            return 0
        op = {"hist_hi": k.HIST_HI, "hist_lo": k.HIST_LO, "merge": k.MERGE}[pass_name]
        if self._h is None:  # per thread: histograms (one or a slot per bucket), or the kept count
            self._h = np.zeros((threads, len(self.slots) if op == k.HIST_LO else 1, 1 if op == k.MERGE else BUCKETS),
                               np.int64)
        h = self._h
        return sum(span.run(lambda a, z, t: k.fusion(span.inp, span.out, op, span.lo, a, z, span.block, self.C, self.kl,
                                                     self.slots, h[t], self.thr, h[t, 0], sc[t])))

    def end_pass(self, pass_name: str) -> None:
        if pass_name == "hist_hi":
            cum = np.cumsum(self._h.sum(axis=0)[0])
            buckets = [int(np.searchsorted(cum, r, side="right")) for r in self.ranks]
            self.found = [(b, r - (int(cum[b - 1]) if b else 0)) for b, r in zip(buckets, self.ranks)]
            self.slots = np.array(sorted(set(buckets)), np.int64)
        elif pass_name == "hist_lo":
            h = self._h.sum(axis=0)
            keys = []
            for bucket, rank in self.found:
                cum = np.cumsum(h[int(np.searchsorted(self.slots, bucket))])
                keys.append((bucket << 16) | int(np.searchsorted(cum, rank, side="right")))
            q1, med, q3 = (key_value(x) for x in keys)
            self.quartiles = [float(q1), float(med), float(q3)]
            with np.errstate(all="ignore"):
                self.thr = np.float32(med + np.float32(1.5) * np.float32(q3 - q1))
        elif pass_name == "merge":
            self.kept = int(self._h.sum())
        self._h = None

    def release(self) -> None:
        self._buffers = self._h = None

    def stats(self) -> dict:
        return {"threshold": float(self.thr), "models": [{"kept": self.kept / max(self.ctx.numel, 1)}]}


METHOD = register(Method(
    name="arcee_fusion",
    title="Arcee Fusion",
    paper="https://arcee.ai",
    summary="keep the fine-tune's changes whose importance (|Δ| × the KL divergence between the row's "
            "softmaxes) is at least median + 1.5·IQR of the tensor's, and the base elsewhere",
    base="required",
    model_params=(),
    global_params=(),
    driver=FusionDriver,
    stats=(Stat("kept", "kept"),),
    min_models=1,
    max_models=1,
    example="npmerge arcee-fusion BASE OTHER -o OUT",
))

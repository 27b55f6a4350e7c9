"""Arcee Fusion (docs/semantics.md §C): keep the fine-tune's delta where its importance,
|Δ| times the KL divergence between the softmaxes of the model's and the base's row, is
at least median + 1.5·IQR of the tensor's importances; elsewhere keep the base.

Passes (kernels/fusion.py): "rows" the row KLs (float64, each row read whole by one
thread); "hist0".."hist3" the exact quartiles of the float64 importances (one 16-bit
digit of their keys per pass: mergekit sorts a sample of 1M elements of larger tensors
instead); "merge". Importance and threshold are float64, mergekit's algorithm evaluated
in float64 (its float32 run differs from that on 14 % of the elements).
"""

from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..constants import BLOCK
from .protocol import Driver, Span, Stat, TensorContext
from .registry import Method, register

BUCKETS = 1 << 16


def quartile_ranks(n: int) -> list[int]:
    """The 0-based ascending ranks mergekit reads: ⌊q·(n − 1)⌋ for q = 1/4, 1/2, 3/4."""
    return [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]


def key_value(u: int) -> float:
    """The float64 whose importance key (kernels/fusion.py, sign bit flipped) is `u`."""
    key = u - 2**63
    bits = key if key >= 0 else -(2**63) - key - 1
    return float(np.array([bits], np.int64).view(np.float64)[0])


LEVELS = 4  # 16-bit digits of the 64-bit keys


class FusionDriver(Driver):
    def __init__(self, ctx: TensorContext):
        hists = [f"hist{level}" for level in range(LEVELS)]
        super().__init__(ctx, ["rows", *hists, "merge"] if ctx.numel else ["merge"])
        self.nrows, self.C = ctx.rows
        self.whole_rows = self.C
        self.kl = np.zeros(0, np.float64)
        self.thr = math.inf
        self.found = [(0, r) for r in quartile_ranks(ctx.numel)]  # per rank: (digits found, rank among them)
        self.prefixes = np.zeros(1, np.int64)
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
        merge = pass_name == "merge"
        op, level = (k.MERGE, 0) if merge else (k.HIST, int(pass_name[4:]))
        if self._h is None:  # per thread: a histogram per prefix, or the kept count
            self._h = np.zeros((threads, len(self.prefixes), 1 if merge else BUCKETS), np.int64)
        h = self._h
        return sum(span.run(lambda a, z, t: k.fusion(span.inp, span.out, op, span.lo, a, z, span.block, self.C, self.kl,
                                                     level, self.prefixes, h[t], self.thr, h[t, 0], sc[t])))

    def end_pass(self, pass_name: str) -> None:
        if pass_name.startswith("hist"):
            h = self._h.sum(axis=0)
            found = []
            for digits, rank in self.found:  # the next digit of each quartile's key
                cum = np.cumsum(h[int(np.searchsorted(self.prefixes, digits))])
                digit = int(np.searchsorted(cum, rank, side="right"))
                found.append(((digits << 16) | digit, rank - (int(cum[digit - 1]) if digit else 0)))
            self.found = found
            self.prefixes = np.array(sorted({d for d, _ in found}), np.int64) if pass_name != f"hist{LEVELS - 1}" \
                else np.zeros(1, np.int64)
            if pass_name == f"hist{LEVELS - 1}":
                q1, med, q3 = (key_value(d) for d, _ in found)
                self.quartiles = [q1, med, q3]
                self.thr = med + 1.5 * (q3 - q1)
        elif pass_name == "merge":
            self.kept = int(self._h.sum())
        self._h = None

    def release(self) -> None:
        self._buffers = self._h = None

    def stats(self) -> dict:
        return {"threshold": self.thr, "models": [{"kept": self.kept / max(self.ctx.numel, 1)}]}


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

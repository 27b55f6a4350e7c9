"""Per-tensor driver of the TIES family: which passes a tensor needs, the exact
trim thresholds between passes, and the fused merge kernel call.

The engine hands over chunks of float32 rows (task vectors, or the models for
`linear`); this module knows the math's policy, the kernels know the loops.
"""

from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..constants import BLOCK

_CONSENSUS = {"none": 0, "sum": 1, "count": 2}
KEEP_ALL = -1
KEEP_NONE = 1 << 31


def keep_count(density: float, n: int) -> int:
    """k = floor(density * n), the product in float64 (SEMANTICS.md, TIES step 1)."""
    return n if density >= 1.0 else min(n, math.floor(float(density) * n))


class TensorMerge:
    """State of one tensor's merge across its passes."""

    def __init__(self, method, global_params: dict, model_params: list[dict], numel: int,
                 has_base: bool, threads: int):
        self.n = numel
        nm = len(model_params)
        self.nm = nm
        self.weights = np.array([p["weight"] for p in model_params], dtype=np.float32)
        self.k = [keep_count(p.get("density", 1.0), numel) if method.trims else numel for p in model_params]
        self.tbits = np.array([KEEP_ALL if k >= numel else KEEP_NONE if k == 0 else 0 for k in self.k], np.int64)
        self.tq = np.zeros(nm, np.int64)
        self.tm = np.zeros(nm, np.int64)
        self.tie_pos = np.zeros(nm, np.int64)
        self.selecting = np.array([0 < k < numel for k in self.k], np.bool_)
        self.consensus = _CONSENSUS[method.fixed.get("consensus", global_params.get("consensus", "none"))]
        self.normalize = bool(global_params.get("normalize", False))
        self.eps = float(method.zero_denominator_eps)
        self.lam = np.float32(method.fixed.get("lambda", global_params.get("lambda", 1.0)))
        self.has_base = has_base
        self.counts = np.zeros(1 + 2 * nm, np.int64)
        # The passes still to run; end_pass("hist_hi") drops "hist_lo" when it is not needed.
        self.passes = (["hist_hi", "hist_lo"] if self.selecting.any() else []) + ["merge"]
        self._threads = max(1, threads)
        self._hist = None
        self._above = np.zeros(nm, np.int64)
        self._bucket = np.full(nm, -1, np.int64)

    # -- passes ----------------------------------------------------------------
    def feed(self, pass_name: str, rows: np.ndarray, base: np.ndarray, out: np.ndarray | None) -> None:
        """Consume one chunk of rows (float32[nm, c]) for `pass_name`."""
        if pass_name == "hist_hi":
            sel = kernels.load("select")
            if self._hist is None:
                self._hist = np.zeros((self._threads, self.nm, 2 * sel.HI_BUCKETS), np.int64)
            sel.hist_hi(rows.view(np.uint32), self.selecting, self._hist)
        elif pass_name == "hist_lo":
            sel = kernels.load("select")
            if self._hist is None:
                self._hist = np.zeros((self._threads, self.nm, sel.LO_BUCKETS), np.int64)
            sel.hist_lo(rows.view(np.uint32), self._bucket, self._hist)
        else:
            kernels.load("merge").merge_chunk(
                rows, base, self.weights, self.tbits, self.tq, self.tm, self.tie_pos,
                self.consensus, self.normalize, self.eps, self.lam, BLOCK, out, self.counts)

    def end_pass(self, pass_name: str) -> None:
        """Turn a finished histogram into each model's bucket or exact threshold (hi), or
        the exact thresholds the high bits could not settle (lo)."""
        if pass_name not in ("hist_hi", "hist_lo"):
            return
        hist = self._hist.sum(axis=0)
        self._hist = None
        if pass_name == "hist_hi":
            split = hist.reshape(self.nm, -1, 2)  # [..., 0]: low bits zero, [..., 1]: not
            for i in np.flatnonzero(self.selecting):
                self._locate_bucket(i, split[i].sum(axis=1), split[i, :, 1])
            if (self._bucket < 0).all():
                self.passes.remove("hist_lo")
            return
        for i in np.flatnonzero(self._bucket >= 0):
            lo, above_in_bucket = _locate(hist[i], self.k[i] - self._above[i])
            greater = int(self._above[i] + above_in_bucket)
            self.tbits[i] = (int(self._bucket[i]) << 16) | int(lo)
            self.tm[i] = hist[i, lo]
            self.tq[i] = self.k[i] - greater

    def _locate_bucket(self, i: int, hist: np.ndarray, nonzero_lo: np.ndarray) -> None:
        """After the high-bits pass: the bucket holding model i's k-th largest magnitude.

        Within that bucket the elements with non-zero low bits are all larger than the
        bucket's floor value (bucket << 16), which the others equal. If the k-th largest
        lies beyond the former, it is the floor: threshold and tie counts are known now
        and model i needs no low-bits pass (bucket -1)."""
        bucket, above = _locate(hist, self.k[i])
        need = self.k[i] - above  # elements to take from the bucket, 1..hist[bucket]
        larger = int(nonzero_lo[bucket])
        if need > larger:
            self.tbits[i] = bucket << 16
            self.tm[i] = int(hist[bucket]) - larger
            self.tq[i] = need - larger
            self._bucket[i] = -1
        else:
            self._bucket[i], self._above[i] = bucket, above

    # -- results -----------------------------------------------------------------
    def stats(self) -> dict:
        """Trim and sign-vote statistics of this tensor (SEMANTICS.md)."""
        n = max(self.n, 1)
        models = []
        for i in range(self.nm):
            kept_nonzero = int(self.counts[1 + 2 * i])
            excluded = int(self.counts[2 + 2 * i])
            models.append({
                "kept": self.k[i] / n,
                "kept_nonzero": kept_nonzero,
                "excluded_count": excluded,
                "excluded": excluded / kept_nonzero if kept_nonzero else 0.0,
            })
        return {"sign_conflict": int(self.counts[0]) / n, "models": models}


def _locate(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest element, and how many lie above it."""
    from_top = np.cumsum(hist[::-1])
    pos = int(np.searchsorted(from_top, k))  # first bucket (from the top) where the count reaches k
    bucket = len(hist) - 1 - pos
    return bucket, int(from_top[pos] - hist[bucket])

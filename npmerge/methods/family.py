"""Driver of the TIES family (TIES, task arithmetic, linear): which passes a tensor
needs, the exact trim thresholds between passes, and the fused merge kernel call.

The kernels (kernels/family.py) know the loops; this module knows the policy: TIES
trims each task vector to its k = floor(density * n) largest magnitudes (SEMANTICS.md),
found exactly by a high-bits histogram pass and, only when that does not settle the
threshold, a low-bits pass.
"""

from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..errors import RecipeError
from .protocol import Driver, Span, Stat, TensorContext

_CONSENSUS = {None: 0, "sum": 1, "count": 2}
_NO_SUMS = np.zeros((0, 0), np.float64)
_NO_BAD = np.zeros((0, 0), np.int64)
KEEP_ALL = -1
KEEP_NONE = 1 << 31

TIES_STATS = (
    Stat("kept", "kept"),
    Stat("excluded", "excluded by vote", total="ratio", num="excluded_count", den="kept_nonzero"),
    Stat("sign_conflict", "sign conflicts", per_model=False),
)


def keep_count(density: float, n: int) -> int:
    """k = floor(density * n), the product in float64 (SEMANTICS-2 A "Counts")."""
    return n if density >= 1.0 else min(n, math.floor(float(density) * n))


class FamilyDriver(Driver):
    """One tensor of TIES / task arithmetic / linear.

    `trims`: per-model magnitude trim by `density`; `consensus`: the sign election
    (None: every model agrees); `eps`: |D| < eps divides by 1 instead (0: only D == 0)."""

    def __init__(self, ctx: TensorContext, *, trims: bool, consensus: str | None, eps: float):
        super().__init__(ctx, [])
        nm, n = ctx.n_models, ctx.numel
        g = ctx.params
        self.weights = np.array([p["weight"] for p in ctx.model_params], np.float32)
        self.k = [keep_count(p["density"], n) if trims else n for p in ctx.model_params]
        self.tbits = np.array([KEEP_ALL if k >= n else KEEP_NONE if k == 0 else 0 for k in self.k], np.int64)
        self.tq = np.zeros(nm, np.int64)
        self.tm = np.zeros(nm, np.int64)
        self.tie_pos = np.zeros(nm, np.int64)
        self.selecting = np.array([0 < k < n for k in self.k], np.bool_)
        self.consensus = _CONSENSUS[g.get("consensus", consensus) if consensus else None]
        self.normalize = bool(g.get("normalize", False))
        self.eps = float(eps)
        self.lam = np.float32(g.get("lambda", 1.0))
        self.counts = np.zeros(1 + 2 * nm, np.int64)
        self.trims = trims
        # end_pass("hist_hi") drops "hist_lo" when the high bits settled every threshold.
        self.passes = (["hist_hi", "hist_lo"] if self.selecting.any() else []) + ["merge"]
        self._hist = None
        self._above = np.zeros(nm, np.int64)
        self._bucket = np.full(nm, -1, np.int64)

    fused_check = True  # the first pass (hist_hi or merge) runs the engine's checks

    @staticmethod
    def _checks(span: Span) -> tuple:
        if span.check:
            return span.checks
        return False, _NO_SUMS, _NO_BAD

    def work_bytes(self, span: int) -> int:
        """Per-thread radix histograms of the exact selection (the larger, low-bits one)."""
        return self.ctx.threads * self.ctx.n_models * (1 << 16) * 8 if self.selecting.any() else 0

    # -- passes ----------------------------------------------------------------
    def feed(self, pass_name: str, span: Span) -> int:
        k = kernels.load("family")
        if pass_name == "merge":
            return k.merge(*span.inputs, span.lo, span.hi, span.block, *self._checks(span), self.weights,
                           self.tbits, self.tq, self.tm, self.tie_pos, self.consensus, self.normalize, self.eps,
                           self.lam, span.out_addr, span.out_mode, self.counts)
        if pass_name == "hist_hi":
            if self._hist is None:
                self._hist = np.zeros((self.ctx.threads, self.ctx.n_models, 2 * k.HI_BUCKETS), np.int64)
            k.hist_hi(*span.inputs, span.lo, span.hi, span.block, *self._checks(span), self.selecting, self._hist)
        else:
            if self._hist is None:
                self._hist = np.zeros((self.ctx.threads, self.ctx.n_models, k.LO_BUCKETS), np.int64)
            k.hist_lo(*span.inputs, span.lo, span.hi, span.block, self._bucket, self._hist)
        return 0

    def end_pass(self, pass_name: str) -> None:
        """Turn a finished histogram into each model's bucket or exact threshold (hi), or
        the exact thresholds the high bits could not settle (lo)."""
        if pass_name == "merge":
            return
        hist = self._hist.sum(axis=0)
        self._hist = None
        if pass_name == "hist_hi":
            split = hist.reshape(self.ctx.n_models, -1, 2)  # [..., 0]: low bits zero, [..., 1]: not
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
        """Trim and sign-vote statistics (SEMANTICS.md); only the trimming methods have them."""
        if not self.trims:
            return {"models": [{} for _ in range(self.ctx.n_models)]}
        n = max(self.ctx.numel, 1)
        models = [{"kept": self.k[i] / n, "kept_nonzero": int(self.counts[1 + 2 * i]),
                   "excluded_count": int(self.counts[2 + 2 * i])} for i in range(self.ctx.n_models)]
        for m in models:
            m["excluded"] = m["excluded_count"] / m["kept_nonzero"] if m["kept_nonzero"] else 0.0
        return {"sign_conflict": int(self.counts[0]) / n, "models": models}


def _locate(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest element, and how many lie above it."""
    from_top = np.cumsum(hist[::-1])
    pos = int(np.searchsorted(from_top, k))  # first bucket (from the top) where the count reaches k
    bucket = len(hist) - 1 - pos
    return bucket, int(from_top[pos] - hist[bucket])


def driver(**config):
    """A Method's driver factory: FamilyDriver with this method's fixed configuration."""
    def make(ctx: TensorContext) -> FamilyDriver:
        return FamilyDriver(ctx, **config)
    return make


def check_nonzero_weights(global_params: dict, model_params: list[dict], models: list[str]) -> None:
    """Normalising divides by a sum of weights: refuse recipes where every weight is 0."""
    if global_params.get("normalize") and not any(p["weight"] for p in model_params):
        raise RecipeError("every model weight is 0, so normalizing would divide by zero",
                          hint="give at least one model a non-zero weight")


def check_weight_sum(global_params: dict, model_params: list[dict], models: list[str]) -> None:
    """... and, where the whole sum is the divisor, where the weights sum to (nearly) zero."""
    check_nonzero_weights(global_params, model_params, models)
    weights = [p["weight"] for p in model_params]
    if global_params.get("normalize") and abs(math.fsum(weights)) < 1e-8:
        raise RecipeError(f"the model weights sum to 0 ({', '.join(map(str, weights))}), so normalizing "
                          "would divide by zero", hint="change the weights, or turn normalizing off (--no-normalize)")

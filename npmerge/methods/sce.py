"""SCE: select, calculate, erase (FuseChat, Wan et al., 2024), docs/semantics.md §C.

Per tensor: with select_topk σ < 1 keep only the k = floor(σ·#{v ≠ 0}) elements whose
variance v across the task vectors is largest (the shared rank selection keep(v, 0, k),
ties at the threshold thinned evenly), weight each model by its share of the summed
mean squares q_i = ‖τ_i‖²/n, elect a sign per element and average the agreeing weighted
deltas.

Deliberate difference from mergekit: mergekit gives every model the weight 1/N when
Q = Σ q_i < 1e-6, an absolute threshold that many LLM fine-tunes fall under (3 models,
delta RMS < 6e-4), silently turning the weighting off. npmerge uses 1/N only when Q = 0.

Passes: a radix histogram of the top 16 bits of the float64 variance keys; unless that
settles the k-th largest, one pass collecting the keys of its bucket (sorted in memory),
or, where the budget has no room for them, up to three more 16-bit digit passes; one
reduction pass for the q_i of the selected deltas; the merge.
"""

from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..constants import BLOCK
from ..errors import IncompatibleModels
from .family import locate
from .protocol import Driver, Span, Stat, TensorContext
from .registry import Method, Param, number, register

DIGIT_SHIFTS = (48, 32, 16, 0)
HIST_PASSES = tuple(f"hist{s}" for s in DIGIT_SHIFTS)
NO_KEY = np.iinfo(np.int64).max  # a threshold nothing exceeds: keep none

SCE_STATS = (
    Stat("omega", "ω (weight)", fmt="number"),
    Stat("selected", "selected by variance", per_model=False),
)


class SceDriver(Driver):
    def __init__(self, ctx: TensorContext):
        super().__init__(ctx, [])
        n, nm = ctx.numel, ctx.n_models
        self.sigma = float(ctx.params["select_topk"])
        self.k = n  # elements kept by the variance selection
        self.selecting = self.sigma < 1
        self.t, self.tq, self.tm = -1, 0, 0  # keep key > t, and tq of the tm ties at t
        self.weights = np.zeros(nm, np.float32)
        self.q = [0.0] * nm
        self.prefix, self.above = -1, 0
        if self.sigma <= 0 or n == 0:
            self._keep_none()
            self.passes = ["merge"]
        elif self.selecting:
            self.passes = [*HIST_PASSES, "sums", "merge"]
        else:
            self.passes = ["sums", "merge"]
        if "sums" not in self.passes:
            self._set_weights()
        self._hist = self._nan = self._sums = self._ties = self._tie_rem = self._buffers = None
        self._found = None  # per thread: the keys the collect pass found
        self._bucket = 0  # how many keys the collect pass finds (the bucket's count)
        self._tie_pos = 0

    def _keep_none(self) -> None:
        self.k, self.t, self.tq, self.tm = 0, NO_KEY, 0, 0

    @property
    def thin(self) -> bool:
        return 0 < self.tq < self.tm

    def work_bytes(self, span: int) -> int:
        """Per-thread digit histograms, per-block sums and tie counts, and the kernel's
        per-block variance and merge buffers (beyond budget.kernel_bytes)."""
        blocks = -(-self.ctx.numel // BLOCK)
        hist = self.ctx.threads * 2 * (1 << 16) * 8 if self.selecting else 0
        return hist + 8 * blocks * (self.ctx.n_models + 2) + self.ctx.threads * BLOCK * 32

    def kernel_for(self, pass_name: str) -> str:
        return "reduce.sce"

    # -- passes ----------------------------------------------------------------
    def feed(self, pass_name: str, span: Span) -> int:
        k = kernels.load("reduce")
        nm, block = self.ctx.n_models, span.block
        first, nb = span.lo // block, -(-(span.hi - span.lo) // block)
        if self._sums is None:
            blocks = -(-self.ctx.numel // block)
            self._sums = np.zeros((nm, blocks), np.float64)
            self._ties = np.zeros(blocks, np.int64)
            self._tie_rem = np.zeros(blocks, np.int64)
            self._buffers = [k.scratch(nm, block, variance=True) for _ in range(span.workers.threads)]
        shift, op = 0, k.SCE_MERGE
        if pass_name == "collect":
            op = k.SCE_COLLECT
            if self._found is None:
                self._found = np.empty((span.workers.threads, self._bucket + 1), np.int64)  # + 1: see the kernel
                self._nan = np.zeros((span.workers.threads, 1), np.int64)
            return self._call(k, span, op, 0, self._found)
        if pass_name in HIST_PASSES:
            shift, op = int(pass_name[4:]), k.SCE_HIST
            if self._hist is None:
                self._hist = np.zeros((span.workers.threads, 2 * k.BUCKETS), np.int64)
                self._nan = np.zeros((span.workers.threads, 1), np.int64)
        elif pass_name == "sums":
            op = k.SCE_SUMS
            if self.thin:  # each block's first tie ordinal, carried across spans, as a remainder
                self._call(k, span, k.SCE_TIES, 0)
                counts = self._ties[first:first + nb]
                starts = self._tie_pos + np.cumsum(counts) - counts
                self._tie_rem[first:first + nb] = [int(j) * self.tq % self.tm for j in starts.tolist()]
                self._tie_pos += int(counts.sum())
        return self._call(k, span, op, shift)

    def _call(self, k, span: Span, op: int, shift: int, found=None) -> int:
        hist = found if found is not None else self._hist if self._hist is not None else _NO_HIST
        nan = self._nan if self._nan is not None else _NO_HIST
        sc = self._buffers
        return sum(span.run(lambda a, z, t: k.sce(
            span.inp, span.out, op, span.lo, a, z, span.block, self.selecting, shift, self.prefix, self.t, self.tq,
            self.tm, self._tie_rem, self._ties, hist[t] if len(hist) else _NO_COUNT, nan[t] if len(nan) else _NO_COUNT,
            self._sums, self.weights, sc[t])))

    def release(self) -> None:
        self._hist = self._nan = self._sums = self._ties = self._tie_rem = self._buffers = self._found = None

    def end_pass(self, pass_name: str) -> None:
        if pass_name in HIST_PASSES:
            self._end_digit(int(pass_name[4:]))
        elif pass_name == "collect":
            self._end_collect()
        elif pass_name == "sums":
            out = np.empty(self.ctx.n_models, np.float64)
            kernels.load("reduce").exact_rows(self._sums, out)
            n = self.ctx.numel
            self.q = [float(s) / n for s in out]
            self._set_weights()

    def _end_digit(self, shift: int) -> None:
        """Locate the k-th largest variance key in this digit's histogram: settle the
        threshold (and its tie counts), or narrow the prefix for the next digit."""
        hist = self._hist.sum(axis=0).reshape(-1, 2)  # [d, 0]: lower bits zero, [d, 1]: not
        self._hist = None
        if shift == DIGIT_SHIFTS[0]:
            nonzero = self.ctx.numel - int(hist[0, 0])  # key 0 is v == +0.0; NaN counts as non-zero
            self.k = min(max(math.floor(self.sigma * nonzero), 0), nonzero)
            if self.k == 0:
                self._keep_none()
                self._drop_after(f"hist{shift}", HIST_PASSES + ("sums",))
                self._set_weights()
                return
            nans = int(self._nan.sum())
            if nans:
                raise IncompatibleModels(
                    f"tensor '{self.ctx.name}': SCE cannot rank elements by variance, {nans} variance(s) are NaN "
                    "(non-finite task vectors)", hint="use select_topk 1 (no selection) for models with NaN/Inf weights")
        total = hist.sum(axis=1)
        need = self.k - self.above
        d, above_in = locate(total, need)
        need -= above_in  # elements to take from bucket d: 1 .. total[d]
        floor = ((max(self.prefix, 0) << 16) | d) << shift  # smallest key of bucket d
        larger = int(hist[d, 1])  # bucket d's keys above its floor
        if need == total[d]:  # the whole bucket: keep key >= floor
            self.t, self.tq, self.tm = floor - 1, 0, 0
        elif need > larger:  # the k-th largest is the floor itself
            self.t, self.tq, self.tm = floor, need - larger, int(total[d]) - larger
        else:
            self.prefix = (max(self.prefix, 0) << 16) | d
            self.above += above_in
            if shift == DIGIT_SHIFTS[0] and self.cache and total[d] <= self._collectable:
                self._bucket = int(total[d])  # its keys fit the granted memory: collect them in one pass
                at = self.passes.index(f"hist{shift}") + 1
                self.passes[at:] = ["collect"] + [p for p in self.passes[at:] if p not in HIST_PASSES]
            return
        self._drop_after(f"hist{shift}", HIST_PASSES)

    @property
    def _collectable(self) -> int:
        """The keys one collect pass may hold per thread: a sixteenth of the tensor."""
        return -(-self.ctx.numel // 16)

    @property
    def cache_bytes(self) -> int:
        """Per thread, room for the keys of one top-16-bit bucket (up to `_collectable`):
        then one collect pass replaces three more histogram passes."""
        return self.ctx.threads * 8 * (self._collectable + 1) if self.selecting else 0

    def _end_collect(self) -> None:
        """The k-th largest key among the collected bucket (the (need)-th from its top):
        the threshold t, how many keys above it (kept) and how many equal it (tm, of which
        tq are kept)."""
        counts = self._nan[:, 0]
        keys = np.sort(np.concatenate([self._found[i, :counts[i]] for i in range(len(counts))]))[::-1]
        self._found = self._nan = None
        need = self.k - self.above
        t = int(keys[need - 1])
        larger = int(np.searchsorted(-keys, -t, side="left"))  # keys > t (keys descending)
        equal = int(np.searchsorted(-keys, -t, side="right")) - larger
        self.t, self.tq, self.tm = t, need - larger, equal

    def _drop_after(self, current: str, names) -> None:
        """Remove the passes `names` that would follow the pass now ending."""
        at = self.passes.index(current) + 1
        self.passes[at:] = [p for p in self.passes[at:] if p not in names]

    def _set_weights(self) -> None:
        """omega_i = fl32(q_i / Q) with Q = ((0 + q_0) + q_1) + ..., or fl32(1/N) if Q == 0."""
        Q = 0.0
        for qi in self.q:
            Q = Q + qi
        N = self.ctx.n_models
        self.weights = np.array([1.0 / N if Q == 0 else qi / Q for qi in self.q], np.float64).astype(np.float32)

    def stats(self) -> dict:
        n = self.ctx.numel
        return {"selected": self.k / n if n else 1.0,
                "models": [{"omega": float(w)} for w in self.weights]}


_NO_HIST = np.zeros((0, 0), np.int64)
_NO_COUNT = np.zeros(0, np.int64)


def _warn(global_params: dict, model_params: list[dict], models: list[str]) -> list[str]:
    if global_params["select_topk"] <= 0:
        return [f"select_topk {global_params['select_topk']} <= 0 drops every task vector: the merge is the base"]
    return []


METHOD = register(Method(
    name="sce",
    title="SCE",
    paper="https://arxiv.org/abs/2408.07990",
    summary="keep the elements whose task vectors vary most across models, weight each model by its "
            "share of the squared deltas, elect a sign per element and average the agreeing deltas",
    base="required",
    model_params=(),
    global_params=(Param("select_topk", 1.0, number,
                         "fraction of the elements with the highest variance across models kept (1 keeps all)"),),
    driver=SceDriver,
    stats=SCE_STATS,
    example="npmerge sce BASE FT1 FT2 FT3 --select-topk 0.5 -o OUT",
    warn=_warn,
    warmup_variants=({"select_topk": 0.5},),
))

"""Driver of the task-arithmetic family: TIES, task arithmetic, linear, DARE, breadcrumbs
and DELLA are one parameterised family (docs/semantics.md, docs/semantics.md §B): a sparsifier per
model, then weights, an optional sign consensus, normalize and lambda.

The kernels (kernels/family.py) know the loops; this module knows the policy: which
elements each model's sparsifier keeps (a rank range of |tau|, or a random mask), which
passes a tensor needs, the exact boundary values between passes, the l1 rescale factors.

Passes: `hist_hi` and, only when it does not settle a boundary, `hist_lo` (exact values
at the boundary ranks of magnitude/outlier selection); `sums` (sum |tau| and sum |kept
tau| per model, for the l1 rescale); `merge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import constants, kernels
from ..errors import RecipeError, shown
from ..reduction import combine_lanes, exact_sum
from .protocol import Driver, Span, Stat, TensorContext
from .registry import Param, boolean, choice

_CONSENSUS = {None: 0, "sum": 1, "count": 2}
SPARSIFIERS = (None, "magnitude", "outliers", "random", "della")

TIES_STATS = (
    Stat("kept", "kept"),
    Stat("excluded", "excluded by vote", total="ratio", num="excluded_count", den="kept_nonzero"),
    Stat("sign_conflict", "sign conflicts", per_model=False),
)
KEPT_STATS = (Stat("kept", "kept"),)
RESCALE_STAT = Stat("rescale", "rescale", fmt="number")  # only where an l1 rescale multiplied


def keep_count(density: float, n: int) -> int:
    """k = floor(density * n), the product in float64 (docs/semantics.md §A "Counts")."""
    return n if density >= 1.0 else min(n, math.floor(float(density) * n))


@dataclass
class ModelPlan:
    """What one model's sparsifier does in one tensor (kinds as kernels/family.py)."""

    kind: str  # "all", "none", "rank", "random", "della"
    lo: int = 0  # rank: keep the elements of descending rank lo..hi-1 by |tau|
    hi: int = 0
    rho: float = 1.0
    p_a: float = 0.0  # della: p = p_a + (p_b * (r - 1)) / (C - 1)
    p_b: float = 0.0
    rescale: str = "none"  # "none", "l1" (factor after the sums pass), "factor", "inverse"
    factor: float = 1.0


def plan_model(sparsifier: str | None, params: dict, n: int, row: int, rescale: Any) -> ModelPlan:
    """A model's sparsifier for a tensor of n elements with rows of `row` (docs/semantics.md §A, B).

    density >= 1 (or no sparsifier) keeps the task vector untouched, density 0 drops it;
    rescale True is l1, "inverse" multiplies by fl32(1/p)."""
    rho = float(params.get("density", 1.0))
    if sparsifier is None or rho >= 1.0:
        return ModelPlan("all")
    if sparsifier in ("magnitude", "outliers"):
        k = keep_count(rho, n)
        m = min(keep_count(float(params.get("gamma", 0.0)), n), n - k) if sparsifier == "outliers" else 0
        plan = ModelPlan("none" if k == 0 else "all" if k == n else "rank", lo=m, hi=m + k, rho=rho)
    elif rho == 0.0:
        plan = ModelPlan("none")
    elif sparsifier == "random" or row == 1:  # DELLA with rows of one element: p = rho
        plan = ModelPlan("random", rho=rho)
    else:
        eps = float(params["epsilon"])
        plan = ModelPlan("della", rho=rho, p_a=rho - eps, p_b=2.0 * eps)
    if plan.kind in ("all", "none") or rescale is False:
        return plan
    if rescale is True:
        plan.rescale = "l1"
    elif plan.kind == "random":  # inverse with a constant p
        plan.rescale, plan.factor = "factor", float(np.float32(1.0 / rho))
    elif plan.kind == "della":
        plan.rescale = "inverse"
    else:
        raise ValueError(f"rescale {rescale!r} needs a keep probability, not a rank selection")
    return plan


class FamilyDriver(Driver):
    """One tensor of a task-arithmetic-family method.

    `sparsifier`: None, "magnitude" (TIES trim), "outliers" (breadcrumbs), "random"
    (DARE) or "della"; `consensus`: the method's sign election (None: every model agrees).
    Normalizing divides by the sum of the agreeing weights; where that is 0 (with a
    consensus), or below 1e-8 in magnitude (without), by 1."""

    def __init__(self, ctx: TensorContext, *, sparsifier: str | None, consensus: str | None):
        super().__init__(ctx, [])
        if sparsifier not in SPARSIFIERS:
            raise ValueError(f"unknown sparsifier {sparsifier!r}")
        n = ctx.numel
        g = ctx.params
        self.sparsifier = sparsifier
        self.weights = np.array([p["weight"] for p in ctx.model_params], np.float32)
        self.consensus = _CONSENSUS[g.get("consensus", consensus) if consensus else None]
        self.normalize = bool(g.get("normalize", False))
        self.eps = 0.0 if consensus else 1e-8
        self.lam = np.float32(g.get("lambda", 1.0))
        self.seed = np.uint64(g.get("seed", 0))
        row = ctx.rows[1]
        self.plans = [plan_model(sparsifier, p, n, row, g.get("rescale", False)) for p in ctx.model_params]
        self.bounds = [self._boundary_ranks(p, n) for p in self.plans]  # [(side, rank)] per model
        ranks = any(self.bounds)
        l1 = any(p.rescale == "l1" for p in self.plans)
        # end_pass("hist_hi") drops "hist_lo" when the high bits settled every boundary.
        self.passes = (["hist_hi", "hist_lo"] if ranks else []) + (["sums"] if l1 else []) + ["merge"]
        self.whole_rows = row if any(p.kind == "della" for p in self.plans) else 0
        self.counts = np.zeros(1 + 3 * ctx.n_models, np.int64)
        kinds = {p.kind for p in self.plans}  # which merge kernel: a method compiles only its own
        self.kernel = ("plain" if kinds <= {"all"} and self.consensus == 0 else "della" if "della" in kinds
                       else "random" if "random" in kinds else "rank")
        self.sel = None  # the kernels' SELECT table, built on the first feed
        self._scratch = None  # per thread: (family.Scratch, family.RowScratch or None)
        self._kept_bits = None  # DELLA: the sums pass's masks, one bit per element and model (cache)
        self._counts = None
        self._hist = None
        self._lanes = None
        self._found: dict[tuple[int, int], tuple[int, int, int]] = {}  # (model, side) -> (t, greater, m)
        self._pending: list[tuple[int, int, int, int, int]] = []  # (model, side, rank, slot, above)
        self._slots: list[tuple[int, int]] = []  # (model, bucket) the low-bits pass histograms

    @staticmethod
    def _boundary_ranks(plan: ModelPlan, n: int) -> list[tuple[int, int]]:
        """The ranks whose values a rank selection needs: side 0 the upper boundary (rank
        lo, when the largest are dropped), side 1 the lower one (rank hi - 1)."""
        if plan.kind != "rank":
            return []
        return ([(0, plan.lo)] if plan.lo > 0 else []) + ([(1, plan.hi - 1)] if plan.hi < n else [])

    @property
    def k(self) -> list[int]:
        """Elements each model's rank selection keeps (every element for the others)."""
        return [p.hi - p.lo if p.kind == "rank" else 0 if p.kind == "none" else self.ctx.numel for p in self.plans]

    # The lower boundary (TIES's trim threshold): magnitude bits, tied elements kept, tied elements.
    tbits = property(lambda self: self.sel["t_lo"])
    tq = property(lambda self: self.sel["q_lo"])
    tm = property(lambda self: self.sel["m_lo"])

    def fuses_check(self, block: int) -> bool:
        """The histogram and merge kernels run the checks, on blocks that nest in the pass's
        grid (the sums pass's is the reduction grid; tests use other blocks); the rank
        merge kernel does not."""
        first = self.passes[0]
        if first == "hist_hi":
            return True
        grid = constants.BLOCK if first == "sums" else block
        return grid % block == 0 and self.kernel != "rank"

    def work_bytes(self, span: int) -> int:
        """Per-thread radix histograms of the exact selection (the larger, low-bits one),
        the l1 rescale's lane sums per reduction block, per-thread random-mask and DELLA
        row buffers."""
        t, nm = self.ctx.threads, self.ctx.n_models
        need = 0
        boundaries = sum(len(b) for b in self.bounds)
        if boundaries:
            need += t * max(nm, boundaries) * (1 << 16) * 8
            need += 4 * span  # the merge pass's list of pending (tied) elements
        if "sums" in self.passes:
            need += 2 * nm * -(-self.ctx.numel // constants.BLOCK) * 8 * 8
        if any(p.kind in ("random", "della") for p in self.plans):
            need += t * constants.BLOCK * (1 + 4 + 8)
        if self.whole_rows:  # a row of the model and of the base, magnitudes, order, the sort's copies
            need += t * (self.whole_rows * (4 + 4 + 4 + 8 + 4 + 8) + 3 * 2048 * 8)
        return need

    def kernel_for(self, pass_name: str) -> str:
        if pass_name.startswith("hist"):
            return "family.hist"
        return f"family.{'sums' if pass_name == 'sums' else 'merge'}_{self.kernel}"

    @property
    def cache_bytes(self) -> int:
        """DELLA with the l1 rescale ranks every row twice (sums, merge) unless the sums
        pass keeps its masks: one bit per element and model, where the budget has room."""
        if self.kernel == "della" and "sums" in self.passes:
            return self.ctx.n_models * -(-self.ctx.numel // 8)
        return 0

    # -- passes ----------------------------------------------------------------
    def _table(self) -> np.ndarray:
        """The kernels' SELECT record per model (rank boundaries filled in by end_pass)."""
        if self.sel is None:
            k = kernels.load("masks")
            kinds = {"all": k.KEEP_ALL, "none": k.DROP_ALL, "rank": k.RANK, "random": k.RANDOM, "della": k.DELLA}
            scales = {"none": k.SCALE_NONE, "l1": k.SCALE_NONE, "factor": k.SCALE_FACTOR,
                      "inverse": k.SCALE_INVERSE}
            sel = np.zeros(self.ctx.n_models, k.SELECT)
            sel["t_hi"], sel["t_lo"] = k.NO_TOP, k.NO_BOTTOM
            for i, p in enumerate(self.plans):
                s = sel[i]
                s["kind"], s["rescale"], s["factor"] = kinds[p.kind], scales[p.rescale], p.factor
                if p.kind == "none":  # boundaries that keep nothing (rank kernels read only these)
                    s["t_lo"] = k.NO_TOP
                s["l1"] = p.rescale == "l1"
                if p.kind in ("random", "della"):
                    s["stream"] = kernels.load("philox").stream(self.ctx.name, self.ctx.stream_index[i])
                    s["below"] = math.ceil(p.rho * 2.0**24)  # u < rho  <=>  u * 2**24 < ceil(rho * 2**24)
                    s["row"], s["p_a"], s["p_b"] = self.ctx.rows[1], p.p_a, p.p_b
            self.sel = sel
        return self.sel

    def feed(self, pass_name: str, span: Span) -> int:
        k = kernels.load("family")
        sel = self._table()
        nm = self.ctx.n_models
        if self._scratch is None:
            C = self.whole_rows
            self._scratch = [(k.scratch(nm, span.block), k.row_scratch(C) if C else None)
                             for _ in range(self.ctx.threads)]
            self._counts = np.zeros((self.ctx.threads, 2 + 3 * nm), np.int64)
        if pass_name in ("merge", "sums"):
            return self._merge(k, sel, span, pass_name == "sums")
        if self._hist is None:
            shape = (nm, 2 * k.HI_BUCKETS) if pass_name == "hist_hi" else (len(self._slots), k.LO_BUCKETS)
            self._hist = np.zeros((self.ctx.threads, *shape), np.int64)
        active = np.array([bool(b) for b in self.bounds], np.bool_)
        models, buckets = ((np.array(c, np.int64) for c in zip(*self._slots)) if pass_name == "hist_lo" and self._slots
                           else (_NONE, _NONE))
        span.run(lambda a, z, t: k.hist(span.inp, a, z, span.block, *span.checks(t), active, models, buckets,
                                        self._hist[t], self._scratch[t][0]))
        return 0

    def _merge(self, k, sel, span: Span, l1: bool) -> int:
        """The merge pass, or (l1) the sums pass of the l1 rescale, over one span; return
        the merge pass's count of Inf/NaN outputs."""
        nm = self.ctx.n_models
        if l1 and self._lanes is None:
            self._lanes = np.zeros((2, nm, -(-self.ctx.numel // constants.BLOCK), 8), np.float64)
        # the sums pass runs on the reduction grid (docs/semantics.md §A), the merge pass on blocks
        grid = constants.BLOCK if l1 else span.block
        counts = self._counts
        counts[:] = 0
        m = k.MergeArgs(self.weights, self.consensus, self.normalize, self.eps, self.lam)
        sc = [s for s, _ in self._scratch]
        rs = [r for _, r in self._scratch]
        inp, out, lo, block, lanes, seed = span.inp, span.out, span.lo, span.block, self._lanes, self.seed
        if self.kernel == "rank":
            self._merge_rank(k, sel, span, grid, l1, m)
        elif self.kernel == "plain":
            span.run(lambda a, z, t: k.merge_plain(inp, out, lo, a, z, block, *span.checks(t), m, counts[t], sc[t]))
        elif self.kernel == "random" and l1:
            span.run(lambda a, z, t: k.sums_random(inp, a, z, block, grid, *span.checks(t), sel, seed, lanes, sc[t]),
                     grid)
        elif self.kernel == "random":
            span.run(lambda a, z, t: k.merge_random(inp, out, lo, a, z, block, *span.checks(t), sel, seed, m,
                                                    counts[t], sc[t]))
        elif l1:
            if self.cache and self._kept_bits is None:
                self._kept_bits = np.zeros((nm, -(-self.ctx.numel // 8)), np.uint8)
            bits = self._kept_bits if self._kept_bits is not None else _NO_BITS
            span.run(lambda a, z, t: k.sums_della(inp, a, z, block, grid, *span.checks(t), sel, seed, bits, lanes,
                                                  sc[t], rs[t]), grid)
        else:
            bits = self._kept_bits if self._kept_bits is not None else _NO_BITS
            span.run(lambda a, z, t: k.merge_della(inp, out, lo, a, z, block, *span.checks(t), sel, seed, bits, m,
                                                   counts[t], sc[t], rs[t]))
        if not l1:
            self.counts += counts[:, :-1].sum(axis=0)
        return int(counts[:, -1].sum())

    def _merge_rank(self, k, sel, span: Span, grid: int, l1: bool, m) -> None:
        """Rank selection with thinned boundary ties. The sums pass counts each piece's
        ties first (count_ties) and thins inline; the merge pass leaves tied elements
        pending and merges them per piece afterwards (fixup_rank). Both thin from each
        piece's first tie ordinals: the running ordinals in sel plus the ties of the
        pieces before it."""
        nm = self.ctx.n_models
        thin = kernels.load("masks").thins(sel)
        ps = span.pieces(grid)
        piece = {p: i for i, p in enumerate(ps)}
        ties = np.zeros((len(ps), nm, 2), np.int64)
        sc = [s for s, _ in self._scratch]
        inp, out, lo, block, counts = span.inp, span.out, span.lo, span.block, self._counts
        if l1:
            thin[~sel["l1"]] = False  # models the sums pass skips
            if thin.any():
                span.run(lambda a, z, t: k.count_ties(inp, a, z, block, sel, thin, ties[piece[a, z]], sc[t]), grid)
            rem = self._remainders(sel, thin, ties)
            span.run(lambda a, z, t: k.sums_rank(inp, a, z, block, grid, sel, thin, rem[piece[a, z]], self._lanes,
                                                 sc[t]), grid)
            return
        pending = np.empty(span.hi - span.lo, np.int32)  # each piece lists its own in its part
        zero = np.zeros((nm, 2), np.int64)
        listed = span.run(lambda a, z, t: k.merge_rank(inp, out, lo, a, z, block, sel, thin, zero,
                                                       pending[a - lo:z - lo], ties[piece[a, z]], False, m, counts[t],
                                                       sc[t]), grid)
        if thin.any():
            rem = self._remainders(sel, thin, ties)
            span.run(lambda a, z, t: k.merge_rank(inp, out, lo, a, z, block, sel, thin, rem[piece[a, z]],
                                                  pending[a - lo:a - lo + listed[piece[a, z]]], ties[0], True, m,
                                                  counts[t], sc[t]), grid)

    @staticmethod
    def _remainders(sel: np.ndarray, thin: np.ndarray, ties: np.ndarray) -> np.ndarray:
        """Per piece, model and side the thinning remainder r = j * q mod m at the piece's
        first tie ordinal j: the running ordinal in sel (j_hi, j_lo) plus the ties of the
        pieces before it. The running ordinals advance past the span."""
        first = np.stack([sel["j_hi"], sel["j_lo"]], axis=1)
        starts = first + np.cumsum(ties, axis=0) - ties
        sel["j_hi"], sel["j_lo"] = (first + ties.sum(axis=0)).T
        q = np.stack([sel["q_hi"], sel["q_lo"]], axis=1)
        m = np.where(thin, np.stack([sel["m_hi"], sel["m_lo"]], axis=1), 1)
        rem = np.zeros_like(starts)
        for p, i, side in zip(*np.nonzero(np.broadcast_to(thin, starts.shape))):
            rem[p, i, side] = int(starts[p, i, side]) * int(q[i, side]) % int(m[i, side])  # Python ints: exact
        return rem

    def release(self) -> None:
        self._scratch = self._kept_bits = self._counts = self._hist = self._lanes = None

    def end_pass(self, pass_name: str) -> None:
        """hist_hi: each boundary's value, or the bucket the low-bits pass must resolve;
        hist_lo: the rest; then the rank tables. sums: the l1 rescale factors."""
        if pass_name == "merge":
            return
        if pass_name == "sums":
            self._rescale_factors()
            return
        hist = self._hist.sum(axis=0) if self._hist is not None else None
        self._hist = None
        if pass_name == "hist_hi":
            if hist is not None:
                split = hist.reshape(self.ctx.n_models, -1, 2)  # [..., 0]: low bits zero, [..., 1]: not
                for i, bounds in enumerate(self.bounds):
                    for side, rank in bounds:
                        self._locate_bucket(i, side, rank, split[i].sum(axis=1), split[i, :, 1])
            if not self._pending:
                self.passes.remove("hist_lo")
                self._fill_ranks()
            return
        for i, side, rank, slot, above in self._pending:
            lo, above_in_bucket = locate(hist[slot], rank + 1 - above)
            bucket = self._slots[slot][1]
            self._found[i, side] = ((bucket << 16) | lo, above + above_in_bucket, int(hist[slot, lo]))
        self._fill_ranks()

    def _locate_bucket(self, i: int, side: int, rank: int, hist: np.ndarray, nonzero_lo: np.ndarray) -> None:
        """After the high-bits pass: the bucket holding model i's element of descending
        rank `rank` (the (rank+1)-th largest magnitude).

        Within that bucket the elements with non-zero low bits are all larger than the
        bucket's floor value (bucket << 16), which the others equal. If the wanted one lies
        beyond the former, it is the floor: value and group are known now. Otherwise the
        low-bits pass histograms the bucket (one slot per model and bucket)."""
        bucket, above = locate(hist, rank + 1)
        larger = int(nonzero_lo[bucket])
        if rank + 1 - above > larger:
            self._found[i, side] = (bucket << 16, above + larger, int(hist[bucket]) - larger)
            return
        if (i, bucket) not in self._slots:
            self._slots.append((i, bucket))
        self._pending.append((i, side, rank, self._slots.index((i, bucket)), above))

    def _fill_ranks(self) -> None:
        """Each boundary group's value, and how many of its elements the rank range keeps:
        a group of m equal values of descending ranks [g, g + m) keeps |that ∩ [lo, hi)|."""
        for (i, side), (t, greater, m) in self._found.items():
            plan = self.plans[i]
            q = min(plan.hi, greater + m) - max(plan.lo, greater)
            s = self.sel[i]
            if side == 0:
                s["t_hi"], s["q_hi"], s["m_hi"] = t, q, m
            else:
                s["t_lo"], s["q_lo"], s["m_lo"] = t, q, m

    def _rescale_factors(self) -> None:
        """r = sum |tau| / sum |kept tau| by the reduction rule; skipped if either < 1e-7."""
        lanes = self._lanes
        self._lanes = None
        blocks = combine_lanes(lanes)
        scale_factor = kernels.load("masks").SCALE_FACTOR
        for i, p in enumerate(self.plans):
            if p.rescale != "l1":
                continue
            before, after = exact_sum(blocks[0, i]), exact_sum(blocks[1, i])
            if not (before < 1e-7 or after < 1e-7):
                p.factor = float(np.float32(before / after))
                self.sel[i]["rescale"], self.sel[i]["factor"] = scale_factor, p.factor
        self.sel["j_hi"] = 0  # tie ordinals restart in the merge pass
        self.sel["j_lo"] = 0

    # -- results -----------------------------------------------------------------
    def stats(self) -> dict:
        """Kept fractions (counted), the sign vote where there is one (docs/semantics.md), and
        the l1 rescale factor where one multiplied; task arithmetic and linear have none."""
        nm = self.ctx.n_models
        if self.sparsifier is None:
            return {"models": [{} for _ in range(nm)]}
        n = max(self.ctx.numel, 1)
        models = [{"kept": int(self.counts[1 + 3 * i]) / n} for i in range(nm)]
        out: dict = {}
        if self.consensus:
            out["sign_conflict"] = int(self.counts[0]) / n
            for i, m in enumerate(models):
                m["kept_nonzero"] = int(self.counts[2 + 3 * i])
                m["excluded_count"] = int(self.counts[3 + 3 * i])
                m["excluded"] = m["excluded_count"] / m["kept_nonzero"] if m["kept_nonzero"] else 0.0
        for i, p in enumerate(self.plans):
            if p.rescale == "l1" and self.sel is not None and self.sel[i]["rescale"]:  # applied
                models[i]["rescale"] = p.factor
        out["models"] = models
        return out


_NO_LANES = np.zeros((2, 0, 0, 8), np.float64)
_NONE = np.zeros(0, np.int64)
_NO_BITS = np.zeros((0, 0), np.uint8)


def locate(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bucket of a radix histogram holding the k-th largest element, and how many lie
    above it (the exact rank selection of TIES, breadcrumbs and SCE)."""
    from_top = np.cumsum(hist[::-1])
    pos = int(np.searchsorted(from_top, k))  # first bucket (from the top) where the count reaches k
    bucket = len(hist) - 1 - pos
    return bucket, int(from_top[pos] - hist[bucket])


def driver(**config):
    """A Method's driver factory: FamilyDriver with this method's fixed configuration."""
    def make(ctx: TensorContext) -> FamilyDriver:
        return FamilyDriver(ctx, **config)
    return make


# -- the family's parameters and checks -------------------------------------------------
_RESCALE = {True: True, "true": True, "l1": True, False: False, "false": False, "inverse": "inverse"}


def rescale_check(inverse: bool):
    """`rescale`: true / l1 -> True, false -> False (YAML booleans and 0/1 too), and
    "inverse" where the method keeps elements with a probability."""
    options = ("true", "l1", "inverse", "false") if inverse else ("true", "l1", "false")

    def check(name: str, value: Any):
        if type(value) is int and value in (0, 1):
            value = bool(value)
        if value == "inverse" and not inverse:
            raise RecipeError(f"{name} 'inverse' needs a keep probability, but this method keeps elements by rank",
                              hint="use rescale: true (l1) or false")
        if isinstance(value, (bool, str)) and value in _RESCALE:
            return _RESCALE[value]
        raise RecipeError(f"{name} must be one of {', '.join(options)}, got {shown(value)}",
                          hint="true (= l1): scale kept deltas by sum|tau| / sum|kept tau|"
                               + ("; inverse: by 1/p" if inverse else "") + "; false: no rescale")
    check.options = options
    return check


def rescale_param(default: bool, inverse: bool) -> Param:
    return Param("rescale", default, rescale_check(inverse),
                 "scale the kept deltas back up: true/l1 by sum|tau| / sum|kept tau|"
                 + (", inverse by 1/p (the keep probability)" if inverse else "") + ", false not at all")


def normalize_param(default: bool) -> Param:
    return Param("normalize", default, boolean, "divide by the sum of (agreeing) weights")


CONSENSUS = Param("consensus", "sum", choice("sum", "count"), "sign election by weighted sum or by count")


def checks(*funcs):
    """A Method.check running several checks in order."""
    def check(global_params: dict, model_params: list[dict], models: list[str]) -> None:
        for f in funcs:
            f(global_params, model_params, models)
    return check


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

"""Drivers of the methods that reduce a tensor before they merge it: SLERP, NuSLERP and
Model Stock (docs/semantics.md §C). Pass "reduce" streams the inputs once and sums the products
the method needs (norms, dot products) exactly, per vector; `end_pass` turns the sums
into float32 coefficients (float64 math, Python's `math` for transcendentals, rounded
once, exactly as tests/reference.py); pass "merge" blends and encodes.

Vectors are the whole tensor, rows along the last axis, or columns (vectors along axis
0); a tensor with fewer than two dimensions is one vector.
"""

from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..constants import BLOCK, PIECE_BLOCKS
from .protocol import Driver, Span, Stat, TensorContext

FLAT, ROWS, COLUMNS = "flat", "rows", "columns"


class VectorSums:
    """Exact float64 sums of f64(x)*f64(y) over every vector, for a list of input pairs
    (slots: 0 the base, 1 + i model i; task vectors when `deltas`), in one streaming pass
    (docs/semantics.md §A). `result()` -> float64[npairs, nvec]."""

    def __init__(self, ctx: TensorContext, layout: str, pairs: list[tuple[int, int]], deltas: bool):
        self.ctx = ctx
        n, shape = ctx.numel, ctx.shape
        if layout != FLAT and (len(shape) < 2 or n == 0):
            layout = FLAT
        self.layout = layout
        self.deltas = deltas
        self.pa = np.array([a for a, _ in pairs], np.int64)
        self.pb = np.array([b for _, b in pairs], np.int64)
        if layout == COLUMNS:
            self.R, self.W = shape[0], n // shape[0]
            self.nvec, self.length = self.W, self.R
        else:
            self.C = n if layout == FLAT else shape[-1]
            self.C = max(self.C, 1)
            self.nvec, self.length = (1 if layout == FLAT else n // self.C), self.C
        self._sums = None
        self._buffers = None  # per thread: kernels.reduce.Scratch

    @staticmethod
    def nbytes(ctx: TensorContext, layout: str, npairs: int) -> int:
        """Accumulators of a tensor: block sums, running lanes, results (and the scratch
        arrays of the coefficient computation, ~8 float64 per vector)."""
        probe = VectorSums(ctx, layout, [(0, 0)] * npairs, False)
        blocks = probe.nvec * -(-probe.length // BLOCK)
        lanes = 8 * probe.nvec if probe.layout == COLUMNS else 16
        return 8 * (npairs * (blocks + lanes + probe.nvec) + 8 * probe.nvec)

    def feed(self, span: Span) -> None:
        k = kernels.load("reduce")
        npairs, block, threads = len(self.pa), span.block, span.workers.threads
        if self._sums is None:
            nbr = -(-self.length // block)
            self._sums = np.zeros((npairs, self.nvec * nbr), np.float64)
            self._carry = [np.zeros((npairs, 8), np.float64) for _ in range(2)]
            if self.layout == COLUMNS:
                self._lanes = np.zeros((npairs, 8, self.W), np.float64)
        nm = len(span.inp[3]) - 1
        if self.layout == COLUMNS:
            # Column ranges the threads take: enough to share, none wider than a block.
            chunks = max(-(-self.W // block), min(4 * threads, self.W // 64), 1)
            sc = self._scratch(k, nm, -(-self.W // chunks), threads)
            ranges = _ranges(chunks, max(1, chunks // (4 * threads)))
            span.workers.run(lambda p, t: k.column_sums(span.inp, self.deltas, span.lo, span.hi, block, self.R, self.W,
                                                        chunks, *ranges[p], self.pa, self.pb, self._lanes, self._sums,
                                                        sc[t]), len(ranges))
            return
        carry_in, carry_out = self._carry
        carry_out[:] = 0.0
        items = row_items(span.lo, span.hi, self.C, block)
        sc = self._scratch(k, nm, block, threads)
        ranges = _ranges(int(items[-1]), PIECE_BLOCKS)
        span.workers.run(lambda p, t: k.row_sums(span.inp, self.deltas, span.lo, span.hi, block, self.C, items,
                                                 *ranges[p], self.pa, self.pb, carry_in, carry_out, self._sums, sc[t]),
                         len(ranges))
        self._carry.reverse()  # this span's unfinished lanes continue in the next

    def release(self) -> None:
        self._sums = self._buffers = None
        self._carry = self._lanes = None

    def _scratch(self, k, nm: int, cap: int, threads: int) -> list:
        if self._buffers is None or self._buffers[0].rows.shape[1] < cap:
            self._buffers = [k.scratch(nm, cap, wide=True) for _ in range(threads)]
        return self._buffers

    def result(self) -> np.ndarray:
        """float64[npairs, nvec]: each vector's block sums added exactly (math.fsum)."""
        npairs = len(self.pa)
        if self._sums is None:  # an empty tensor: every sum is +0
            return np.zeros((npairs, self.nvec), np.float64)
        blocks = self._sums.reshape(npairs * self.nvec, -1)
        self._sums = None
        if blocks.shape[1] == 1:
            return blocks.reshape(npairs, self.nvec).copy()
        out = np.empty(npairs * self.nvec, np.float64)
        kernels.load("reduce").exact_rows(blocks, out)
        return out.reshape(npairs, self.nvec)


def row_items(lo: int, hi: int, C: int, block: int) -> np.ndarray:
    """The work items of elements lo..hi for sums over vectors of C consecutive elements
    (kernels.reduce.row_sums): (k0, k1, g, head_end, tail_start, count) — a head piece up
    to the first row block that starts in the span, groups of g whole row blocks k0..k1
    (several short rows per group), a tail piece from the last row block that ends beyond."""
    nbr = -(-C // block)

    def start(k):
        return (k // nbr) * C + (k % nbr) * block

    r = lo // C
    j = -(-(lo - r * C) // block)
    if j >= nbr:
        r, j = r + 1, 0
    k0 = r * nbr + j
    r = hi // C
    k1 = max(k0, r * nbr + (hi - r * C) // block)
    head_end = min(hi, start(k0))
    tail_start = max(head_end, start(k1))
    g = max(1, block // C) if nbr == 1 else 1
    return np.array([k0, k1, g, head_end, tail_start, -(-(k1 - k0) // g) + 2], np.int64)


def _ranges(count: int, size: int) -> list[tuple[int, int]]:
    """0..count in ranges of `size` (the work items one call of a kernel takes)."""
    return [(i, min(count, i + size)) for i in range(0, count, size)]


def slerp_coefficients(c: float, t: float) -> tuple[float, float]:
    """theta = acos(c); (sin((1 - t) theta) / sin theta, sin(t theta) / sin theta)."""
    theta = math.acos(c)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


class BlendDriver(Driver):
    """Reduce, compute one coefficient pair per vector, blend. Subclasses give the pairs
    to sum, the vector layout, the blend op and `coefficients(sums) -> (ca, cb)`."""

    op = ""  # the kernels.reduce blend operation, by name (kernels load lazily)
    reduce_deltas = False

    def __init__(self, ctx: TensorContext, layout: str, pairs: list[tuple[int, int]]):
        super().__init__(ctx, ["reduce", "merge"])
        self.sums = VectorSums(ctx, layout, pairs, self.reduce_deltas)
        self.npairs = len(pairs)
        self.ca = self.cb = np.zeros(0, np.float32)  # each vector's coefficients, after the reduce pass
        self._buffers = None  # per thread: kernels.reduce.Scratch

    def work_bytes(self, span: int) -> int:
        """Accumulators and coefficients, and the kernel's per-thread float64 copies of a
        block of every input and per-element coefficients (beyond budget.kernel_bytes)."""
        per_thread = BLOCK * (8 * (self.ctx.n_models + 1) + 8)
        return VectorSums.nbytes(self.ctx, self.sums.layout, self.npairs) + 8 * self.sums.nvec + \
            self.ctx.threads * per_thread

    def kernel_for(self, pass_name: str) -> str:
        if pass_name == "merge":
            return "reduce.blend"
        return "reduce.column_sums" if self.sums.layout == COLUMNS else "reduce.row_sums"

    def feed(self, pass_name: str, span: Span) -> int:
        if pass_name == "reduce":
            self.sums.feed(span)
            return 0
        k = kernels.load("reduce")
        s = self.sums
        per_col = s.layout == COLUMNS
        op, W = getattr(k, self.op), s.W if per_col else s.C
        if self._buffers is None:
            self._buffers = [k.scratch(self.ctx.n_models, span.block, coef=True) for _ in range(span.workers.threads)]
        sc = self._buffers
        return sum(span.run(lambda a, z, t: k.blend(span.inp, span.out, op, span.lo, a, z, span.block, W, per_col,
                                                    self.ca, self.cb, sc[t])))

    def release(self) -> None:
        self.sums.release()
        self._buffers = None

    def end_pass(self, pass_name: str) -> None:
        if pass_name == "reduce":
            self.vector_sums = self.sums.result()  # float64[npairs, nvec]: the norms and dot products reduced
            with np.errstate(all="ignore"):  # IEEE results are the defined results
                ca, cb = self.coefficients(self.vector_sums)
            self.ca = np.ascontiguousarray(ca, np.float32).reshape(-1)
            self.cb = np.ascontiguousarray(cb, np.float32).reshape(-1)

    def coefficients(self, sums: np.ndarray):
        raise NotImplementedError


# -------------------------------------------------------------------- SLERP

SLERP_STATS = (
    Stat("theta", "θ", per_model=False, fmt="degrees"),
    Stat("lerped", "lerped tensors", per_model=False, total="ratio", num="lerped_count", den="tensor_count"),
)


class SlerpDriver(BlendDriver):
    """SLERP of v0 = base and v1 = the model over the flattened tensor (docs/semantics.md §C)."""

    op = "SLERP"

    def __init__(self, ctx: TensorContext):
        super().__init__(ctx, FLAT, [(0, 0), (1, 1), (0, 1)])
        self.t = float(ctx.params["t"])
        self.theta = 0.0
        self.lerped = False

    def coefficients(self, sums):
        s00, s11, s01 = (float(x) for x in sums[:, 0])
        n0, n1 = math.sqrt(s00), math.sqrt(s11)
        n0 = 1.0 if n0 <= 1e-8 else n0
        n1 = 1.0 if n1 <= 1e-8 else n1
        c = min(max(s01 / (n0 * n1), -1.0), 1.0)
        t = self.t
        self.theta = math.degrees(math.acos(c))
        self.lerped = abs(c) > 0.9995
        if self.lerped:
            return [1.0 - t], [t]
        c0, c1 = slerp_coefficients(c, t)
        return [c0], [c1]

    def stats(self) -> dict:
        return {"theta": self.theta, "lerped": float(self.lerped), "lerped_count": int(self.lerped),
                "tensor_count": 1, "models": [{}]}


# -------------------------------------------------------------------- NuSLERP

NUSLERP_STATS = (
    Stat("t", "t", per_model=False, fmt="number"),
    Stat("theta", "mean θ", per_model=False, fmt="degrees"),
    Stat("lerped", "lerped vectors", per_model=False, total="ratio", num="lerped_count", den="vector_count"),
)


def nuslerp_t(w0: float, w1: float) -> float:
    """t = w1 / (w0 + w1) in float64 from the weights as given, 0.5 if |w0 + w1| < 1e-6."""
    s = float(w0) + float(w1)
    return 0.5 if abs(s) < 1e-6 else float(w1) / s


class NuslerpDriver(BlendDriver):
    """NuSLERP of two models' task vectors (or the models, without a base), per vector."""

    op = "NUSLERP"

    def __init__(self, ctx: TensorContext):
        self.reduce_deltas = ctx.has_base
        g = ctx.params
        layout = FLAT if g["nuslerp_flatten"] else COLUMNS if g["nuslerp_row_wise"] else ROWS
        super().__init__(ctx, layout, [(1, 1), (2, 2), (1, 2)])
        self.t = nuslerp_t(ctx.model_params[0]["weight"], ctx.model_params[1]["weight"])
        self._stats = {}

    def coefficients(self, sums):
        t = self.t
        n0, n1 = np.sqrt(sums[0]), np.sqrt(sums[1])
        c = sums[2] / (np.maximum(n0, 1e-7) * np.maximum(n1, 1e-7))
        c = np.minimum(np.maximum(c, -1.0), 1.0)
        lerp = 1.0 - c * c <= 1e-16
        ca = np.full(c.shape, 1.0 - t)
        cb = np.full(c.shape, t)
        for v in np.flatnonzero(~lerp):
            ca[v], cb[v] = slerp_coefficients(float(c[v]), t)
        thetas = [math.degrees(math.acos(x)) for x in c.tolist()] if c.size else [0.0]
        self._stats = {"t": t, "theta": math.fsum(thetas) / len(thetas), "lerped": float(lerp.mean()) if c.size else 0.0,
                       "lerped_count": int(lerp.sum()), "vector_count": int(c.size)}
        return ca, cb

    def stats(self) -> dict:
        return {**self._stats, "models": [{}, {}]}


# -------------------------------------------------------------------- Model Stock

STOCK_STATS = (Stat("t", "t (mean)", per_model=False, fmt="number"),)


class StockDriver(BlendDriver):
    """Model Stock: t from the mean pairwise cosine of the task vectors, per tensor or per
    row (`filter_wise`); result t*mean(M) + (1 - t)*B."""

    op = "STOCK"
    reduce_deltas = True

    def __init__(self, ctx: TensorContext):
        N = ctx.n_models
        self.pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
        norms = [(1 + i, 1 + i) for i in range(N)]
        dots = [(1 + i, 1 + j) for i, j in self.pairs]
        super().__init__(ctx, ROWS if ctx.params["filter_wise"] else FLAT, norms + dots)
        self.mean_t = 0.0

    def coefficients(self, sums):
        N = self.ctx.n_models
        norms = np.sqrt(sums[:N])
        acc = np.zeros(sums.shape[1], np.float64)
        for p, (i, j) in enumerate(self.pairs):
            cij = sums[N + p] / np.maximum(norms[i] * norms[j], 1e-6)
            acc = acc + np.minimum(np.maximum(cij, -1.0), 1.0)
        c = acc / len(self.pairs)
        den = 1.0 + (N - 1) * c
        t = np.where(np.abs(den) < 1e-6, 0.0, (N * c) / den)
        t32 = t.astype(np.float32)
        self.mean_t = float(t32.astype(np.float64).mean()) if t32.size else 0.0
        return t32, np.float32(1.0) - t32  # fl32(1 - t32): a float32 subtraction rounds the same

    def stats(self) -> dict:
        return {"t": self.mean_t, "models": [{} for _ in range(self.ctx.n_models)]}

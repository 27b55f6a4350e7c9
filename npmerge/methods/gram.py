"""Drivers of the methods that need only the Gram matrix of their inputs: Multi-SLERP and
the Karcher mean (docs/semantics.md §C).

Every vector these methods iterate on (the mean's direction, the tangent, the result) is
a linear combination Σ cᵢ vᵢ of the inputs, and every quantity they test (norms, dot
products, angles) follows from the Gram matrix Gᵢⱼ = ⟨vᵢ, vⱼ⟩. So pass "reduce" sums the
N(N+1)/2 products exactly in float64 (methods/reduce.py VectorSums, §A.1), `end_pass` runs
the method's algorithm on coefficient vectors over G in float64 (Python floats, math.fsum:
nothing depends on BLAS or threads), and pass "merge" writes fl32(B + Σ cᵢ·f64(vᵢ)) with
the float64 coefficients (kernels/reduce.py `combine`). mergekit iterates on float32
tensors instead, where the arccos of near-1 dot products drifts.
"""

from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..constants import BLOCK
from ..errors import IncompatibleModels
from .protocol import Driver, Span, Stat, TensorContext
from .reduce import FLAT, VectorSums

GRAM_STATS = (Stat("coefficient", "coefficient", fmt="number"),)
KARCHER_STATS = GRAM_STATS + (Stat("iterations", "iterations", per_model=False, fmt="number"),)


def quad(x: list[float], G: list[list[float]], y: list[float]) -> float:
    """xᵀ G y, the N² products added exactly (math.fsum)."""
    return math.fsum(x[i] * G[i][j] * y[j] for i in range(len(x)) for j in range(len(y)))


def mat_vec(G: list[list[float]], x: list[float]) -> list[float]:
    return [math.fsum(G[i][j] * x[j] for j in range(len(x))) for i in range(len(G))]


class GramSums:
    """Gᵢⱼ = ⟨vᵢ, vⱼ⟩ for every pair i ≤ j of the models (task vectors when `deltas`), summed
    exactly in float64 in one streaming pass (VectorSums, §A.1); `matrix()` once it is done."""

    def __init__(self, ctx: TensorContext, deltas: bool):
        n = ctx.n_models
        self.n = n
        self.pairs = [(i, j) for i in range(n) for j in range(i, n)]
        self.sums = VectorSums(ctx, FLAT, [(1 + i, 1 + j) for i, j in self.pairs], deltas)

    @staticmethod
    def nbytes(ctx: TensorContext) -> int:
        return VectorSums.nbytes(ctx, FLAT, ctx.n_models * (ctx.n_models + 1) // 2)

    def feed(self, span: Span) -> None:
        self.sums.feed(span)

    def matrix(self) -> list[list[float]]:
        G = [[0.0] * self.n for _ in range(self.n)]
        for (i, j), s in zip(self.pairs, self.sums.result()[:, 0].tolist()):
            G[i][j] = G[j][i] = s
        return G

    def release(self) -> None:
        self.sums.release()


class GramDriver(Driver):
    """Reduce the Gram matrix of the task vectors (with a base) or the models, compute one
    float64 coefficient per model (`coefficients(G)`, subclasses), combine."""

    def __init__(self, ctx: TensorContext):
        super().__init__(ctx, ["reduce", "merge"])
        self.sums = GramSums(ctx, ctx.has_base)
        self.coef = np.zeros(ctx.n_models, np.float64)
        self._buffers = None

    def work_bytes(self, span: int) -> int:
        """Accumulators, and the kernels' per-thread float64 copies of a block of every input."""
        return GramSums.nbytes(self.ctx) + self.ctx.threads * BLOCK * 8 * (self.ctx.n_models + 1)

    def kernel_for(self, pass_name: str) -> str:
        return "reduce.combine" if pass_name == "merge" else "reduce.row_sums"

    def feed(self, pass_name: str, span: Span) -> int:
        if pass_name == "reduce":
            self.sums.feed(span)
            return 0
        k = kernels.load("reduce")
        if self._buffers is None:
            self._buffers = [k.scratch(self.ctx.n_models, span.block, wide=True) for _ in range(span.workers.threads)]
        sc = self._buffers
        return sum(span.run(lambda a, z, t: k.combine(span.inp, span.out, span.lo, a, z, span.block, self.coef, sc[t])))

    def end_pass(self, pass_name: str) -> None:
        if pass_name != "reduce":
            return
        G = self.gram = self.sums.matrix()
        self.coef = np.array(self.coefficients(G), np.float64)

    def release(self) -> None:
        self.sums.release()
        self._buffers = None

    def coefficients(self, G: list[list[float]]) -> list[float]:
        raise NotImplementedError

    def stats(self) -> dict:
        return {"models": [{"coefficient": c} for c in self.coef.tolist()]}

    def refuse(self, what: str, hint: str) -> None:
        raise IncompatibleModels(f"{self.method} cannot merge tensor '{self.ctx.name}': {what}", hint=hint)


class MultislerpDriver(GramDriver):
    """Multi-SLERP (mergekit `multislerp`): the inputs projected on the unit sphere, their
    weighted mean, the tangent plane there, the weighted tangent mapped back, scaled by the
    weighted mean norm."""

    method = "multislerp"

    def coefficients(self, G):
        N = len(G)
        eps = float(self.ctx.params["eps"])
        weights = [float(p["weight"]) for p in self.ctx.model_params]
        if self.ctx.params["normalize_weights"]:
            total = math.fsum(weights)
            weights = [w / total for w in weights]  # a zero sum is refused by the method's check
        norms = [math.sqrt(G[i][i]) for i in range(N)]
        d = [n + eps for n in norms]
        U = [[G[i][j] / (d[i] * d[j]) for j in range(N)] for i in range(N)]  # Gram of uᵢ = vᵢ/(‖vᵢ‖ + eps)
        mean_norm = math.sqrt(max(quad(weights, U, weights), 0.0))
        if mean_norm < eps:
            if N == 2:  # mergekit's fallback: the weighted sum
                return weights
            self.refuse(f"the weighted mean of the unit inputs has norm {mean_norm:.3g} < eps = {eps:g} "
                        "(antipodal inputs whose weights balance out)",
                        "change the weights so that the inputs do not cancel")
        m = [w / mean_norm for w in weights]  # the mean direction, in uᵢ
        dots = mat_vec(U, m)
        wd = math.fsum(w * x for w, x in zip(weights, dots))
        tangent = [w - wd * x for w, x in zip(weights, m)]  # Σ wᵢ(uᵢ − dotsᵢ·mean)
        tn = math.sqrt(max(quad(tangent, U, tangent), 0.0)) + eps
        avg_norm = math.fsum(n * w for n, w in zip(norms, weights))
        r = [x * math.cos(tn) + y * (math.sin(tn) / tn) for x, y in zip(m, tangent)]
        return [avg_norm * ri / di for ri, di in zip(r, d)]


class KarcherDriver(GramDriver):
    """The Karcher (Riemannian) mean of the unit inputs with equal weights, scaled by the
    mean norm (mergekit `karcher`, its iteration and its `tol` tests as they are)."""

    method = "karcher"

    def __init__(self, ctx: TensorContext):
        super().__init__(ctx)
        self.iterations = 0

    def coefficients(self, G):
        N = len(G)
        tol, max_iter = float(self.ctx.params["tol"]), int(self.ctx.params["max_iter"])
        norms = [math.sqrt(G[i][i]) for i in range(N)]
        valid = [i for i in range(N) if norms[i] > tol]  # mergekit drops inputs of norm <= tol
        if not valid:
            self.refuse(f"every input has norm <= tol = {tol:g} (norms {', '.join(f'{n:.3g}' for n in norms)})",
                        "karcher needs at least one non-zero input per tensor; pass the tensor through, "
                        "or use a method with a base")
        K = len(valid)
        U = [[G[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]
        alpha = [1.0 / K] * K  # equal weights over the valid inputs
        mean = list(alpha)
        mn = math.sqrt(max(quad(mean, U, mean), 0.0))
        mean = [1.0] + [0.0] * (K - 1) if mn < tol else [x / mn for x in mean]
        self.iterations = 0
        for _ in range(max_iter):
            dots = [min(max(x, -1.0), 1.0) for x in mat_vec(U, mean)]
            tangent = [0.0] * K
            for k in range(K):
                theta = math.acos(dots[k])
                if theta < tol:
                    continue
                f = alpha[k] * (theta / math.sin(theta))
                for j in range(K):
                    tangent[j] += f * ((1.0 if j == k else 0.0) - dots[k] * mean[j])
            tn = math.sqrt(max(quad(tangent, U, tangent), 0.0))
            if tn < tol:
                break
            self.iterations += 1
            mean = [math.cos(tn) * x + math.sin(tn) * (y / tn) for x, y in zip(mean, tangent)]
            un = math.sqrt(max(quad(mean, U, mean), 0.0))
            if un > tol:
                mean = [x / un for x in mean]
        scale = math.fsum(n / N for n in norms)  # Σ (1/N)·‖vᵢ‖ over every input
        coef = [0.0] * N
        for k, i in enumerate(valid):
            coef[i] = scale * mean[k] / norms[i]
        return coef

    def stats(self) -> dict:
        return {**super().stats(), "iterations": self.iterations}

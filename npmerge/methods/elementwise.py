"""Drivers of the methods that merge each element on its own: NearSwap and RAM / RAM+
(docs/semantics.md §C; kernels/elementwise.py). NearSwap and RAM are one merge pass; RAM+
first counts, per model, the elements it changes alone and those it shares, and turns
the counts into its scale lambda_i (float32, as mergekit computes it) before merging."""

from __future__ import annotations

import numpy as np

from .. import kernels
from .protocol import Driver, Span, Stat, TensorContext

RAM_STATS = (Stat("unique", "changed alone"), Stat("shared", "changed with others"))
RAMPLUS_STATS = RAM_STATS + (Stat("lambda", "λ (unique scale)", fmt="number"),)


class ElementwiseDriver(Driver):
    """Per-thread block buffers of kernels/elementwise.py; the first pass runs the checks."""

    def __init__(self, ctx: TensorContext, passes: list[str]):
        super().__init__(ctx, passes)
        self._buffers = None

    def fuses_check(self, block: int) -> bool:
        return True

    def work_bytes(self, span: int) -> int:
        return 0  # block buffers, as the engine's budget.kernel_bytes counts them

    def buffers(self, k, span: Span) -> list:
        if self._buffers is None:
            self._buffers = [k.scratch(self.ctx.n_models, span.block) for _ in range(span.workers.threads)]
        return self._buffers

    def release(self) -> None:
        self._buffers = None


class NearswapDriver(ElementwiseDriver):
    """NearSwap: the base moved towards the model where they are close (|B - M| <= t)."""

    def __init__(self, ctx: TensorContext):
        super().__init__(ctx, ["merge"])
        self.t = np.float32(ctx.params["t"])

    def kernel_for(self, pass_name: str) -> str:
        return "elementwise.nearswap"

    def feed(self, pass_name: str, span: Span) -> int:
        k = kernels.load("elementwise")
        sc = self.buffers(k, span)
        return sum(span.run(lambda a, z, t: k.nearswap(span.inp, span.out, span.lo, a, z, span.block, self.t,
                                                       *span.checks(t), sc[t])))


class RamDriver(ElementwiseDriver):
    """RAM (`plus` False) and RAM+ tensor-local (`plus` True): see the kernel."""

    def __init__(self, ctx: TensorContext, plus: bool = False):
        super().__init__(ctx, ["count", "merge"] if plus else ["merge"])
        g = ctx.params
        self.plus = plus
        self.eps = np.float32(g["epsilon"])
        self.lam = np.ones(ctx.n_models, np.float32)
        self.counts = np.zeros(2 * ctx.n_models, np.int64)
        self._tally = None

    def kernel_for(self, pass_name: str) -> str:
        return "elementwise.ram"

    def feed(self, pass_name: str, span: Span) -> int:
        k = kernels.load("elementwise")
        sc = self.buffers(k, span)
        if self._tally is None:
            self._tally = np.zeros((span.workers.threads, 2 * self.ctx.n_models), np.int64)
        op = k.RAM_COUNT if pass_name == "count" else k.RAM_MERGE
        return sum(span.run(lambda a, z, t: k.ram(span.inp, span.out, op, span.lo, a, z, span.block, self.eps,
                                                  self.lam, self._tally[t], *span.checks(t), sc[t])))

    def end_pass(self, pass_name: str) -> None:
        self.counts = self._tally.sum(axis=0) if self._tally is not None else np.zeros_like(self.counts)
        self._tally = None
        if pass_name == "count":
            self.lam = ramplus_lambda(self.counts[0::2], self.counts[1::2], self.ctx.params)

    def stats(self) -> dict:
        n = max(self.ctx.numel, 1)
        models = [{"unique": int(self.counts[2 * i]) / n, "shared": int(self.counts[2 * i + 1]) / n}
                  for i in range(self.ctx.n_models)]
        if self.plus:
            for m, lam in zip(models, self.lam.tolist()):
                m["lambda"] = lam
        return {"models": models}


def ramplus_lambda(unique: np.ndarray, shared: np.ndarray, g: dict) -> np.ndarray:
    """lambda_i = 1 + r * clamp(rho_i, 0, alpha), rho_i = shared_i / max(unique_i, epsilon):
    float32 operations on the float32 counts and parameters (mergekit's arithmetic)."""
    f = np.float32
    rho = shared.astype(np.float32) / np.maximum(unique.astype(np.float32), f(g["epsilon"]))
    rho = np.minimum(np.maximum(rho, f(0.0)), f(g["alpha"]))
    return (f(1.0) + f(g["r"]) * rho).astype(np.float32)

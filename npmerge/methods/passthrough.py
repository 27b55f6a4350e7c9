"""Passthrough: a model's tensors unchanged, or scaled; with `slices:`, layers of several
models stacked into one (a frankenmerge). docs/semantics.md §C.

One model per tensor, no base. The plan turns unscaled tensors into copy jobs (the
stored bytes, in the stored dtype); this driver handles the scaled ones.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from .protocol import Driver, Span, TensorContext
from .registry import Method, Param, number, register


class PassthroughDriver(Driver):
    def __init__(self, ctx: TensorContext):
        super().__init__(ctx, ["merge"])
        scale = ctx.model_params[0].get("scale") if ctx.model_params else None
        self.scaled = scale is not None
        self.factor = np.float32(scale if self.scaled else 1.0)  # fl32(scale), once
        self._buffers = None  # per thread: rows, base, output block

    def kernel_for(self, pass_name: str) -> str:
        return "passthrough.scale"

    def release(self) -> None:
        self._buffers = None

    def feed(self, pass_name: str, span: Span) -> int:
        k = kernels.load("passthrough")
        if self._buffers is None:
            self._buffers = [(np.empty((1, span.block), np.float32), np.empty(span.block, np.float32),
                              np.empty(span.block, np.float32)) for _ in range(span.workers.threads)]
        sc = self._buffers
        return sum(span.run(lambda a, z, t: k.scale(span.inp, span.out, span.lo, a, z, span.block, self.scaled,
                                                    self.factor, *sc[t])))


SCALE = Param("scale", None, number, "multiply the model's tensors by this factor (not given: copy them unchanged)",
              optional=True)

METHOD = register(Method(
    name="passthrough",
    title="Passthrough",
    paper=None,
    summary="one model's tensors unchanged (or scaled); with slices, layers of several models stacked "
            "into one (a frankenmerge)",
    base="none",
    model_params=(SCALE,),
    global_params=(),
    driver=PassthroughDriver,
    min_models=1,
    max_models=1,
    example="npmerge run frankenmerge.yml -o OUT (slices:), or npmerge passthrough MODEL --scale 0.5 -o OUT",
    l2_label="‖W‖₂",
    copies=lambda global_params, model_params: model_params[0].get("scale") is None,
))

"""The drivers behind `npmerge inspect` (npmerge/inspection.py): how task vectors relate.

Per tensor one SurveyDriver feeds the same spans, in lock-step, to
- a one-pass Gram driver (GramSums: every ⟨τᵢ, τⱼ⟩ exactly in float64), and
- the driver of the sign-electing method ELECTION at each density asked for (weights 1),
  whose output is discarded and whose statistics are kept: the share of elements whose
  kept deltas disagree in sign, and each model's kept share the election goes against.
The composite's k-th pass runs each driver's k-th pass, so the inputs are read as often
as one merge of ELECTION reads them (2-3 times), whatever the number of densities.
"""

from __future__ import annotations

import math
from dataclasses import replace

from . import registry
from .gram import GramSums
from .protocol import Driver, Span, TensorContext

ELECTION = "ties"  # trim by magnitude, then elect a sign: what inspect measures at each density


def election():
    """The registry entry of ELECTION (its title, statistics and totals rules)."""
    return registry.get(ELECTION)


class _GramPass(Driver):
    """One pass, no output: the tensor's Gram matrix of task vectors."""

    def __init__(self, ctx: TensorContext):
        super().__init__(ctx, passes=["reduce"])
        self.sums = GramSums(ctx, deltas=True)
        self.gram: list[list[float]] = []

    def writes(self, pass_name: str) -> bool:
        return False

    def feed(self, pass_name: str, span: Span) -> int:
        self.sums.feed(span)
        return 0

    def end_pass(self, pass_name: str) -> None:
        self.gram = self.sums.matrix()

    def work_bytes(self, span: int) -> int:
        return GramSums.nbytes(self.ctx)

    def release(self) -> None:
        self.sums.release()


class SurveyDriver(Driver):
    """The Gram pass and ELECTION's driver at each density, fed the same spans in lock-step.
    Writes nothing; stats: {"gram", "election": [one stats dict per density]}."""

    def __init__(self, ctx: TensorContext, densities):
        method = election()
        subs: list[Driver] = [_GramPass(ctx)]
        for d in densities:
            params, model_params = method.resolve({}, [{"density": d, "weight": 1.0}] * ctx.n_models,
                                                  cross_check=False)
            subs.append(method.driver(replace(ctx, params=params, model_params=tuple(model_params))))
        super().__init__(ctx, passes=[f"pass {k + 1}" for k in range(max(len(d.passes) for d in subs))])
        self.subs = subs
        self.done = [0] * len(subs)  # passes each has finished

    def writes(self, pass_name: str) -> bool:
        return False

    def _active(self):
        return [(k, d) for k, d in enumerate(self.subs) if self.done[k] < len(d.passes)]

    def feed(self, pass_name: str, span: Span) -> int:
        for k, d in self._active():
            d.feed(d.passes[self.done[k]], span)
        return 0

    def end_pass(self, pass_name: str) -> None:
        for k, d in self._active():
            d.end_pass(d.passes[self.done[k]])  # may drop a later pass of its own (a histogram pass)
            self.done[k] += 1
        left = max(len(d.passes) - n for d, n in zip(self.subs, self.done))
        del self.passes[self.passes.index(pass_name) + 1 + left:]

    def stats(self) -> dict:
        gram = self.subs[0].gram
        per_density = []
        for d in self.subs[1:]:
            s = d.stats()
            for i, m in enumerate(s["models"]):
                m["l2"] = math.sqrt(gram[i][i])  # what report.totals expects of a model's entry
            per_density.append({**s, "numel": self.ctx.numel})
        return {"gram": gram, "election": per_density, "models": [{} for _ in range(self.ctx.n_models)]}

    def work_bytes(self, span: int) -> int:
        return sum(d.work_bytes(span) for d in self.subs)

    def release(self) -> None:
        for d in self.subs:
            d.release()

"""`npmerge inspect BASE FT1 FT2 ...`: how fine-tunes relate, before choosing a method.

Built on the merge itself, so every figure means what it means in a merge and every
refusal is the merge's: the inputs are planned as a TIES merge (the same checks and
notes), then each float tensor is streamed through the engine in bounded memory:
- one pass of exact float64 sums (methods/reduce.py VectorSums): every ⟨τᵢ, τⱼ⟩, hence
  each task vector's L2 norm and RMS, the tensors it leaves unchanged, and the pairwise
  cosine similarities (docs/semantics.md §A);
- the TIES driver at each density d (histogram, trim and election passes; the output is
  discarded): the share of elements whose kept deltas disagree in sign, and per model the
  share of its kept elements the election goes against, exact at every d.
All of them are fed the same spans in lock-step (InspectDriver), so each input is read as
often as one TIES merge reads it (2-3 times), whatever the number of densities.
Layers and the whole model total the tensors as a merge report does (report.totals);
cosines of a layer come from its summed dot products and norms.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .constants import BLOCK
from .errors import RecipeError
from .methods import registry
from .methods.protocol import Driver, TensorContext
from .methods.reduce import FLAT, VectorSums

DENSITIES = tuple(round(0.1 * k, 1) for k in range(1, 11))


class GramDriver(Driver):
    """One pass, no output: the exact float64 sums ⟨τᵢ, τⱼ⟩ (i ≤ j) of a tensor."""

    def __init__(self, ctx: TensorContext):
        super().__init__(ctx, passes=["reduce"])
        n = ctx.n_models
        self.pairs = [(i, j) for i in range(n) for j in range(i, n)]
        self.sums = VectorSums(ctx, FLAT, [(1 + i, 1 + j) for i, j in self.pairs], deltas=True)
        self.gram = np.zeros((n, n), np.float64)

    def writes(self, pass_name: str) -> bool:
        return False

    def feed(self, pass_name: str, span) -> int:
        self.sums.feed(span)
        return 0

    def end_pass(self, pass_name: str) -> None:
        flat = self.sums.result()[:, 0]
        for p, (i, j) in enumerate(self.pairs):
            self.gram[i, j] = self.gram[j, i] = flat[p]

    def work_bytes(self, span: int) -> int:
        return VectorSums.nbytes(self.ctx, FLAT, len(self.pairs))

    def release(self) -> None:
        self.sums.release()


class InspectDriver(Driver):
    """The Gram sums and a TIES driver per density, fed the same spans in lock-step (the
    k-th pass of each in the composite's k-th): the inputs are read as often as the
    longest of them needs (2-3 times), not once per density. Writes nothing."""

    def __init__(self, ctx: TensorContext, subs: list[Driver]):
        super().__init__(ctx, passes=[f"pass {k + 1}" for k in range(max(len(d.passes) for d in subs))])
        self.subs = subs
        self.done = [0] * len(subs)  # passes each has finished

    def writes(self, pass_name: str) -> bool:
        return False

    def _active(self):
        return [(k, d) for k, d in enumerate(self.subs) if self.done[k] < len(d.passes)]

    def feed(self, pass_name: str, span) -> int:
        for k, d in self._active():
            d.feed(d.passes[self.done[k]], span)
        return 0

    def end_pass(self, pass_name: str) -> None:
        for k, d in self._active():
            d.end_pass(d.passes[self.done[k]])  # may drop a later pass of its own (TIES: hist_lo)
            self.done[k] += 1
        left = max(len(d.passes) - n for d, n in zip(self.subs, self.done))
        del self.passes[self.passes.index(pass_name) + 1 + left:]

    def stats(self) -> dict:
        gram = self.subs[0].gram
        ties = []
        for d in self.subs[1:]:
            s = d.stats()
            for i, m in enumerate(s["models"]):
                m["l2"] = math.sqrt(gram[i, i])
            ties.append({**s, "numel": self.ctx.numel})
        return {"gram": gram, "ties": ties, "models": [{} for _ in range(self.ctx.n_models)]}

    def work_bytes(self, span: int) -> int:
        return sum(d.work_bytes(span) for d in self.subs)

    def release(self) -> None:
        for d in self.subs:
            d.release()


class _Discard:
    """The engine's writer: inspect writes nothing."""

    def write(self, name: str, offset: int, data) -> None:
        pass


def inspect_models(base: str, models: list[str], *, densities=DENSITIES, max_memory=None, threads=None,
                   progress=None) -> dict:
    """Every figure of `npmerge inspect` (the --json document). `progress(total_bytes)`
    returns the engine's progress callback (render.progress's advance)."""
    from .budget import choose_span
    from .engine import Engine
    from .plan import build_plan
    from .recipe import Recipe
    from .report import model_records

    if len(models) < 2:
        raise RecipeError(f"inspect compares fine-tunes: give a base and at least two models, got {len(models)}",
                          hint="npmerge inspect BASE FT1 FT2 ...")
    recipe = Recipe.from_cli("ties", base, list(models))
    plan = build_plan(recipe, max_memory=max_memory, threads=threads)
    ties = registry.get("ties")
    try:
        jobs = [j for j in plan.jobs if not j.copy]
        jobs = [_inspect_job(j, ties, densities, plan.threads) for j in jobs]
        span, _ = choose_span(jobs, plan.budget, plan.threads)  # the composite needs more than one merge
        jobs = [replace(j, span=min(span, -(-j.numel // BLOCK) * BLOCK) or BLOCK) for j in jobs]
        engine = Engine(_Discard(), threads=plan.threads, span=span, allow_nonfinite=False,
                        progress=progress(sum(j.read_bytes * j.passes for j in jobs)) if progress else None)
        try:
            tensors = {j.name: _tensor(engine, j) for j in jobs}
        finally:
            engine.close()
        base_record, model_list = model_records(plan, public=False)
        names = [m["name"] for m in model_list]
        layers: dict[str, list[str]] = {}
        for j in jobs:
            layers.setdefault("other" if j.layer is None else str(j.layer), []).append(j.name)
        return {
            "base": base_record["name"],
            "models": names,
            "densities": list(densities),
            "notes": plan.notes,
            "total": _total(tensors, list(tensors), len(names), ties, densities),
            "layers": {layer: _total(tensors, members, len(names), ties, densities)
                       for layer, members in sorted(layers.items(), key=lambda kv: _layer_key(kv[0]))},
            "input_passes": sum(t["passes"] * j.read_bytes for t, j in zip(tensors.values(), jobs))
            / max(1, sum(j.read_bytes for j in jobs)),
            "tensors": {name: _public(t) for name, t in tensors.items()},
        }
    finally:
        plan.close()


def _layer_key(layer: str) -> tuple:
    return (0, int(layer)) if layer.isdigit() else (1, 0)


def _inspect_job(job, ties, densities, threads: int):
    """The tensor's job with an InspectDriver: Gram sums and TIES at each density (weights 1)."""
    def context(params, model_params):
        return TensorContext(job.name, job.shape, job.numel, params, tuple(model_params), True, threads,
                             job.stream_index)

    subs: list[Driver] = [GramDriver(context(job.params, job.model_params))]
    for d in densities:
        params, model_params = ties.resolve({}, [{"density": d, "weight": 1.0} for _ in job.models],
                                            cross_check=False)
        subs.append(ties.driver(context(params, model_params)))
    driver = InspectDriver(context(job.params, job.model_params), subs)
    return replace(job, driver=driver, passes=len(driver.passes))


def _tensor(engine, job) -> dict:
    stats = engine.run_driver(job)
    job.driver.release()
    return {"numel": job.numel, "gram": stats["gram"], "ties": stats["ties"], "passes": stats["passes"]}


def _cosines(gram: np.ndarray) -> list[list[float | None]]:
    """cos(τᵢ, τⱼ) in float64; None where a task vector is zero (no direction)."""
    n = gram.shape[0]
    out = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            den = math.sqrt(gram[i, i] * gram[j, j])  # sqrt(g * g) == g exactly: cos(τ, τ) is 1
            out[i][j] = None if den == 0 else max(-1.0, min(1.0, float(gram[i, j]) / den))
    return out


def _total(tensors: dict, members: list[str], n: int, ties, densities) -> dict:
    """Figures over `members` (a layer, or every tensor): sums added exactly, statistics
    totalled as a merge report totals them."""
    from .report import totals

    numel = sum(tensors[m]["numel"] for m in members)
    gram = np.array([[math.fsum(tensors[m]["gram"][i, j] for m in members) for j in range(n)] for i in range(n)])
    by_density = [totals(ties, {m: tensors[m]["ties"][k] for m in members}, n) for k in range(len(densities))]
    unchanged = [[m for m in members if tensors[m]["gram"][i, i] == 0] for i in range(n)]
    return {
        "numel": numel,
        "l2": [math.sqrt(gram[i, i]) for i in range(n)],
        "rms": [math.sqrt(gram[i, i] / numel) if numel else 0.0 for i in range(n)],
        "cosine": _cosines(gram),
        "unchanged": unchanged,
        # at density 1 nothing is trimmed: the share of elements whose non-zero deltas disagree in sign
        "sign_conflict": by_density[-1]["sign_conflict"] if densities[-1] == 1.0 else None,
        "sign_conflict_by_density": [t["sign_conflict"] for t in by_density],
        "excluded_by_density": [[t["models"][i]["excluded"] for t in by_density] for i in range(n)],
    }


def _public(t: dict) -> dict:
    n = t["gram"].shape[0]
    return {"numel": t["numel"], "l2": [math.sqrt(t["gram"][i, i]) for i in range(n)],
            "cosine": _cosines(t["gram"]), "sign_conflict_by_density": [s["sign_conflict"] for s in t["ties"]],
            "excluded_by_density": [[s["models"][i]["excluded"] for s in t["ties"]] for i in range(n)]}

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
Layers and the whole model total the tensors as a merge report does (report.totals);
cosines of a layer come from its summed dot products and norms.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

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


class _Discard:
    """The engine's writer for passes whose output is not wanted."""

    def write(self, name: str, offset: int, data) -> None:
        pass


def inspect_models(base: str, models: list[str], *, densities=DENSITIES, max_memory=None, threads=None,
                   progress=None) -> dict:
    """Every figure of `npmerge inspect` (the --json document). `progress(total)` returns a
    step() called after each run of a tensor (1 + len(densities) per tensor)."""
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
        step = progress(len(jobs) * (1 + len(densities))) if progress else (lambda: None)
        engine = Engine(_Discard(), threads=plan.threads, span=plan.span, allow_nonfinite=False)
        try:
            tensors = {j.name: _tensor(engine, j, ties, densities, step) for j in jobs}
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
            "tensors": {name: _public(t) for name, t in tensors.items()},
        }
    finally:
        plan.close()


def _layer_key(layer: str) -> tuple:
    return (0, int(layer)) if layer.isdigit() else (1, 0)


def _tensor(engine, job, ties, densities, step) -> dict:
    """A tensor's Gram matrix and its TIES statistics at each density."""
    ctx = TensorContext(job.name, job.shape, job.numel, job.params, job.model_params, True, engine.threads,
                        job.stream_index)
    gram_job = replace(job, driver=GramDriver(ctx), passes=1)
    engine.run_driver(gram_job)
    gram = gram_job.driver.gram
    gram_job.driver.release()
    step()
    n = len(job.models)
    by_density = []
    for d in densities:
        params, model_params = ties.resolve({}, [{"density": d, "weight": 1.0} for _ in range(n)], cross_check=False)
        run = replace(job, method=ties, params=params, model_params=tuple(model_params)).with_driver(engine.threads)
        by_density.append(engine.run_driver(run))
        run.driver.release()
        step()
    return {"numel": job.numel, "gram": gram, "ties": by_density}


def _cosines(gram: np.ndarray) -> list[list[float | None]]:
    """cos(τᵢ, τⱼ) in float64; None where a task vector is zero (no direction)."""
    n = gram.shape[0]
    out = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            den = math.sqrt(gram[i, i]) * math.sqrt(gram[j, j])
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

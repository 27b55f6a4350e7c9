"""`npmerge inspect BASE FT1 FT2 ...`: how fine-tunes relate, before choosing a method.

Built on the merge itself, so every figure means what it means in a merge and every
refusal is the merge's: the inputs are planned as a merge of methods/survey.py's ELECTION
method (the same checks and notes), then each float tensor is streamed through the engine
in bounded memory by a SurveyDriver (methods/survey.py): the Gram matrix of the task
vectors (each one's L2 norm and RMS, the tensors it leaves unchanged, pairwise cosines,
docs/semantics.md §A) and the election's statistics at every density, the inputs read as
often as by one merge. Layers and the whole model total the tensors as a merge report
does (report.totals); a layer's cosines come from its summed dot products and norms.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .constants import BLOCK
from .errors import RecipeError
from .methods.protocol import TensorContext
from .methods.survey import ELECTION, SurveyDriver, election

DENSITIES = tuple(round(0.1 * k, 1) for k in range(1, 11))


class _Discard:
    """The engine's writer: inspect writes nothing."""

    def write(self, name: str, offset: int, data) -> None:
        pass


def inspect_models(base: str, models: list[str], *, densities=DENSITIES, max_memory=None, threads=None,
                   progress=None) -> dict:
    """Every figure of `npmerge inspect` (the --json document). `progress(total_bytes)`
    returns the engine's progress callback (render.progress_bar's advance)."""
    from .budget import choose_span
    from .engine import Engine
    from .plan import build_plan
    from .recipe import Recipe
    from .report import model_records

    if len(models) < 2:
        raise RecipeError(f"inspect compares fine-tunes: give a base and at least two models, got {len(models)}",
                          hint="npmerge inspect BASE FT1 FT2 ...")
    recipe = Recipe.from_cli(ELECTION, base, list(models))
    plan = build_plan(recipe, max_memory=max_memory, threads=threads)
    method = election()
    try:
        jobs = [_survey_job(j, densities, plan.threads) for j in plan.jobs if not j.copy]
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
            "election": method.title,
            "base": base_record["name"],
            "models": names,
            "densities": list(densities),
            "notes": plan.notes,
            "total": _total(tensors, list(tensors), len(names), method, densities),
            "layers": {layer: _total(tensors, members, len(names), method, densities)
                       for layer, members in sorted(layers.items(), key=lambda kv: _layer_key(kv[0]))},
            "input_passes": sum(t["passes"] * j.read_bytes for t, j in zip(tensors.values(), jobs))
            / max(1, sum(j.read_bytes for j in jobs)),
            "tensors": {name: _public(t) for name, t in tensors.items()},
        }
    finally:
        plan.close()


def _layer_key(layer: str) -> tuple:
    return (0, int(layer)) if layer.isdigit() else (1, 0)


def _survey_job(job, densities, threads: int):
    """The tensor's job with a SurveyDriver instead of the plan's driver."""
    ctx = TensorContext(job.name, job.shape, job.numel, job.params, job.model_params, True, threads, job.stream_index)
    driver = SurveyDriver(ctx, densities)
    return replace(job, driver=driver, passes=len(driver.passes))


def _tensor(engine, job) -> dict:
    stats = engine.run_driver(job)
    job.driver.release()
    return {"numel": job.numel, "gram": stats["gram"], "election": stats["election"], "passes": stats["passes"]}


def _cosines(gram: list[list[float]]) -> list[list[float | None]]:
    """cos(τᵢ, τⱼ) in float64; None where a task vector is zero (no direction)."""
    n = len(gram)
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            den = math.sqrt(gram[i][i] * gram[j][j])  # sqrt(g * g) == g exactly: cos(τ, τ) is 1
            out[i][j] = None if den == 0 else max(-1.0, min(1.0, gram[i][j] / den))
    return out


def _total(tensors: dict, members: list[str], n: int, method, densities) -> dict:
    """Figures over `members` (a layer, or every tensor): sums added exactly, statistics
    totalled as a merge report totals them."""
    from .report import totals

    numel = sum(tensors[m]["numel"] for m in members)
    gram = [[math.fsum(tensors[m]["gram"][i][j] for m in members) for j in range(n)] for i in range(n)]
    by_density = [totals(method, {m: tensors[m]["election"][k] for m in members}, n) for k in range(len(densities))]
    unchanged = [[m for m in members if tensors[m]["gram"][i][i] == 0] for i in range(n)]
    return {
        "numel": numel,
        "l2": [math.sqrt(gram[i][i]) for i in range(n)],
        "rms": [math.sqrt(gram[i][i] / numel) if numel else 0.0 for i in range(n)],
        "cosine": _cosines(gram),
        "unchanged": unchanged,
        # at density 1 nothing is trimmed: the share of elements whose non-zero deltas disagree in sign
        "sign_conflict": by_density[-1]["sign_conflict"] if densities[-1] == 1.0 else None,
        "sign_conflict_by_density": [t["sign_conflict"] for t in by_density],
        "excluded_by_density": [[t["models"][i]["excluded"] for t in by_density] for i in range(n)],
    }


def _public(t: dict) -> dict:
    n = len(t["gram"])
    return {"numel": t["numel"], "l2": [math.sqrt(t["gram"][i][i]) for i in range(n)],
            "cosine": _cosines(t["gram"]), "sign_conflict_by_density": [s["sign_conflict"] for s in t["election"]],
            "excluded_by_density": [[s["models"][i]["excluded"] for s in t["election"]] for i in range(n)]}

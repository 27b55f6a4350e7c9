"""Model Breadcrumbs: drop each task vector's largest magnitudes as outliers and its
smallest as noise, keep the band in between (Davari & Belilovsky, 2024), with or
without TIES's sign election."""

from typing import Any

from ..errors import RecipeError, shown
from . import family
from .registry import DENSITY, LAMBDA, WEIGHT, Method, Param, register

PAPER = "https://arxiv.org/abs/2312.06795"


def gamma(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise RecipeError(f"{name} must be a number in [0, 1], got {shown(value)}",
                          hint="gamma is the fraction of largest magnitudes dropped as outliers, e.g. 0.01")
    return float(value)


GAMMA = Param("gamma", 0.01, gamma, "fraction of the largest magnitudes dropped as outliers")

register(Method(
    name="breadcrumbs",
    title="Model Breadcrumbs",
    paper=PAPER,
    summary="drop each task vector's largest magnitudes (a gamma fraction, outliers) and keep the next "
            "density fraction; add the weighted sum to the base",
    base="required",
    model_params=(WEIGHT, DENSITY, GAMMA),
    global_params=(family.normalize_param(False), LAMBDA, family.rescale_param(False, inverse=False)),
    driver=family.driver(sparsifier="outliers", consensus=None),
    stats=family.KEPT_STATS + (family.RESCALE_STAT,),
    check=family.check_weight_sum,
    example="npmerge breadcrumbs BASE FT1 FT2 --density 0.9 --gamma 0.01 -o OUT",
))

register(Method(
    name="breadcrumbs_ties",
    title="Model Breadcrumbs + TIES",
    paper=PAPER,
    summary="drop each task vector's largest magnitudes (a gamma fraction, outliers) and keep the next "
            "density fraction; elect a sign per coordinate and add the agreeing deltas to the base",
    base="required",
    model_params=(WEIGHT, DENSITY, GAMMA),
    global_params=(family.normalize_param(False), LAMBDA, family.rescale_param(False, inverse=False),
                   family.CONSENSUS),
    driver=family.driver(sparsifier="outliers", consensus="sum"),
    stats=family.TIES_STATS + (family.RESCALE_STAT,),
    check=family.check_nonzero_weights,
    example="npmerge breadcrumbs-ties BASE FT1 FT2 --density 0.9 --gamma 0.01 -o OUT",
))

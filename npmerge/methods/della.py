"""DELLA-merging: drop task-vector elements at random with a keep probability that grows
with the element's magnitude rank in its row (Deep et al., 2024), with TIES's sign
election (`della`) or without (`della_linear`)."""

import math
from typing import Any

from ..errors import RecipeError, shown
from . import family
from .registry import DENSITY, LAMBDA, SEED, WEIGHT, Method, Param, register

PAPER = "https://arxiv.org/abs/2406.11617"


def epsilon(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise RecipeError(f"{name} must be a number >= 0, got {shown(value)}",
                          hint="epsilon is the spread of keep probabilities around density, e.g. 0.15")
    return float(value)


EPSILON = Param("epsilon", 0.15, epsilon, "keep probabilities span density - epsilon .. density + epsilon")


def check_bounds(global_params: dict, model_params: list[dict], models: list[str]) -> None:
    """For 0 < density < 1 every probability must lie in (0, 1): density - epsilon > 0
    and density + epsilon < 1 (docs/semantics.md §B)."""
    for p, who in zip(model_params, models):
        rho, eps = p["density"], p["epsilon"]
        if 0 < rho < 1 and not (rho - eps > 0 and rho + eps < 1):
            raise RecipeError(f"'epsilon' {eps} of {who} does not fit its density {rho}: DELLA needs "
                              "density - epsilon > 0 and density + epsilon < 1",
                              hint=f"choose epsilon < {min(rho, 1 - rho):g} for this density")


register(Method(
    name="della",
    title="DELLA-merging",
    paper=PAPER,
    summary="drop task-vector elements at random, keeping larger magnitudes (by rank in their row) more "
            "often, rescale the rest, elect a sign per coordinate and average the agreeing deltas",
    base="required",
    model_params=(WEIGHT, DENSITY, EPSILON),
    global_params=(family.normalize_param(True), LAMBDA, family.rescale_param(True, inverse=True),
                   family.CONSENSUS, SEED),
    driver=family.driver(sparsifier="della", consensus="sum"),
    stats=family.TIES_STATS + (family.RESCALE_STAT,),
    check=family.checks(check_bounds, family.check_nonzero_weights),
    example="npmerge della BASE FT1 FT2 --density 0.5 --epsilon 0.1 -o OUT",
))

register(Method(
    name="della_linear",
    title="DELLA (linear)",
    paper=PAPER,
    summary="drop task-vector elements at random, keeping larger magnitudes (by rank in their row) more "
            "often, rescale the rest and add the weighted sum to the base",
    base="required",
    model_params=(WEIGHT, DENSITY, EPSILON),
    global_params=(family.normalize_param(False), LAMBDA, family.rescale_param(True, inverse=True), SEED),
    driver=family.driver(sparsifier="della", consensus=None),
    stats=family.KEPT_STATS + (family.RESCALE_STAT,),
    check=family.checks(check_bounds, family.check_weight_sum),
    example="npmerge della-linear BASE FT1 FT2 --density 0.5 --epsilon 0.1 -o OUT",
))

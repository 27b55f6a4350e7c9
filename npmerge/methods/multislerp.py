"""Multi-SLERP (Goddard): barycentric interpolation of N models on the hypersphere, of
their task vectors with a base (docs/semantics.md §C, methods/gram.py)."""

from __future__ import annotations

import math

from ..errors import RecipeError
from . import gram
from .registry import WEIGHT, Method, Param, boolean, positive, register


def _check(global_params: dict, model_params: list[dict], models: list[str]) -> None:
    weights = [p["weight"] for p in model_params]
    if global_params["normalize_weights"] and math.fsum(weights) == 0.0:
        raise RecipeError(f"multislerp: the weights sum to 0 ({', '.join(map(str, weights))}), so normalizing "
                          "them would divide by zero",
                          hint="change the weights, or turn normalizing off (--no-normalize-weights)")


METHOD = register(Method(
    name="multislerp",
    title="Multi-SLERP",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    summary="interpolate N models (or their task vectors, with a base) on the hypersphere: the weighted "
            "mean direction's tangent plane, mapped back and scaled by the weighted mean norm",
    base="optional",
    model_params=(WEIGHT,),
    global_params=(
        Param("normalize_weights", True, boolean, "divide the weights by their sum"),
        Param("eps", 1e-8, positive, "added to each norm before dividing by it"),
    ),
    driver=gram.MultislerpDriver,
    stats=gram.GRAM_STATS,
    min_models=2,
    check=_check,
    example="npmerge multislerp M1 M2 M3 --base BASE -o OUT",
    l2_label="‖vᵢ‖₂",
))

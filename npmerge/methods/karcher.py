"""The Karcher (Riemannian) mean of N models on the hypersphere, scaled by their mean
norm (docs/semantics.md §C, methods/gram.py)."""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError, shown
from . import gram
from .registry import Method, Param, non_negative, register


def iterations(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{name} must be an integer >= 1, got {shown(value)}",
                          hint="max_iter is the most iterations of the mean, e.g. 10")
    return int(value)


iterations.kind = "int"

METHOD = register(Method(
    name="karcher",
    title="Karcher mean",
    paper="https://en.wikipedia.org/wiki/Karcher_mean",
    summary="the Riemannian mean of the models' directions on the hypersphere, scaled by their mean norm",
    base="none",
    model_params=(),
    global_params=(
        Param("max_iter", 10, iterations, "most iterations of the mean"),
        Param("tol", 1e-5, non_negative("tol is the convergence threshold, e.g. 1e-5 (0 runs max_iter iterations)"),
              "convergence threshold (also the smallest norm and angle counted)"),
    ),
    driver=gram.KarcherDriver,
    stats=gram.KARCHER_STATS,
    min_models=2,
    example="npmerge karcher M1 M2 M3 -o OUT",
    l2_label="‖W‖₂",
))

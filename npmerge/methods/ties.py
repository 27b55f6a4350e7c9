"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from . import family
from .registry import DENSITY, LAMBDA, WEIGHT, Method, Param, boolean, choice, register

METHOD = register(Method(
    name="ties",
    title="TIES-merging",
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim each task vector to its largest magnitudes, elect a sign per coordinate, "
            "average the agreeing deltas and add them to the base",
    base="required",
    model_params=(WEIGHT, DENSITY),
    global_params=(
        Param("normalize", True, boolean, "divide by the sum of agreeing weights"),
        LAMBDA,
        Param("consensus", "sum", choice("sum", "count"), "sign election by weighted sum or by count"),
    ),
    driver=family.driver(sparsifier="magnitude", consensus="sum"),
    stats=family.TIES_STATS,
    check=family.check_nonzero_weights,
    example="npmerge ties BASE FT1 FT2 --density 0.2 -o OUT",
))

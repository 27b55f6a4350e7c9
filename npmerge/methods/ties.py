"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from .registry import DENSITY, LAMBDA, WEIGHT, Method, Param, boolean, choice, register

METHOD = register(Method(
    name="ties",
    title="TIES-merging",
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim each task vector to its largest magnitudes, elect a sign per coordinate, "
            "average the agreeing deltas and add them to the base",
    uses_base=True,
    trims=True,
    model_params=(WEIGHT, DENSITY),
    global_params=(
        Param("normalize", True, boolean, "divide by the sum of agreeing weights"),
        LAMBDA,
        Param("consensus", "sum", choice("sum", "count"), "sign election by weighted sum or by count"),
    ),
    zero_denominator_eps=0.0,
))

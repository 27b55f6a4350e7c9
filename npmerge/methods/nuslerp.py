"""NuSLERP: mergekit's SLERP of two models with weights, base optional (docs/semantics.md §C):
t = w1 / (w0 + w1); the task vectors (or, without a base, the models) are interpolated
along their arc per tensor, per row, or per column."""

from . import reduce
from .registry import Method, Param, boolean, number, register


def _warn(global_params: dict, model_params: list[dict], models: list[str]) -> list[str]:
    w0, w1 = model_params[0]["weight"], model_params[1]["weight"]
    notes = []
    if abs(w0 + w1) < 1e-6:
        notes.append(f"the weights sum to {w0 + w1:g}: t = 0.5 (as mergekit)")
    else:
        t = reduce.nuslerp_t(w0, w1)
        if not 0.0 <= t <= 1.0:
            notes.append(f"t = w1 / (w0 + w1) = {t:g} is outside [0, 1]: NuSLERP extrapolates")
    if global_params["nuslerp_flatten"] and global_params["nuslerp_row_wise"]:
        notes.append("nuslerp_row_wise has no effect while nuslerp_flatten is true")
    return notes


METHOD = register(Method(
    name="nuslerp",
    title="NuSLERP",
    paper=None,
    summary="interpolate between two models' task vectors (or the models, without a base) along their arc, "
            "with t = w1 / (w0 + w1), per tensor or per row",
    base="optional",
    model_params=(Param("weight", None, number, "weight of the model; t = w1 / (w0 + w1)"),),
    global_params=(
        Param("nuslerp_flatten", True, boolean, "interpolate each tensor as one vector (else per row)"),
        Param("nuslerp_row_wise", False, boolean,
              "without flattening: vectors along the first axis (columns) instead of rows"),
    ),
    driver=reduce.NuslerpDriver,
    stats=reduce.NUSLERP_STATS,
    min_models=2,
    max_models=2,
    example="npmerge nuslerp M0 M1 --base BASE --weight 0.4 --weight 0.6 -o OUT",
    warn=_warn,
    warmup_variants=({"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    l2_label="‖vᵢ‖₂",
))

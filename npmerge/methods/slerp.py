"""SLERP: spherical linear interpolation between the base and one other model (Shoemake,
1985), per tensor over its flattened weights (docs/semantics.md §C).

`t` takes any finite value, as in mergekit (which does not check it): outside [0, 1] the
interpolation extrapolates along the arc, and the recipe gets a note saying so.
"""

from . import reduce
from .registry import Method, Param, number, register


def _warn(global_params: dict, model_params: list[dict], models: list[str]) -> list[str]:
    t = global_params["t"]
    return [] if 0.0 <= t <= 1.0 else [f"t = {t} is outside [0, 1]: SLERP extrapolates beyond "
                                       + ("the base" if t < 0 else "the other model")]


METHOD = register(Method(
    name="slerp",
    title="SLERP",
    paper="https://doi.org/10.1145/325165.325242",
    summary="interpolate between the base and one other model along the arc between their weight tensors "
            "(linearly where they are nearly parallel)",
    base="required",
    model_params=(),
    global_params=(Param("t", None, number, "interpolation factor: 0 gives the base, 1 the other model"),),
    driver=reduce.SlerpDriver,
    stats=reduce.SLERP_STATS,
    min_models=1,
    max_models=1,
    example="npmerge slerp BASE OTHER --t 0.3 -o OUT",
    warmup_params={"t": 0.3},
    warn=_warn,
))

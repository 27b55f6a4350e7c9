"""Linear averaging / model soup (Wortsman et al., 2022)."""

from . import family
from .registry import WEIGHT, Method, Param, boolean, register

METHOD = register(Method(
    name="linear",
    title="Linear (model soup)",
    paper="https://arxiv.org/abs/2203.05482",
    summary="weighted average of the listed models' weights",
    base="none",
    model_params=(WEIGHT,),
    global_params=(Param("normalize", True, boolean, "divide by the sum of weights"),),
    driver=family.driver(sparsifier=None, consensus=None),
    check=family.check_weight_sum,
    example="npmerge linear M1 M2 M3 -o OUT",
    l2_label="‖W‖₂",
))

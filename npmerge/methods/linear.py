"""Linear averaging / model soup (Wortsman et al., 2022)."""

from .registry import WEIGHT, Method, Param, boolean, register

METHOD = register(Method(
    name="linear",
    title="Linear (model soup)",
    paper="https://arxiv.org/abs/2203.05482",
    summary="weighted average of the listed models' weights",
    uses_base=False,
    model_params=(WEIGHT,),
    global_params=(Param("normalize", True, boolean, "divide by the sum of weights"),),
    zero_denominator_eps=1e-8,
    fixed={"consensus": "none", "lambda": 1.0},
))

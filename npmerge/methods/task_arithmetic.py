"""Task arithmetic: add weighted task vectors to the base (Ilharco et al., 2023)."""

from . import family
from .registry import LAMBDA, WEIGHT, Method, Param, boolean, register

METHOD = register(Method(
    name="task_arithmetic",
    title="Task arithmetic",
    paper="https://arxiv.org/abs/2212.04089",
    summary="add the weighted sum of task vectors (fine-tune minus base) to the base",
    base="required",
    model_params=(WEIGHT,),
    global_params=(
        Param("normalize", False, boolean, "divide by the sum of weights"),
        LAMBDA,
    ),
    driver=family.driver(sparsifier=None, consensus=None),
    check=family.check_weight_sum,
    example="npmerge task-arithmetic BASE FT1 FT2 --weight 0.5 -o OUT",
))

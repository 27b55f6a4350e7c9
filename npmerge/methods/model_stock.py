"""Model Stock (Jang et al., 2024), docs/semantics.md §C: the ratio t from the mean pairwise
cosine of the task vectors, per tensor or per row; result t·mean(Mᵢ) + (1 − t)·B."""

from . import reduce
from .registry import Method, Param, boolean, register

METHOD = register(Method(
    name="model_stock",
    title="Model Stock",
    paper="https://arxiv.org/abs/2403.19522",
    summary="average the fine-tunes and move from the base towards that average by a ratio t set by "
            "the angle between their task vectors",
    base="required",
    model_params=(),
    global_params=(Param("filter_wise", False, boolean, "one ratio t per row instead of per tensor"),),
    driver=reduce.StockDriver,
    stats=reduce.STOCK_STATS,
    min_models=2,
    example="npmerge model-stock BASE FT1 FT2 -o OUT",
    warmup_variants=({"filter_wise": True},),
))

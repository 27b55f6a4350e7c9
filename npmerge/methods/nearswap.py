"""NearSwap (alchemonaut, QuartetAnemoi): per element, the base moved towards the one
other model where they are close, w = clamp(t / |B - M|, 0, 1) (docs/semantics.md §C)."""

from . import elementwise
from .registry import Method, Param, positive, register

METHOD = register(Method(
    name="nearswap",
    title="NearSwap",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    summary="per element, take the other model where it is within t of the base and move towards it "
            "by t / |difference| elsewhere",
    base="required",
    model_params=(),
    global_params=(Param("t", None, positive, "sameness threshold: elements within t of the base take the "
                                              "other model's value"),),
    driver=elementwise.NearswapDriver,
    min_models=1,
    max_models=1,
    example="npmerge nearswap BASE OTHER --t 0.0001 -o OUT",
    warmup_params={"t": 0.001},
))

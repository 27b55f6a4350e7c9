"""DARE: drop task-vector elements at random and rescale the rest (Yu et al., 2024),
with or without TIES's sign election. Masks are counter-based (docs/semantics.md §A): they
depend only on the seed, the tensor, the model and the element."""

from . import family
from .registry import DENSITY, LAMBDA, SEED, WEIGHT, Method, register

PAPER = "https://arxiv.org/abs/2311.03099"

register(Method(
    name="dare_ties",
    title="DARE + TIES",
    paper=PAPER,
    summary="drop each task-vector element at random (keeping a density fraction), rescale the rest, "
            "elect a sign per coordinate and add the agreeing deltas to the base",
    base="required",
    model_params=(WEIGHT, DENSITY),
    global_params=(family.normalize_param(False), LAMBDA, family.rescale_param(True, inverse=True),
                   family.CONSENSUS, SEED),
    driver=family.driver(sparsifier="random", consensus="sum"),
    stats=family.TIES_STATS + (family.RESCALE_STAT,),
    check=family.check_nonzero_weights,
    example="npmerge dare-ties BASE FT1 FT2 --density 0.5 --seed 7 -o OUT",
))

register(Method(
    name="dare_linear",
    title="DARE (linear)",
    paper=PAPER,
    summary="drop each task-vector element at random (keeping a density fraction), rescale the rest "
            "and add the weighted sum to the base",
    base="required",
    model_params=(WEIGHT, DENSITY),
    global_params=(family.normalize_param(False), LAMBDA, family.rescale_param(True, inverse=True), SEED),
    driver=family.driver(sparsifier="random", consensus=None),
    stats=family.KEPT_STATS + (family.RESCALE_STAT,),
    check=family.check_weight_sum,
    example="npmerge dare-linear BASE FT1 FT2 --density 0.5 --weight 0.5 -o OUT",
))

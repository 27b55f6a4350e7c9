"""RAM, Reinforced Agent Merging, and RAM+ tensor-local (docs/semantics.md §C): task
vectors thresholded at epsilon; an element changed by one model takes that model's delta
(RAM+: scaled by 1 + r·clamp(shared/unique, 0, alpha), per model and tensor), an element
changed by several the mean of their deltas."""

from __future__ import annotations

from . import elementwise
from .registry import Method, Param, non_negative, number, register

PAPER = "https://arxiv.org/abs/2601.13572"

EPSILON = Param("epsilon", 1e-5, non_negative("epsilon is the magnitude a delta must exceed to count as a change, "
                                              "e.g. 1e-5"),
                "a delta counts as a change where its magnitude exceeds epsilon")

register(Method(
    name="ram",
    title="RAM (Reinforced Agent Merging)",
    paper=PAPER,
    summary="add each element's change to the base: a change only one model made whole, "
            "changes several models made averaged",
    base="required",
    model_params=(),
    global_params=(EPSILON,),
    driver=elementwise.RamDriver,
    stats=elementwise.RAM_STATS,
    example="npmerge ram BASE FT1 FT2 -o OUT",
))

register(Method(
    name="ramplus_tl",
    title="RAM+ (tensor-local)",
    paper=PAPER,
    summary="RAM, with each model's unique changes scaled up by 1 + r·clamp(shared/unique, 0, alpha), "
            "counted per tensor",
    base="required",
    model_params=(),
    global_params=(
        Param("r", 0.1, number, "strength of the unique-change rescale"),
        Param("alpha", 0.2, number, "cap of the shared/unique ratio"),
        EPSILON,
    ),
    driver=lambda ctx: elementwise.RamDriver(ctx, plus=True),
    stats=elementwise.RAMPLUS_STATS,
    example="npmerge ramplus-tl BASE FT1 FT2 --r 0.1 --alpha 0.2 -o OUT",
))

"""The seam between the engine and a merge method.

For every merged tensor the engine builds the method's *driver* from a TensorContext
(the tensor and its parameters, resolved by the plan) and runs it: for each pass in
`driver.passes` (which `end_pass` may shorten), for each span of the tensor, it calls
`feed(pass, span)`; in a pass that `writes`, the driver encodes its results into the
span's output buffer and the engine hands that to the writer. A driver keeps its own
state between passes (histograms, thresholds, norms) and reports typed statistics that
its Method declares, so engine, plan, report and render never name a method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..constants import PIECE_BLOCKS
from ..workers import Workers, pieces


@dataclass(frozen=True)
class Stat:
    """A statistic a method reports, and how the report and summary show and total it.

    Per-model statistics live in each entry of the tensor's `models` list, the others at
    the tensor's top level. Totals over tensors: "mean" weights each tensor by its
    element count; "ratio" is sum(num) / sum(den) over tensors (keys of integer counts).
    """

    key: str
    label: str
    per_model: bool = True
    total: str = "mean"
    num: str | None = None
    den: str | None = None
    fmt: str = "percent"  # percent | number | degrees


@dataclass(frozen=True)
class TensorContext:
    """One merged tensor as its driver sees it: all parameters already resolved."""

    name: str  # output tensor name (random masks are keyed by it)
    shape: tuple[int, ...]
    numel: int
    params: dict  # global parameters for this tensor
    model_params: tuple[dict, ...]  # per model, in recipe order
    has_base: bool
    threads: int
    stream_index: tuple[int, ...] = ()  # per model: index i of its random stream (docs/semantics.md §A)

    @property
    def n_models(self) -> int:
        return len(self.model_params)

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, row length) with rows along the last axis; a 1-D or scalar tensor is one row."""
        length = self.shape[-1] if self.shape else 1
        return (self.numel // length if length else 0), length


@dataclass
class Span:
    """Elements lo..hi of the tensor, as the kernels take them (see kernels/span.py): the
    inputs tuple, the output (kind marker, address of element lo) in writing passes, and
    the workers that run its pieces."""

    lo: int
    hi: int
    block: int
    inp: tuple
    workers: "Workers"
    out: tuple = ()  # (encoder, address) in writing passes
    check: bool = False  # first pass: run kernels/span.py check_block on every block
    sums: np.ndarray | None = None  # float64[models, blocks of the tensor]: sums of squares
    bad: np.ndarray | None = None  # int64[threads, 1 + models]: NaN/Inf counts
    check_scratch: list = field(default_factory=list)  # per thread, for run_checks (kept by the engine)

    @property
    def has_base(self) -> bool:
        return self.inp[6]

    def pieces(self, grid: int) -> list[tuple[int, int]]:
        """The span cut into pieces of PIECE_BLOCKS grid blocks (edges on the grid)."""
        return pieces(self.lo, self.hi, grid, PIECE_BLOCKS * grid)

    def run(self, task, grid: int | None = None) -> list:
        """[task(a, z, slot) for each piece a..z], pieces in parallel on the workers
        (slot: the running thread's index, for its scratch buffers)."""
        ps = self.pieces(grid or self.block)
        return self.workers.run(lambda p, slot: task(*ps[p], slot), len(ps))

    def run_checks(self) -> None:
        """The first-pass checks as a pass of their own (for drivers whose kernels do not
        run them); span.check is then cleared."""
        from .. import kernels

        k = kernels.load("span")
        nm = len(self.inp[3]) - 1
        scratch = self.check_scratch
        while len(scratch) < self.workers.threads:
            scratch.append((np.empty((nm, self.block), np.float32), np.empty(self.block, np.float32)))
        self.run(lambda a, z, slot: k.check(self.inp, a, z, self.block, self.sums, self.bad[slot], *scratch[slot]))
        self.check = False

    def checks(self, slot: int) -> tuple:
        """A fused kernel's check arguments for the thread in `slot`: (check, sums, bad)."""
        if self.check:
            return True, self.sums, self.bad[slot]
        return False, _NO_SUMS, _NO_BAD


_NO_SUMS = np.zeros((0, 0), np.float64)
_NO_BAD = np.zeros(0, np.int64)


@dataclass
class Driver:
    """Base of every method's per-tensor driver; see the module docstring."""

    ctx: TensorContext
    passes: list[str] = field(default_factory=lambda: ["merge"])
    # Row length (along the last axis) whose whole rows the kernels read around each span,
    # e.g. to rank an element within its row; 0: only the span. Computed sources are then
    # materialised for every row the span touches.
    whole_rows = 0
    # Set by the plan where the budget has room for `cache_bytes`.
    cache = False

    def fuses_check(self, block: int) -> bool:
        """True if the first pass's kernels, on blocks of `block` elements, run
        kernels/span.py check_block themselves (one decode less); else the engine runs its
        own check kernel over each span first. The engine decides; a driver only answers."""
        return False

    def kernel_for(self, pass_name: str) -> str | None:
        """The kernel ("module.function" of npmerge.kernels) a pass runs, if one (the
        precompile helper compiles a merge's later kernels while it runs the first)."""
        return None

    def writes(self, pass_name: str) -> bool:
        """Whether this pass produces the output (every element exactly once)."""
        return pass_name == "merge"

    def feed(self, pass_name: str, span: Span) -> int:
        """Process one span; in a writing pass return how many encoded values are Inf/NaN."""
        raise NotImplementedError

    def end_pass(self, pass_name: str) -> None:
        """Called after the last span of a pass; may remove passes that turned out unneeded."""

    def stats(self) -> dict:
        """The tensor's statistics: top-level keys and a `models` list (one dict per model)."""
        return {"models": [{} for _ in range(self.ctx.n_models)]}

    def work_bytes(self, span: int) -> int:
        """Working memory this driver needs beyond the engine's buffers, for spans of `span` elements."""
        return 0

    @property
    def cache_bytes(self) -> int:
        """Memory of an optional cache that saves work (kept only when `cache`: the plan
        grants it where the budget has room); 0: none."""
        return 0

    def release(self) -> None:
        """Drop the buffers of a run. A driver is built once, by the plan, and lives on its
        TensorJob for the whole merge; its working memory only while its tensor is merged.
        Its results (thresholds, coefficients) stay."""

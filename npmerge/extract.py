"""`npmerge extract-lora BASE FT -o ADAPTER`: a PEFT LoRA adapter from a full fine-tune.
This module plans it; extract_run.py runs it.

Plan (everything from headers, nothing written): open BASE and FT as a merge does
(io/models.py: paths, Hub ids, MODEL+ADAPTER), check FT has the base's tensors and
shapes, sort each selected tensor into a low-rank module (a 2-D weight; the input
embedding and the head only with --embed-lora) or a tensor saved whole (embeddings and
head by default, norms, biases, anything else that changed), give each low-rank module
the memory of its exact SVD (lowrank.svd_bytes) and refuse one that does not fit
`--max-memory`, and run the output checks of a merge (io/writer.py preflight) against
the largest adapter the plan can write.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import blas, lowrank
from .budget import default_budget, parse_size
from .dtypes import ENCODABLE, parse_user_dtype
from .errors import BudgetError, IncompatibleModels, RecipeError
from .io.adapted import AdaptedModel
from .io.layout import HEAD_NAMES, embedding_name, is_buffer
from .io.lora import CONV1D_MODULES, WEIGHTS_NAME
from .io.lora_write import RESERVED_SEGMENTS, lowrank_keys, whole_key
from .io.models import open_model, source
from .io.shards import OutputTensor, plan_shards
from .io.writer import OutputCheck, OutputWriter
from .report import model_ref
from .units import human_bytes

CHUNK = 1 << 20  # elements per read of an input tensor
DEFAULT_RANK = 128  # mergekit-extract-lora's --max-rank default


@dataclass(frozen=True)
class Options:
    """What to extract (the CLI's options; see `npmerge extract-lora --help`)."""

    rank: int = DEFAULT_RANK
    sv_epsilon: float = 0.0
    rank_energy: float | None = None
    distribute_scale: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embed_lora: bool = False
    skip_undecomposable: bool = False
    out_dtype: str | None = None

    def check(self) -> None:
        if type(self.rank) is not int or self.rank < 1:
            raise RecipeError(f"--rank must be a positive integer, got {self.rank!r}",
                              hint="e.g. --rank 64 (mergekit's default is 128)")
        if not (math.isfinite(self.sv_epsilon) and self.sv_epsilon >= 0):
            raise RecipeError(f"--sv-epsilon must be a number >= 0, got {self.sv_epsilon!r}",
                              hint="singular values at or below it are dropped; 0 (the default) keeps them all")
        if self.rank_energy is not None and not (0 < self.rank_energy <= 1):
            raise RecipeError(f"--rank-energy must be in (0, 1], got {self.rank_energy!r}",
                              hint="the fraction of each module's squared Frobenius norm to keep, e.g. 0.9")
        for flag, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as exc:
                    raise RecipeError(f"{flag} {p!r} is not a valid regular expression: {exc}",
                                      hint="a Python regular expression, searched in each module name "
                                           "(e.g. --include 'self_attn' --exclude 'layers\\.0\\.')") from None

    def selects(self, module: str) -> bool:
        """mergekit's rule: re.search of each pattern on the module name."""
        if self.include and not any(re.search(p, module) for p in self.include):
            return False
        return not any(re.search(p, module) for p in self.exclude)

    def record(self) -> dict:
        return {"rank": self.rank, "sv_epsilon": self.sv_epsilon, "rank_energy": self.rank_energy,
                "distribute_scale": self.distribute_scale, "include": list(self.include),
                "exclude": list(self.exclude), "embed_lora": self.embed_lora,
                "skip_undecomposable": self.skip_undecomposable}


@dataclass(frozen=True)
class Item:
    """One selected base tensor: a low-rank module's weight, or a tensor saved whole if changed."""

    name: str
    module: str
    shape: tuple[int, ...]
    lowrank: bool
    what: str  # linear, conv1d, embedding, head; whole: embedding, head, norm/bias, undecomposable
    need: int  # working bytes
    read_bytes: int  # bytes of BASE + FT read

    @property
    def transposed(self) -> bool:
        """PEFT stores (B·A)ᵀ for embedding LoRA and Conv1D layers."""
        return self.lowrank and self.what in ("embedding", "conv1d")

    @property
    def embedding(self) -> bool:
        return self.lowrank and self.what == "embedding"

    def max_rank(self, rank: int) -> int:
        return min(rank, *self.shape)


@dataclass
class ExtractPlan:
    base: object
    ft: object
    options: Options
    items: list[Item]
    out_dtype: str
    budget: int
    threads: int
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # why -> tensors left out at plan time
    output: OutputCheck | None = None

    @property
    def total_work(self) -> int:
        return sum(i.read_bytes for i in self.items)

    @property
    def inputs(self) -> list:
        return [self.base, self.ft]

    def input_paths(self) -> list[Path]:
        paths = [Path(self.base.path), Path(self.ft.path)]
        on = getattr(self.ft, "on", None)
        return paths + ([Path(on.path)] if on is not None and on is not self.base else [])

    def as_dict(self, out) -> dict:
        """The plan as --dry-run shows it (models as the user named them)."""
        return {"base": model_ref(self.base).name, "fine_tune": model_ref(self.ft).name, "out": str(out),
                "out_dtype": self.out_dtype, "threads": self.threads, "max_memory": self.budget,
                "parameters": self.options.record(),
                "tensors": [{"tensor": i.name, "module": i.module, "shape": list(i.shape),
                             "lowrank": i.lowrank, "kind": i.what,
                             "max_rank": i.max_rank(self.options.rank) if i.lowrank else None,
                             "memory": i.need} for i in self.items],
                "skipped": self.skipped, "notes": self.notes}

    def close(self) -> None:
        self.ft.close()
        self.base.close()


# ---------------------------------------------------------------- plan


def plan_extract(base_ref: str, ft_ref: str, options: Options, *, max_memory=None, threads: int | None = None,
                 out=None, force: bool = False) -> ExtractPlan:
    """Open and check both models and lay out the extraction; with `out`, also run every
    check of the output location the real run makes (a plan that builds is a run that starts)."""
    options.check()
    budget = parse_size(max_memory) or default_budget()
    threads = (os.cpu_count() or 1) if threads is None else threads
    if threads < 1:
        raise RecipeError(f"--threads must be >= 1, got {threads}")
    out_dtype = parse_user_dtype(options.out_dtype) if options.out_dtype else None
    base = open_model(base_ref, role="base")
    ft = None
    try:
        ft = open_model(ft_ref, base, role="fine-tune")
        if not isinstance(ft, AdaptedModel) and ft.identity() == base.identity():
            raise RecipeError(f"the fine-tune '{ft_ref}' is the base model itself", hint="give the fine-tuned model")
        _check_tensors(base, ft)
        items, skipped = _items(base, ft, options)
        plan = ExtractPlan(base, ft, options, items, out_dtype or _base_dtype(base, items), budget, threads,
                           skipped=skipped)
        plan.notes += [n for m in (base, ft) for n in (getattr(m, "ref", None) and m.ref.notes or ())]
        plan.notes += list(getattr(ft, "notes", ()))
        if blas.pin_note():
            plan.notes.append(blas.pin_note())
        _check_budget(plan)
        if out is not None:
            plan.output = OutputWriter(Path(out), bound_layout(plan), inputs=plan.input_paths(),
                                       force=force).preflight()
    except BaseException:
        if ft is not None and ft is not base:
            ft.close()
        base.close()
        raise
    return plan


def _check_tensors(base, ft) -> None:
    """FT holds the base's tensors (buffers aside) with the base's shapes."""
    hint = "extract-lora needs a fine-tune of this base: same architecture and vocabulary size"
    names = {n for n in base.tensors if not is_buffer(n)}
    theirs = {n for n in ft.tensors if not is_buffer(n)}
    for what, diff in (("lacks", sorted(names - theirs)), ("has", sorted(theirs - names))):
        if diff:
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            where = "the base's tensor" if what == "lacks" else "tensor"
            tail = "" if what == "lacks" else ", which the base lacks"
            raise IncompatibleModels(f"the fine-tune '{ft.label}' {what} {where} '{diff[0]}'{tail}{more}", hint=hint)
    for name in sorted(names):
        a, b = tuple(base.tensors[name].info.shape), tuple(ft.tensors[name].info.shape)
        if a != b:
            raise IncompatibleModels(f"tensor '{name}' is {list(b)} in the fine-tune '{ft.label}' but {list(a)} in "
                                     f"the base '{base.label}'", hint=hint)


def _items(base, ft, options: Options) -> tuple[list[Item], dict[str, list[str]]]:
    """Sort the base's float tensors into low-rank modules and tensors saved whole."""
    names = [n for n in base.tensors if not is_buffer(n) and base.tensors[n].info.dtype.is_float]
    embed = embedding_name(names)
    model_type = (base.config or {}).get("model_type") if isinstance(base.config, dict) else None
    conv1d = CONV1D_MODULES.get(model_type, ()) if isinstance(model_type, str) else ()
    found: list[tuple[str, str, tuple, bool, str]] = []
    skipped: dict[str, list[str]] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        if not options.selects(module or name):
            skipped.setdefault("not selected (--include/--exclude)", []).append(name)
            continue
        clash = RESERVED_SEGMENTS.intersection(name.split("."))
        if clash:
            raise IncompatibleModels(f"tensor '{name}' has a segment PEFT reserves for adapter keys "
                                     f"('{sorted(clash)[0]}'): its adapter keys would be read as something else",
                                     hint="leave it out with --exclude, or rename it in the checkpoints")
        shape = tuple(base.tensors[name].info.shape)
        if name == embed:
            found.append((name, module, shape, options.embed_lora, "embedding"))
        elif len(shape) == 2 and (name in HEAD_NAMES or name == "output.weight"):
            found.append((name, module, shape, options.embed_lora, "head"))
        elif len(shape) == 2 and param == "weight" and module:
            found.append((name, module, shape, True, "conv1d" if module.rsplit(".", 1)[-1] in conv1d else "linear"))
        else:
            found.append((name, module, shape, False, "norm/bias" if len(shape) == 1 else "undecomposable"))
    lowrank_modules = {f[1] for f in found if f[3]}
    items = []
    for name, module, shape, is_lowrank, what in found:
        if (options.skip_undecomposable and not is_lowrank and what in ("norm/bias", "undecomposable")
                and module not in lowrank_modules):
            skipped.setdefault("undecomposable (--skip-undecomposable)", []).append(name)
            continue
        reads = base.tensors[name].info.nbytes + ft.tensors[name].info.nbytes
        items.append(Item(name, module, shape, is_lowrank, what, _need(base, ft, name, shape, is_lowrank, options),
                          reads))
    return items, skipped


def _need(base, ft, name: str, shape: tuple, is_lowrank: bool, options: Options) -> int:
    """Working bytes of one item: input reads (two float32 chunks, the output's encoded chunk and
    what a computed source allocates), and for a module its SVD (Δ included), its factors
    (float64, encoded, decoded to float32 and back to float64) and the error check's blocks."""
    numel = math.prod(shape)
    chunk = min(CHUNK, max(numel, 1))
    reads = 16 * chunk + source(ft, name).work_bytes(chunk)
    if not is_lowrank:
        return reads
    m, n = shape
    r = min(options.rank, m, n)
    return reads + lowrank.svd_bytes(m, n) + 28 * r * (m + n) + 24 * min(m * n, max(n, lowrank.ERROR_ROWS))


def _base_dtype(base, items: list[Item]) -> str:
    """The output dtype by default: the one holding most of the selected base elements."""
    sizes: dict[str, int] = {}
    for i in items:
        code = base.tensors[i.name].info.dtype.name
        sizes[code] = sizes.get(code, 0) + math.prod(i.shape)
    code = max(sorted(sizes), key=sizes.get) if sizes else "F32"
    return code if code in ENCODABLE else "F32"


def _check_budget(plan: ExtractPlan) -> None:
    """Every item fits --max-memory alone, or the plan is refused naming the first that does not."""
    for item in plan.items:
        if item.need > plan.budget:
            m, n = item.shape
            way = ("leave out --embed-lora (embeddings and head are then saved whole)" if item.what in
                   ("embedding", "head") else f"--exclude '{re.escape(item.module)}$' to leave it out")
            raise BudgetError(f"--max-memory {human_bytes(plan.budget, binary=True)} is too small for the exact SVD "
                              f"of module '{item.module}' [{m}, {n}]: it needs {human_bytes(item.need, binary=True)}",
                              hint=f"allow at least {math.ceil(item.need / 2**20)} MiB with --max-memory, or {way}")


def bound_layout(plan: ExtractPlan):
    """The largest adapter the plan can write (every module at its maximum rank, every
    tensor saved whole): what the output checks (free space) are run against."""
    tensors = []
    for item in plan.items:
        if item.lowrank:
            r = item.max_rank(plan.options.rank)
            m, n = item.shape
            a, b = lowrank_keys(item.module, item.embedding)
            tensors += [OutputTensor(a, plan.out_dtype, (r, m if item.transposed else n)),
                        OutputTensor(b, plan.out_dtype, (n if item.transposed else m, r))]
        else:
            tensors.append(OutputTensor(whole_key(item.name, False), plan.out_dtype, item.shape))
    return layout(tensors)


def layout(tensors: list[OutputTensor]):
    return plan_shards(sorted(tensors, key=lambda t: t.name), shard_bytes=1 << 62, single_name=WEIGHTS_NAME)

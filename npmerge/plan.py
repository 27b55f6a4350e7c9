"""Recipe + checkpoints -> a complete Plan, before the first byte of data is read.

Everything that can fail on bad input fails here: unreadable or corrupt files,
models that do not fit together, dtypes npmerge cannot merge, a memory budget too
small for one span. The plan fixes every tensor's inputs, parameters, output
dtype and shard position, and the span size that keeps working memory within
--max-memory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace

from . import __version__, constants
from .budget import cache_computed, choose_span, context, default_budget, parse_size
from .compat import check_distinct, check_equal_data, check_inputs, label
from .dtypes import DECODABLE, DTYPES, ENCODABLE
from .errors import IncompatibleModels, RecipeError
from .io.checkpoint import Checkpoint
from .io.models import fingerprints, open_model, source
from .io.sources import TensorSource
from .io.writer import OutputTensor, ShardLayout, plan_shards
from .methods.registry import Method
from .recipe import Recipe


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its sources, its method and parameters, its output dtype.

    A copy job writes models[0]'s bytes unchanged (integer/bool tensors)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    out_dtype: str
    copy: bool
    method: Method
    base: TensorSource | None
    models: tuple[TensorSource, ...]
    params: dict  # global parameters for this tensor
    model_params: tuple[dict, ...]  # per model
    passes: int  # most passes over the inputs the driver may take (progress accounting)
    span: int  # elements per span, a multiple of BLOCK
    input_round: str | None = None  # a recipe's `dtype:` (inputs rounded to it first)
    stream_index: tuple[int, ...] = ()  # per model: its random stream (SEMANTICS-2 A)

    @property
    def sources(self) -> tuple[TensorSource, ...]:
        return ((self.base,) if self.base else ()) + self.models

    @property
    def read_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)


@dataclass
class Plan:
    recipe: Recipe
    method: Method
    global_params: dict
    model_params: list[dict]
    base: Checkpoint | None
    models: list[Checkpoint]
    jobs: list[TensorJob]
    layout: ShardLayout
    span: int  # elements per span (the largest), a multiple of BLOCK
    budget: int  # bytes of working memory allowed
    work_bytes: int  # bytes of working memory the engine will allocate
    threads: int
    notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> Checkpoint:
        """The model whose layout, dtypes and companion files the output follows."""
        return self.base or self.models[0]

    @property
    def allow_nonfinite(self) -> bool:
        return self.recipe.allow_nonfinite

    @property
    def inputs(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models

    @property
    def total_work(self) -> int:
        """Bytes of input the engine streams, counting every pass."""
        return sum(j.read_bytes * j.passes for j in self.jobs)

    @property
    def read_bytes(self) -> int:
        return sum(j.read_bytes for j in self.jobs)

    def fingerprint(self) -> dict:
        """What a resumed run must share with the interrupted one (the writer adds the layout):
        same npmerge, same recipe, same input files (stat and header hash of each)."""
        return {
            "npmerge_version": __version__,
            "recipe_sha256": hashlib.sha256(self.recipe.to_yaml().encode()).hexdigest(),
            "inputs": [e for model in self.inputs for e in fingerprints(model)],
        }

    def close(self) -> None:
        for ckpt in self.inputs:
            ckpt.close()


def build_plan(recipe: Recipe, *, max_memory=None, threads: int | None = None,
               shard_size=None) -> Plan:
    """Open and check every input, then lay out the whole merge."""
    method, global_params, model_params = recipe.resolved()
    budget = parse_size(max_memory) or default_budget()
    shard_bytes = parse_size(shard_size) or constants.DEFAULT_SHARD_BYTES
    if threads is None:
        threads = os.cpu_count() or 1
    if threads < 1:
        raise RecipeError(f"--threads must be >= 1, got {threads}")
    opened: list[Checkpoint] = []
    try:
        base, models = _open_models(recipe, opened)
        check_distinct(base, models)
        jobs, notes = _jobs(recipe, method, global_params, model_params, base, models, threads)
        layout = plan_shards([OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], shard_bytes)
        span, work = choose_span(jobs, budget, threads)
        jobs = [replace(j, span=min(span, -(-j.numel // constants.BLOCK) * constants.BLOCK) or constants.BLOCK)
                for j in jobs]
        work = max(work, cache_computed(jobs, budget, threads, span))
    except BaseException:
        for c in opened:
            c.close()
        raise
    adapter_notes = [n for m in opened for n in getattr(m, "notes", ())]
    return Plan(recipe, method, global_params, model_params, base, models, jobs, layout, span, budget,
                work, threads, list(recipe.notes) + adapter_notes + notes)


def _open_models(recipe: Recipe, opened: list) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """Open (and validate) the base and every model; `opened` collects them for cleanup.
    A LoRA adapter is applied to the base (io/models.py), its shapes checked on the way."""
    base = open_model(recipe.base, role="base") if recipe.base else None
    if base:
        opened.append(base)
    models = []
    for i, entry in enumerate(recipe.models):
        models.append(open_model(entry.path, base, role=f"model {i + 1}"))
        opened.append(models[-1])
    return base, models


def _jobs(recipe: Recipe, method: Method, global_params: dict, model_params: list[dict], base: Checkpoint | None,
          models: list[Checkpoint], threads: int):
    ref = base or models[0]
    inputs = ([("base", base)] if base else []) + [(f"model {i + 1}", m) for i, m in enumerate(models)]
    notes: list[str] = []
    check_inputs(ref, inputs)
    jobs = []
    mixed = set()
    for name, ref_t in ref.tensors.items():
        info = ref_t.info
        dtypes = {role: c.tensors[name].info.dtype.name for role, c in inputs}
        kinds = {DTYPES[d].is_float for d in dtypes.values()}
        if kinds == {False}:
            check_equal_data(name, inputs)
            jobs.append(TensorJob(name, info.shape, info.numel, info.dtype.name, True, method, None,
                                  (source(ref, name),), {}, (), 1, constants.BLOCK))
            continue
        unsupported = {d for d in dtypes.values() if d not in DECODABLE}
        if len(kinds) > 1 or unsupported:
            raise IncompatibleModels(
                f"tensor '{name}' cannot be merged: dtypes " + ", ".join(f"{r} {d}" for r, d in dtypes.items()),
                hint="a float tensor in one model is an integer tensor in another" if len(kinds) > 1
                     else "npmerge merges BF16, F16, F32, F64 and FP8 (E4M3, E5M2) float tensors")
        if len(set(dtypes.values())) > 1:
            mixed.add(name)
        out_dtype = recipe.out_dtype or info.dtype.name
        if out_dtype not in ENCODABLE:
            raise RecipeError(f"tensor '{name}' is stored as {out_dtype}, which npmerge cannot write",
                              hint="choose an output dtype with --out-dtype (bfloat16, float16, float32)")
        b = source(base, name) if base else None
        m = tuple(source(c, name) for c in models)
        job = TensorJob(name, info.shape, info.numel, out_dtype, False, method, b, m, dict(global_params),
                        tuple(model_params), 1, constants.BLOCK, stream_index=tuple(range(len(models))))
        passes = len(method.driver(context(job, threads)).passes)
        jobs.append(replace(job, passes=passes))
    copied = [j.name for j in jobs if j.copy]
    if copied:
        notes.append(f"{len(copied)} integer/bool tensor(s) copied from {label(inputs[0][0], ref)}, not merged: "
                     + ", ".join(copied[:5]) + (", ..." if len(copied) > 5 else ""))
    if mixed:
        notes.append(f"{len(mixed)} tensor(s) have different dtypes across models; all are decoded to float32")
    for i, p in enumerate(model_params):
        if p.get("weight", 0) < 0:
            notes.append(f"model {i + 1} has a negative weight ({p['weight']}): its "
                         + ("task vector is subtracted" if base else "weights are subtracted"))
    return jobs, notes

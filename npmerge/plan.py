"""Recipe + checkpoints -> a complete Plan, before the first byte of data is read.

Everything that can fail on bad input fails here: unreadable or corrupt files,
models that do not fit together, dtypes npmerge cannot merge, a memory budget too
small for one span. The plan fixes every tensor's inputs, parameters, output
dtype and shard position, and the span size that keeps working memory within
--max-memory.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from . import __version__, constants
from .dtypes import DECODABLE, DTYPES, ENCODABLE
from .errors import BudgetError, IncompatibleModels, RecipeError
from .io.checkpoint import Checkpoint, TensorRef
from .io.sources import MappedSource, TensorSource
from .io.staging import file_fingerprint
from .io.writer import OutputTensor, ShardLayout, plan_shards
from .methods.protocol import TensorContext
from .methods.registry import Method
from .recipe import Recipe
from .units import human_bytes


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
            "inputs": [file_fingerprint(p) for ckpt in self.inputs for p in ckpt.files],
        }

    def close(self) -> None:
        for ckpt in self.inputs:
            ckpt.close()


def parse_size(text: str | int | None) -> int | None:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise RecipeError(f"invalid size '{text}'", hint="use e.g. 512MiB, 2GiB, 5GB")
    return int(value * units[unit])


def default_budget() -> int:
    """A quarter of available RAM, capped: leaves room for the page cache that feeds the merge."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(constants.DEFAULT_MEMORY_CAP, max(256 << 20, avail * constants.DEFAULT_MEMORY_FRACTION)))


def kernel_bytes(n_models: int, threads: int) -> int:
    """Thread-local block buffers of the span kernels (rows, base, intermediates)."""
    return threads * (2 * n_models + 6) * constants.BLOCK * 4


def job_bytes(job: TensorJob, span: int, threads: int) -> int:
    """Working memory of one merged tensor at this span size, beyond the shared output buffer."""
    from .engine import SpanInputs

    driver = job.method.driver(_context(job, threads))
    checks = len(job.models) * -(-job.numel // constants.BLOCK) * 8
    return (SpanInputs.buffer_bytes(job.base, job.models, span) + driver.work_bytes(span)
            + kernel_bytes(len(job.models), threads) + checks)


def choose_span(jobs: list[TensorJob], budget: int, threads: int) -> tuple[int, int]:
    """The largest span (a multiple of BLOCK, at most MAX_SPAN_ELEMENTS) with which every
    merged tensor fits the budget; and the bytes allocated at the worst tensor."""
    merged = [j for j in jobs if not j.copy]
    block = constants.BLOCK
    largest = max((j.numel for j in merged), default=1)
    span = min(constants.MAX_SPAN_ELEMENTS, -(-max(largest, 1) // block) * block)
    while True:
        need = max((8 * span + job_bytes(j, min(span, -(-j.numel // block) * block), threads) for j in merged),
                   default=8 * span)
        if need <= budget or span <= block:
            break
        span = max(block, (span // 2) // block * block)
    if need > budget:
        worst = max(merged, key=lambda j: job_bytes(j, block, threads))
        raise BudgetError(f"--max-memory {human_bytes(budget, binary=True)} is too small to merge tensor '{worst.name}' "
                          f"of {len(worst.models)} model(s)",
                          hint=f"allow at least {math.ceil(need / 2**20)} MiB")
    return span, need


def _context(job: TensorJob, threads: int) -> TensorContext:
    return TensorContext(job.name, job.shape, job.numel, job.params, job.model_params, job.base is not None,
                         threads, job.stream_index)


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
        base = Checkpoint(recipe.base) if recipe.base else None
        if base:
            opened.append(base)
        models = []
        for entry in recipe.models:
            models.append(Checkpoint(entry.path))
            opened.append(models[-1])
        _check_distinct(base, models)
        jobs, notes = _jobs(recipe, method, global_params, model_params, base, models, threads)
        layout = plan_shards([OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], shard_bytes)
        span, work = choose_span(jobs, budget, threads)
        jobs = [replace(j, span=min(span, -(-j.numel // constants.BLOCK) * constants.BLOCK) or constants.BLOCK)
                for j in jobs]
    except BaseException:
        for c in opened:
            c.close()
        raise
    return Plan(recipe, method, global_params, model_params, base, models, jobs, layout, span, budget,
                work, threads, list(recipe.notes) + notes)


def _check_distinct(base: Checkpoint | None, models: list[Checkpoint]) -> None:
    seen: dict = {}
    for role, ckpt in ([("base", base)] if base else []) + [(f"model {i + 1}", m) for i, m in enumerate(models)]:
        for ident in ckpt.identity():
            if ident in seen:
                other_role, other = seen[ident]
                raise RecipeError(f"{role} '{ckpt.label}' is the same model as {other_role} '{other.label}'",
                                  hint="each model may appear once; weight it instead of repeating it")
            seen[ident] = (role, ckpt)


def _jobs(recipe: Recipe, method: Method, global_params: dict, model_params: list[dict], base: Checkpoint | None,
          models: list[Checkpoint], threads: int):
    ref = base or models[0]
    inputs = ([("base", base)] if base else []) + [(f"model {i + 1}", m) for i, m in enumerate(models)]
    notes: list[str] = []
    _check_names(ref, inputs)
    problems = []
    for name in ref.tensors:
        shapes = {role: c.tensors[name].info.shape for role, c in inputs}
        if len(set(shapes.values())) > 1:
            problems.append((name, shapes))
    if problems:
        _refuse_shapes(inputs, problems)
    _check_vocab(inputs)
    _refuse_fp8_scaled(inputs)
    jobs = []
    mixed = set()
    for name, ref_t in ref.tensors.items():
        info = ref_t.info
        dtypes = {role: c.tensors[name].info.dtype.name for role, c in inputs}
        kinds = {DTYPES[d].is_float for d in dtypes.values()}
        if kinds == {False}:
            _check_equal_data(name, inputs)
            jobs.append(TensorJob(name, info.shape, info.numel, info.dtype.name, True, method, None,
                                  (MappedSource(ref_t, ref.label),), {}, (), 1, constants.BLOCK))
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
        b = MappedSource(base.tensors[name], base.label) if base else None
        m = tuple(MappedSource(c.tensors[name], c.label) for c in models)
        job = TensorJob(name, info.shape, info.numel, out_dtype, False, method, b, m, dict(global_params),
                        tuple(model_params), 1, constants.BLOCK, stream_index=tuple(range(len(models))))
        passes = len(method.driver(_context(job, threads)).passes)
        jobs.append(replace(job, passes=passes))
    copied = [j.name for j in jobs if j.copy]
    if copied:
        notes.append(f"{len(copied)} integer/bool tensor(s) copied from {_label(inputs[0][0], ref)}, not merged: "
                     + ", ".join(copied[:5]) + (", ..." if len(copied) > 5 else ""))
    if mixed:
        notes.append(f"{len(mixed)} tensor(s) have different dtypes across models; all are decoded to float32")
    for i, p in enumerate(model_params):
        if p.get("weight", 0) < 0:
            notes.append(f"model {i + 1} has a negative weight ({p['weight']}): its "
                         + ("task vector is subtracted" if base else "weights are subtracted"))
    return jobs, notes


def _refuse_fp8_scaled(inputs) -> None:
    """FP8 weights with *_scale / *_scale_inv companions: their raw values are not the weights."""
    for role, ckpt in inputs:
        scales = [n for n in ckpt.tensors if n.endswith(("_scale", "_scale_inv"))]
        if scales and any(r.info.dtype.name.startswith("F8") for r in ckpt.tensors.values()):
            raise IncompatibleModels(f"{_label(role, ckpt)} is an FP8-quantised checkpoint (e.g. '{scales[0]}')",
                                     hint="dequantise it first: averaging raw FP8 values without their scales is wrong")


def _label(role: str, ckpt: Checkpoint) -> str:
    return f"{role} '{ckpt.label}'"


def _architecture(ckpt: Checkpoint):
    """config.json's architecture (e.g. LlamaForCausalLM) or model_type; None when not given."""
    config = ckpt.config or {}
    archs = config.get("architectures")
    value = archs[0] if isinstance(archs, list) and archs else config.get("model_type")
    return value if isinstance(value, str) else None


def _vocab_size(ckpt: Checkpoint):
    value = (ckpt.config or {}).get("vocab_size")
    return value if type(value) is int else None


def _check_vocab(inputs) -> None:
    """Same tensor shapes but different config.json vocab sizes still means different tokenizers."""
    sized = [(role, c, _vocab_size(c)) for role, c in inputs if _vocab_size(c) is not None]
    for role, ckpt, size in sized[1:]:
        if size != sized[0][2]:
            raise IncompatibleModels(f"vocabulary sizes differ in config.json: {_label(*sized[0][:2])} has "
                                     f"{sized[0][2]} tokens, {_label(role, ckpt)} has {size}", hint=_VOCAB_HINT)


_VOCAB_HINT = ("npmerge merges models that share a tokenizer; merging vocabularies (mergekit's tokenizer_source) "
               "is not supported yet")


def _refuse_shapes(inputs, problems) -> None:
    name, shapes = problems[0]
    roles = dict(inputs)
    (role_a, shape_a), *rest = shapes.items()
    role_b, shape_b = next((r, s) for r, s in rest if s != shape_a)
    who_a, who_b = _label(role_a, roles[role_a]), _label(role_b, roles[role_b])
    more = [f"  {n}: " + ", ".join(f"{r} {list(s)}" for r, s in shp.items()) for n, shp in problems[1:5]]
    detail = (f" (and {len(problems) - 1} more tensor(s))" if len(problems) > 1 else "") + "".join("\n" + m for m in more)
    if ("embed" in name or "lm_head" in name or "wte" in name) and shape_a and shape_b and shape_a[1:] == shape_b[1:]:
        raise IncompatibleModels(f"shape mismatch for '{name}': the vocabulary sizes differ, {who_a} has "
                                 f"{shape_a[0]} tokens, {who_b} has {shape_b[0]}{detail}", hint=_VOCAB_HINT)
    raise IncompatibleModels(f"shape mismatch for '{name}': {who_a} {list(shape_a)} vs {who_b} {list(shape_b)}{detail}",
                             hint="the models do not share an architecture; merge only fine-tunes of the same base")


def _check_names(ref: Checkpoint, inputs) -> None:
    ref_names = set(ref.tensors)
    ref_role = inputs[0][0]
    for role, ckpt in inputs:
        missing = [n for n in ref.tensors if n not in ckpt.tensors]
        extra = [n for n in ckpt.tensors if n not in ref_names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s): " + ", ".join(missing[:5]))
            if extra:
                parts.append(f"has {len(extra)} extra tensor(s): " + ", ".join(extra[:5]))
            hint = "all models must have the same tensors (same architecture)"
            archs = [_architecture(c) for c in (ref, ckpt)]
            other_arch = None not in archs and archs[0] != archs[1]
            if other_arch:
                parts.insert(0, f"different architectures ({archs[0]} vs {archs[1]})")
                hint = "merge only models of one architecture (fine-tunes of the same base model)"
            untied = next((c for c, names in ((ckpt, missing), (ref, extra))
                           if any(n.startswith("lm_head") for n in names)), None)
            if untied is not None and not other_arch:
                holder = ref if untied is ckpt else ckpt
                why = " (tie_word_embeddings: it reuses the input embeddings)" if (
                    (untied.config or {}).get("tie_word_embeddings")) else ""
                hint = (f"'{untied.label}' has no lm_head{why} while '{holder.label}' stores its own; "
                        "untie it first (save lm_head.weight as a copy of the embeddings) to merge them")
            raise IncompatibleModels(f"{_label(role, ckpt)} does not match {_label(ref_role, ref)}: "
                                     + "; ".join(parts), hint=hint)


def _check_equal_data(name: str, inputs) -> None:
    """Integer and bool tensors are copied, so every model must agree on them."""
    (ref_role, ref), *others = inputs
    a = ref.tensors[name]
    for role, ckpt in others:
        b = ckpt.tensors[name]
        if a.info.dtype != b.info.dtype or not _bytes_equal(a, b):
            raise IncompatibleModels(f"integer tensor '{name}' differs between {ref_role} and {role} '{ckpt.label}'",
                                     hint="integer/bool tensors (ids, masks) are copied, never averaged; "
                                          "they must be identical in every model")


def _bytes_equal(a: TensorRef, b: TensorRef, piece: int = 1 << 24) -> bool:
    x = a.file.flat(a.info.name).view(np.uint8)
    y = b.file.flat(b.info.name).view(np.uint8)
    return all(np.array_equal(x[i:i + piece], y[i:i + piece]) for i in range(0, x.size, piece))

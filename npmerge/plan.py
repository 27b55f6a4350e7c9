"""Recipe + checkpoints -> a complete Plan, before the first byte of data is read.

Everything that can fail on bad input fails here: unreadable or corrupt files,
models that do not fit together, dtypes npmerge cannot merge, a memory budget too
small for one chunk. The plan fixes every tensor's inputs, parameters, output
dtype and shard position, and the chunk size that keeps working memory within
--max-memory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from . import __version__, constants
from .dtypes import DECODABLE, DTYPES, ENCODABLE
from .errors import BudgetError, IncompatibleModels, RecipeError
from .io.checkpoint import Checkpoint, TensorRef
from .methods.family import keep_count
from .io.staging import file_fingerprint
from .io.writer import OutputTensor, ShardLayout, plan_shards
from .recipe import Recipe


@dataclass(frozen=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    numel: int
    out_dtype: str
    copy: bool  # integer/bool tensor: copied from the reference model, never merged
    base: TensorRef | None
    models: tuple[TensorRef, ...]
    passes: int  # passes over the inputs (progress accounting)

    @property
    def read_bytes(self) -> int:
        refs = ([self.base] if self.base else []) + ([] if self.copy else list(self.models))
        return sum(r.info.nbytes for r in refs)


@dataclass
class Plan:
    recipe: Recipe
    method: object
    global_params: dict
    model_params: list[dict]
    base: Checkpoint | None
    models: list[Checkpoint]
    jobs: list[TensorJob]
    layout: ShardLayout
    chunk: int  # elements per chunk, a multiple of BLOCK
    budget: int  # bytes of working memory allowed
    work_bytes: int  # bytes of working memory the engine will allocate
    threads: int
    notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> Checkpoint:
        """The model whose layout, dtypes and companion files the output follows."""
        return self.base or self.models[0]

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


def hist_bytes(n_models: int, threads: int) -> int:
    """Per-thread radix histograms of the exact selection (the larger, low-bits one)."""
    return threads * n_models * (1 << 16) * 8


def chunk_for_budget(budget: int, n_models: int, threads: int, largest: int) -> tuple[int, int]:
    """Largest chunk (a multiple of BLOCK) whose buffers fit the budget; and the bytes allocated."""
    per_element = 4 * (n_models + 2) + 8  # task-vector rows, base, merged f32, encoded output
    fixed = hist_bytes(n_models, threads)
    block = constants.BLOCK
    chunk = (budget - fixed) // per_element // block * block
    want = -(-max(largest, 1) // block) * block
    chunk = min(chunk, constants.MAX_CHUNK_ELEMENTS, want)
    if chunk < constants.MIN_CHUNK_ELEMENTS:
        need = fixed + per_element * constants.MIN_CHUNK_ELEMENTS
        raise BudgetError(f"--max-memory {budget} bytes is too small to merge {n_models} model(s)",
                          hint=f"allow at least {need / 2**20:.0f} MiB")
    return chunk, fixed + per_element * chunk


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
        jobs, notes = _jobs(recipe, method, model_params, base, models)
        layout = plan_shards([OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], shard_bytes)
        largest = max((j.numel for j in jobs if not j.copy), default=1)
        chunk, work = chunk_for_budget(budget, len(models), threads, largest)
    except BaseException:
        for c in opened:
            c.close()
        raise
    return Plan(recipe, method, global_params, model_params, base, models, jobs, layout, chunk, budget,
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


def _jobs(recipe: Recipe, method, model_params: list[dict], base: Checkpoint | None, models: list[Checkpoint]):
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
            jobs.append(TensorJob(name, info.shape, info.numel, info.dtype.name, True,
                                  ref_t, (), 1))
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
        b = base.tensors[name] if base else None
        m = tuple(c.tensors[name] for c in models)
        selects = method.trims and any(0 < keep_count(p["density"], info.numel) < info.numel for p in model_params)
        jobs.append(TensorJob(name, info.shape, info.numel, out_dtype, False, b, m, 3 if selects else 1))
    copied = [j.name for j in jobs if j.copy]
    if copied:
        notes.append(f"{len(copied)} integer/bool tensor(s) copied from {_label(inputs[0][0], ref)}, not merged: "
                     + ", ".join(copied[:5]) + (", ..." if len(copied) > 5 else ""))
    if mixed:
        notes.append(f"{len(mixed)} tensor(s) have different dtypes across models; all are decoded to float32")
    for i, p in enumerate(model_params):
        if p["weight"] < 0:
            notes.append(f"model {i + 1} has a negative weight ({p['weight']}): its "
                         + ("task vector is subtracted" if method.uses_base else "weights are subtracted"))
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

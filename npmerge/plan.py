"""Recipe + checkpoints -> a complete Plan, before the first byte of data is read.

Everything that can fail on bad input fails here: unreadable or corrupt files,
models that do not fit together, dtypes npmerge cannot merge, a memory budget too
small for one span. The plan fixes every tensor's inputs, parameters, output
dtype and shard position, and the span size that keeps working memory within
--max-memory.

Parameters are resolved per tensor (SEMANTICS-2 D): each job carries its own values,
found by the precedence model -> slice -> top level -> method default (global
parameters from the slice and the top level only), filters matched against the
model's input tensor name for per-model parameters and the output name for global
ones, gradients evaluated at the tensor's layer position t in its slice. The method
then validates each tensor's values.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__, constants
from .budget import choose_span, context, default_budget, parse_size
from . import layers, values
from .compat import check_distinct, check_equal_data, check_inputs, label
from .dtypes import DECODABLE, DTYPES, ENCODABLE
from .errors import IncompatibleModels, InvalidCheckpoint, RecipeError
from .io.checkpoint import Checkpoint, TensorRef
from .io.models import open_model, source
from .io.sources import TensorSource
from .io.staging import file_fingerprint
from .io.writer import OutputCheck, OutputTensor, ShardLayout, plan_shards
from .methods import registry
from .methods.registry import Method
from .plan_params import headline
from .recipe import Recipe, same_model


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its sources, its method and parameters, its output dtype.

    A copy job writes models[0]'s bytes unchanged (integer/bool tensors; passthrough
    without a scale)."""

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
    layer: int | None = None  # output layer index; None outside the layer stack
    members: tuple[int, ...] = ()  # per model: its index in Plan.models (empty: 0, 1, ... in order)

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
    config_updates: dict = field(default_factory=dict)  # config.json key path (tuple) -> new value
    tokenizer_dir: Path | None = None  # where the tokenizer files come from (None: the reference model)
    output: OutputCheck | None = None  # the output location's checks (api.plan_merge with `out`)

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



def build_plan(recipe: Recipe, *, max_memory=None, threads: int | None = None,
               shard_size=None) -> Plan:
    """Open and check every input, then lay out the whole merge."""
    method = registry.get(recipe.method)
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
        jobs, notes, config_updates = _jobs(recipe, method, base, models, threads)
        tokenizer_dir = _tokenizer_source(recipe, base, models, notes)
        layout = plan_shards([OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], shard_bytes)
        span, work = choose_span(jobs, budget, threads)
        jobs = [replace(j, span=min(span, -(-j.numel // constants.BLOCK) * constants.BLOCK) or constants.BLOCK)
                for j in jobs]
    except BaseException:
        for c in opened:
            c.close()
        raise
    global_params, model_params = headline(jobs, len(models))
    return Plan(recipe, method, global_params, model_params, base, models, jobs, layout, span, budget,
                work, threads, list(recipe.notes) + notes, config_updates, tokenizer_dir)


def _open_models(recipe: Recipe, opened: list) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """Open (and validate) the base and every merged model; `opened` collects them for cleanup."""
    base = open_model(recipe.base) if recipe.base else None
    if base:
        opened.append(base)
    models = []
    for entry in recipe.models:
        models.append(open_model(entry.path))
        opened.append(models[-1])
    return base, models


@dataclass
class _Source:
    """One model feeding one slice: its parameter settings, first input layer, and its
    index in Plan.models (-1: the base)."""

    ckpt: Checkpoint
    ref: str
    params: dict
    first: int
    member: int


@dataclass
class _Slice:
    sources: list[_Source]
    params: dict
    length: int


def _slices(recipe: Recipe, base, models: list[Checkpoint], stack) -> list[_Slice]:
    """The recipe's slices with opened models; a `models:` recipe is one slice of all layers."""
    if not recipe.slices:
        sources = ([_Source(base, recipe.base, {}, 0, -1)] if base else [])
        sources += [_Source(m, e.path, e.params, 0, i) for i, (m, e) in enumerate(zip(models, recipe.models))]
        return [_Slice(sources, {}, stack.count if stack else 0)]
    out = []
    for k, s in enumerate(recipe.slices):
        sources = []
        for src in s.sources:
            if recipe.is_base(src.model):
                ckpt, member = base, -1
            else:
                member = next(i for i, e in enumerate(recipe.models) if same_model(e.path, src.model))
                ckpt = models[member]
            if src.layers[1] > stack.count:
                raise RecipeError(f"slice {k + 1}: layer_range {list(src.layers)} of '{src.model}' goes past its "
                                  f"{stack.count} layers", hint="layer_range [a, b] takes layers a..b-1, so b is at "
                                                                "most the model's layer count")
            sources.append(_Source(ckpt, src.model, src.params, src.layers[0], member))
        out.append(_Slice(sources, s.params, s.sources[0].length))
    return out


def _jobs(recipe: Recipe, method: Method, base: Checkpoint | None, models: list[Checkpoint], threads: int):
    ref = base or models[0]
    inputs = ([("base", base)] if base else []) + [(f"model {i + 1}", m) for i, m in enumerate(models)]
    notes: list[str] = []
    check_inputs(ref, inputs)
    stack, why = layers.find_stack(ref.tensors, ref.config)
    if recipe.slices and stack is None:
        raise IncompatibleModels(f"slices need the models' layer stack, but npmerge cannot find it in '{ref.label}': "
                                 f"{why}", hint="slices work on models whose layers are numbered tensors "
                                                "(e.g. model.layers.0.)")
    if stack is None and not recipe.is_uniform:
        notes.append(f"no layer stack found in '{ref.label}' ({why}): every tensor takes t = 0, "
                     "the first value of each gradient")
    slices = _slices(recipe, base, models, stack)
    if recipe.slices:
        try:
            specs = layers.sliced(ref.tensors, stack, [(s.length, [src.first for src in s.sources]) for s in slices])
        except ValueError as exc:
            raise IncompatibleModels(f"slices cannot be stacked: {exc}",
                                     hint="slices work on models whose layers all hold the same tensors") from None
    else:
        specs = layers.whole_model(ref.tensors, stack, len(slices[0].sources))
    _check_filters(recipe, specs)
    resolve = _Resolver(recipe, method)
    rounding = recipe.dtype if recipe.dtype in ("BF16", "F16") else None
    jobs, mixed, int_copies = [], set(), []
    for spec in specs:
        sl = slices[spec.slice]
        refs = [src.ckpt.tensors[n] for src, n in zip(sl.sources, spec.inputs)]
        roles = ["base" if src.member < 0 else f"model {src.member + 1}" for src in sl.sources]
        dtypes = [r.info.dtype.name for r in refs]
        kinds = {DTYPES[d].is_float for d in dtypes}
        first = next((i for i, src in enumerate(sl.sources) if src.member < 0), 0)  # the base, else the first
        info = refs[first].info
        if len({r.info.shape for r in refs}) > 1:
            raise IncompatibleModels(f"tensor '{spec.name}' comes from inputs of different shapes: "
                                     + ", ".join(f"{role} '{src.ref}' '{n}' {list(r.info.shape)}"
                                                 for role, src, n, r in zip(roles, sl.sources, spec.inputs, refs)),
                                     hint="slices must take matching layers")
        if kinds == {False}:
            _check_equal(spec, sl, refs, inputs)
            int_copies.append(spec.name)
            jobs.append(TensorJob(spec.name, info.shape, info.numel, info.dtype.name, True, method, None,
                                  (source(sl.sources[first].ckpt, spec.inputs[first]),), {}, (), 1, constants.BLOCK,
                                  layer=spec.layer))
            continue
        unsupported = {d for d in dtypes if d not in DECODABLE}
        if len(kinds) > 1 or unsupported:
            raise IncompatibleModels(
                f"tensor '{spec.name}' cannot be merged: dtypes " + ", ".join(map(" ".join, zip(roles, dtypes))),
                hint="a float tensor in one model is an integer tensor in another" if len(kinds) > 1
                     else "npmerge merges BF16, F16, F32, F64 and FP8 (E4M3, E5M2) float tensors")
        if len(set(dtypes)) > 1:
            mixed.add(spec.name)
        merged = [(src, n) for src, n in zip(sl.sources, spec.inputs) if src.member >= 0]
        g, mp = resolve(spec, sl, merged)
        out_dtype = recipe.out_dtype or info.dtype.name
        if out_dtype not in ENCODABLE:
            raise RecipeError(f"tensor '{spec.name}' is stored as {out_dtype}, which npmerge cannot write",
                              hint="choose an output dtype with --out-dtype (bfloat16, float16, float32)")
        b = source(base, spec.inputs[first]) if first < len(sl.sources) and sl.sources[first].member < 0 else None
        m = tuple(source(src.ckpt, n) for src, n in merged)
        members = tuple(src.member for src, _ in merged)
        if method.copies and method.copies(g, mp) and _unchanged(m[0], out_dtype, rounding):
            jobs.append(TensorJob(spec.name, info.shape, info.numel, m[0].dtype, True, method, None, m, g, tuple(mp),
                                  1, constants.BLOCK, layer=spec.layer, members=members))
            continue
        job = TensorJob(spec.name, info.shape, info.numel, out_dtype, False, method, b, m, g, tuple(mp), 1,
                        constants.BLOCK, input_round=rounding, stream_index=tuple(range(len(m))), layer=spec.layer,
                        members=members)
        passes = len(method.driver(context(job, threads)).passes)
        jobs.append(replace(job, passes=passes))
    if int_copies:
        notes.append(f"{len(int_copies)} integer/bool tensor(s) copied from {label(inputs[0][0], ref)}, not merged: "
                     + ", ".join(int_copies[:5]) + (", ..." if len(int_copies) > 5 else ""))
    if mixed:
        notes.append(f"{len(mixed)} tensor(s) have different dtypes across models; all are decoded to float32")
    for i, m in enumerate(models):
        weights = [p["weight"] for j in jobs for k, p in zip(_members(j), j.model_params) if k == i and "weight" in p]
        if any(w < 0 for w in weights):
            notes.append(f"model {i + 1} has a negative weight ({min(weights)}): its "
                         + ("task vector is subtracted" if base else "weights are subtracted"))
    return jobs, notes, _config_updates(recipe, ref, stack, slices, notes)


def _members(job: TensorJob) -> tuple[int, ...]:
    return job.members or tuple(range(len(job.models)))


def _unchanged(src: TensorSource, out_dtype: str, rounding: str | None) -> bool:
    """Copying the stored bytes gives exactly what the recipe asks for this input."""
    return out_dtype == src.dtype and rounding in (None, src.dtype) and src.raw() is not None


class _Resolver:
    """Per-tensor parameter values: the settings that apply, evaluated, then validated by
    the method (cached: most tensors share their values)."""

    def __init__(self, recipe: Recipe, method: Method):
        self.recipe, self.method = recipe, method
        self.cache: dict = {}

    def __call__(self, spec, sl: _Slice, merged: list) -> tuple[dict, list[dict]]:
        top = self.recipe.params
        g = {}
        for p in self.method.global_params:
            value = values.resolve([sl.params.get(p.name), top.get(p.name)], spec.name, spec.t)
            if value is not values.NO_MATCH:
                g[p.name] = value
        m = []
        for src, name in merged:
            own = {}
            for p in self.method.model_params:
                value = values.resolve([src.params.get(p.name), sl.params.get(p.name), top.get(p.name)], name, spec.t)
                if value is not values.NO_MATCH:
                    own[p.name] = value
            m.append(own)
        key = (tuple(g.items()), tuple(tuple(d.items()) for d in m), tuple(src.ref for src, _ in merged))
        if key not in self.cache:
            try:
                self.cache[key] = self.method.resolve(g, m, [src.ref for src, _ in merged])
            except RecipeError as exc:
                raise RecipeError(f"tensor '{spec.name}': {exc.message}", hint=exc.hint) from None
        g, m = self.cache[key]
        return dict(g), [dict(x) for x in m]


def _check_filters(recipe: Recipe, specs) -> None:
    """A filter that matches no tensor is almost always a typo: refuse it."""
    todo = recipe.filters()
    if not todo:
        return
    names = {s.name for s in specs} | {n for s in specs for n in s.inputs}
    for where, flt in todo:
        if not any(flt in n for n in names):
            raise RecipeError(f"filter '{flt}' ({where}) matches no tensor of the merge",
                              hint="a filter is part of a tensor name, e.g. self_attn, mlp, input_layernorm; "
                                   "list the names with `npmerge info MODEL --tensors`")


def _check_equal(spec, sl: _Slice, refs: list[TensorRef], inputs) -> None:
    """Integer/bool tensors are copied, never merged: every source must hold the same bytes."""
    if all(n == spec.name for n in spec.inputs) and len(sl.sources) == len(inputs):
        check_equal_data(spec.name, inputs)
        return
    a = refs[0]
    for src, name, b in zip(sl.sources[1:], spec.inputs[1:], refs[1:]):
        x, y = a.file.flat(a.info.name).view("u1"), b.file.flat(b.info.name).view("u1")
        if a.info.dtype != b.info.dtype or not (x.size == y.size and (x == y).all()):
            raise IncompatibleModels(f"integer tensor '{spec.name}' differs between '{sl.sources[0].ref}' "
                                     f"('{spec.inputs[0]}') and '{src.ref}' ('{name}')",
                                     hint="integer/bool tensors (ids, masks) are copied, never averaged; "
                                          "they must be identical in every source")


def _config_updates(recipe: Recipe, ref: Checkpoint, stack, slices: list[_Slice], notes: list) -> dict:
    """config.json keys that must follow the output's layers (slices): the layer count, and
    a per-layer `layer_types` list."""
    if not recipe.slices:
        return {}
    total = sum(s.length for s in slices)
    order = [s.sources[0].first + k for s in slices for k in range(s.length)]
    config = ref.config or {}
    updates = {}
    for path, scope in [((), config)] + [((k,), v) for k, v in config.items() if isinstance(v, dict)]:
        for key in layers.LAYER_KEYS:
            if type(scope.get(key)) is int and scope[key] == stack.count:
                updates[path + (key,)] = total
        types = scope.get("layer_types")
        if isinstance(types, list) and len(types) == stack.count:
            updates[path + ("layer_types",)] = [types[i] for i in order]
    if not any(p[-1] in layers.LAYER_KEYS for p in updates):
        notes.append(f"config.json of '{ref.label}' declares no layer count: the output's {total} layers are not "
                     "recorded there")
    return updates


def _tokenizer_source(recipe: Recipe, base, models: list[Checkpoint], notes: list) -> Path | None:
    """tokenizer_source is accepted while it changes nothing: every model has the source's
    vocabulary (token -> id). Its tokenizer files are then copied."""
    src = recipe.tokenizer_source
    if src is None:
        return None
    from .io.vocab import read_tokenizer

    if src in ("base", "union"):
        owner = base or models[0]
    elif same_model(src, recipe.base):
        owner = base
    else:
        owner = next((m for m, e in zip(models, recipe.models) if same_model(src, e.path)), None)
        if owner is None:
            raise RecipeError(f"tokenizer_source '{src}' is not one of the recipe's models",
                              hint="give base, union, or a model of the recipe")
    if owner.root is None:
        raise InvalidCheckpoint(f"tokenizer_source '{src}': '{owner.label}' is a single .safetensors file without "
                                "tokenizer files", hint="point the recipe at the model's directory")
    want = read_tokenizer(owner.root)
    for ckpt in ([base] if base else []) + models:
        if ckpt is owner or ckpt.root is None:
            continue
        have = read_tokenizer(ckpt.root, fallback=want)
        if dict(have.vocab) != dict(want.vocab):
            extra = [t for t in have.vocab if want.vocab.get(t) != have.vocab[t]]
            missing = [t for t in want.vocab if t not in have.vocab]
            detail = ", ".join(f"{t!r}" for t in (extra + missing)[:5])
            raise IncompatibleModels(
                f"tokenizer_source '{src}': the vocabulary of '{ckpt.label}' differs from that of '{owner.label}' "
                f"({len(extra)} token(s) with another id or not in it, {len(missing)} missing: {detail})",
                hint="npmerge does not merge vocabularies yet: tokenizer_source is accepted when every model has "
                     "the same tokens at the same ids")
    notes.append(f"tokenizer_source '{src}': every model has the same vocabulary ({len(want.vocab)} tokens), so "
                 f"nothing is remapped; the tokenizer files of '{owner.label}' are copied")
    return owner.root

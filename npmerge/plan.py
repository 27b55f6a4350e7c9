"""Recipe + checkpoints -> a complete Plan, before the first byte of data is read.

Everything that can fail on bad input fails here: unreadable or corrupt files,
models that do not fit together, dtypes npmerge cannot merge, a memory budget too
small for one span. The plan fixes every tensor's inputs, parameters, output
dtype and shard position, and the span size that keeps working memory within
--max-memory.

Parameters are resolved per tensor (docs/recipes.md): each job carries its own values,
found by the precedence model -> slice -> top level -> method default (global
parameters from the slice and the top level only), filters matched against the
model's input tensor name for per-model parameters and the output name for global
ones, gradients evaluated at the tensor's layer position t in its slice. The method
then validates each tensor's values.

Models need not store their weights alike (io/layout.py): a tied model's embeddings feed
the output head, dead head copies are ignored, buffers are copied from the base. With a
tokenizer source (io/vocab.py) the embedding and head tensors are read in the output
vocabulary's row order; without one, tokenizers are compared so that rows merged by
position are rows of the same tokens.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__, constants
from . import chat_template, layers, values
from .budget import choose_span, default_budget, grant_caches, parse_size
from .compat import check_distinct, check_equal_data, check_inputs, check_names, label
from .dtypes import DECODABLE, DTYPES, ENCODABLE
from .errors import IncompatibleModels, InvalidCheckpoint, RecipeError
from .io.checkpoint import Checkpoint, TensorRef
from .io.layout import LayoutPlan, ModelLayout, config_changes, embedding_name, is_vocab_tensor, plan_layout
from .io.models import fingerprints, open_model, source
from .io.sources import TensorSource
from .io.tokenizer import TOKENIZER_FILES, read_tokenizer, write_tokenizer_files
from .io.vocab import OutputVocab, build_output_vocab, compare_vocabs
from .io.vocab_rows import VocabRowsSource
from .io.shards import OutputTensor, ShardLayout, plan_one_file, plan_shards
from .io.writer import OutputCheck
from .methods import registry
from .methods.protocol import Driver, TensorContext
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
    stream_index: tuple[int, ...] = ()  # per model: its random stream (docs/semantics.md §A)
    layer: int | None = None  # output layer index; None outside the layer stack
    members: tuple[int, ...] = ()  # per model: its index in Plan.models (empty: 0, 1, ... in order)
    driver: Driver | None = None  # the method's driver of this tensor (None: a copy), built once (with_driver)

    @property
    def sources(self) -> tuple[TensorSource, ...]:
        return ((self.base,) if self.base else ()) + self.models

    @property
    def read_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)

    @property
    def member_indices(self) -> tuple[int, ...]:
        """Per model of this tensor: its index in Plan.models."""
        return self.members or tuple(range(len(self.models)))

    def with_driver(self, threads: int) -> TensorJob:
        """This job with its driver, for up to `threads` compute threads, and the driver's passes."""
        ctx = TensorContext(self.name, self.shape, self.numel, self.params, self.model_params, self.base is not None,
                            threads, self.stream_index)
        driver = self.method.driver(ctx)
        return replace(self, driver=driver, passes=len(driver.passes))


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
    vocab: OutputVocab | None = None  # the output vocabulary of a tokenizer source (io/vocab.py)
    tokenizer_files: dict | None = None  # with a tokenizer source: the output's tokenizer files, name -> bytes
    tensor_map: LayoutPlan | None = None  # which input tensor feeds which output tensor (io/layout.py)
    output: OutputCheck | None = None  # the output location's checks (api.plan_merge with `out`)
    one_file: bool = False  # the output is one .safetensors file (no directory, no companion files)
    stages: list | None = None  # a multi-stage recipe's earlier stages (stages.py), for the report and card

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
        out = {
            "npmerge_version": __version__,
            "recipe_sha256": hashlib.sha256(self.recipe.to_yaml().encode()).hexdigest(),
            "recipe": self.recipe.to_data(),
            "inputs": [e for model in self.inputs for e in fingerprints(model)],
        }
        if self.vocab is not None:  # the row maps (built from tokenizer files the inputs above do not cover)
            h = hashlib.sha256()
            for src in (s for j in self.jobs for s in j.sources if isinstance(s, VocabRowsSource)):
                h.update(f"{src.name}:{src.fingerprint()};".encode())
            out["vocabulary"] = h.hexdigest()
        return out

    def close(self) -> None:
        for ckpt in self.inputs:
            ckpt.close()



def build_plan(recipe: Recipe, *, max_memory=None, threads: int | None = None,
               shard_size=None, one_file: str | None = None) -> Plan:
    """Open and check every input, then lay out the whole merge (`one_file`: as that one
    .safetensors file, its header holding the recipe)."""
    method = registry.get(recipe.method)
    budget = parse_size(max_memory) or default_budget()
    default_limit = constants.ONE_FILE_LIMIT if one_file else constants.DEFAULT_SHARD_BYTES
    shard_bytes = parse_size(shard_size) or default_limit
    if threads is None:
        threads = os.cpu_count() or 1
    if threads < 1:
        raise RecipeError(f"--threads must be >= 1, got {threads}")
    opened: list[Checkpoint] = []
    try:
        base, models = _open_models(recipe, opened)
        check_distinct(base, models)
        jobs, notes, config_updates, vocab, tensor_map = _jobs(recipe, method, base, models, threads)
        tokenizer_files = write_tokenizer_files(vocab.source_dir, vocab.added, vocab.strip_at) if vocab is not None else None
        if recipe.chat_template is not None:
            tokenizer_files = _with_chat_template(recipe, base, models, tokenizer_files, notes)
        if one_file and tokenizer_files:
            raise RecipeError("a one-file output (-o NAME.safetensors) carries no tokenizer files, which a "
                              "tokenizer source or chat_template writes", hint="give -o a model directory")
        tensors = [OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs]
        layout = (plan_one_file(tensors, one_file, one_file_metadata(recipe, shard_bytes), shard_bytes,
                                constants.ONE_FILE_SUMMARY_BYTES) if one_file else plan_shards(tensors, shard_bytes))
        span, work = choose_span(jobs, budget, threads)
        jobs = [replace(j, span=min(span, -(-j.numel // constants.BLOCK) * constants.BLOCK) or constants.BLOCK)
                for j in jobs]
        work = max(work, grant_caches(jobs, budget, threads, span))
    except BaseException:
        for c in opened:
            c.close()
        raise
    global_params, model_params = headline(jobs, len(models))
    adapter_notes = [n for m in opened for n in getattr(m, "notes", ())]
    return Plan(recipe, method, global_params, model_params, base, models, jobs, layout, span, budget,
                work, threads, list(recipe.notes) + adapter_notes + notes, config_updates, vocab, tokenizer_files,
                tensor_map, one_file=bool(one_file))


def one_file_metadata(recipe: Recipe, limit: int) -> dict[str, str]:
    """What a one-file output's header says of its making (strings, as diffusion tools show
    them): the recipe as run, and the size limit it was laid out with (verify --recompute)."""
    return {**constants.OUTPUT_METADATA, "npmerge_version": __version__, "merge_method": recipe.method,
            "npmerge_recipe": recipe.to_yaml(), "npmerge_file_limit": str(limit)}


def _open_models(recipe: Recipe, opened: list) -> tuple[Checkpoint | None, list[Checkpoint]]:
    """Open (and validate) the base and every merged model; `opened` collects them for cleanup.
    A LoRA adapter is applied to the base (io/models.py), its shapes checked on the way."""
    base = open_model(recipe.base, role="base") if recipe.base else None
    if base:
        opened.append(base)
    models = []
    for i, entry in enumerate(recipe.models):
        models.append(open_model(entry.path, base, role=f"model {i + 1}"))
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
    """Every output tensor's job, with the plan's notes, config.json updates, output
    vocabulary and tensor map."""
    ref = base or models[0]
    inputs = ([("base", base)] if base else []) + [(f"model {i + 1}", m) for i, m in enumerate(models)]
    notes: list[str] = []
    tensor_map = plan_layout([ModelLayout(c.label, tuple(c.tensors), c.config) for _, c in inputs],
                             0 if base else None)
    check_names(inputs, tensor_map)
    rows, vocab_tensors = _vocab_tensors(inputs, tensor_map)
    vocab = _vocabulary(recipe, inputs, rows, notes) if recipe.tokenizer_source is not None else None
    check_inputs(inputs, tensor_map, vocab_tensors, remapped=vocab is not None)
    if vocab is None:
        _compare_tokenizers(inputs, rows, notes, recipe.chat_template is None)
    notes.extend(tensor_map.notes)
    feeds = {t.name: t for t in tensor_map.tensors}
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
            specs = layers.sliced(list(feeds), stack, [(s.length, [src.first for src in s.sources]) for s in slices])
        except ValueError as exc:
            raise IncompatibleModels(f"slices cannot be stacked: {exc}",
                                     hint="slices work on models whose layers all hold the same tensors") from None
    else:
        specs = layers.whole_model(list(feeds), stack, len(slices[0].sources))
    _check_filters(recipe, specs)
    build = _JobBuilder(recipe, method, inputs, feeds, slices, vocab, vocab_tensors, threads, has_base=base is not None)
    jobs = [build(spec) for spec in specs]
    if build.int_copies:
        notes.append(f"{len(build.int_copies)} integer/bool tensor(s) copied from {label(inputs[0][0], ref)}, not "
                     "merged: " + ", ".join(build.int_copies[:5]) + (", ..." if len(build.int_copies) > 5 else ""))
    if build.mixed:
        notes.append(f"{len(build.mixed)} tensor(s) have different dtypes across models; all are decoded to float32")
    for i, m in enumerate(models):
        weights = [p["weight"] for j in jobs for k, p in zip(j.member_indices, j.model_params) if k == i and "weight" in p]
        if any(w < 0 for w in weights):
            notes.append(f"model {i + 1} has a negative weight ({min(weights)}): its "
                         + ("task vector is subtracted" if base else "weights are subtracted"))
    updates = _config_updates(recipe, ref, stack, slices, notes)
    updates.update(config_changes(ref.config or {}, vocab.size if vocab else None, tensor_map.tie_word_embeddings))
    return jobs, notes, updates, vocab, tensor_map


class _JobBuilder:
    """One output tensor's TensorJob from its layer spec: which input tensors feed it, its
    parameters, dtypes and shape checked, a copy or a merge (with its driver). Collects the
    tensors that are integer copies or of mixed dtypes for the plan's notes."""

    def __init__(self, recipe: Recipe, method: Method, inputs: list, feeds: dict, slices: list,
                 vocab: OutputVocab | None, vocab_tensors, threads: int, *, has_base: bool):
        self.recipe, self.method, self.inputs, self.feeds, self.slices = recipe, method, inputs, feeds, slices
        self.vocab, self.vocab_tensors, self.threads, self.has_base = vocab, vocab_tensors, threads, has_base
        self.resolve = _Resolver(recipe, method)
        self.rounding = recipe.dtype if recipe.dtype in ("BF16", "F16") else None
        self.mixed: set[str] = set()
        self.int_copies: list[str] = []

    def slot(self, src: _Source) -> int:
        """The source's position among `inputs` (the base first, if any)."""
        return src.member + 1 if self.has_base else src.member  # the base is member -1

    def __call__(self, spec) -> TensorJob:
        method, feeds, vocab = self.method, self.feeds, self.vocab
        sl = self.slices[spec.slice]
        buffer = feeds[spec.inputs[0]]
        if buffer.copy_from is not None:  # a non-persistent buffer: the reference's bytes (io/layout.py)
            holder, name = self.inputs[buffer.copy_from][1], spec.inputs[0]
            info = holder.tensors[name].info
            return TensorJob(spec.name, info.shape, info.numel, info.dtype.name, True, method, None,
                             (source(holder, name),), {}, (), 1, constants.BLOCK, layer=spec.layer)
        feed = [feeds[n].inputs[self.slot(src)] for src, n in zip(sl.sources, spec.inputs)]  # per source, its own name
        refs = [src.ckpt.tensors[n] for src, n in zip(sl.sources, feed)]
        roles = ["base" if src.member < 0 else f"model {src.member + 1}" for src in sl.sources]
        dtypes = [r.info.dtype.name for r in refs]
        kinds = {DTYPES[d].is_float for d in dtypes}
        first = next((i for i, src in enumerate(sl.sources) if src.member < 0), 0)  # the base, else the first
        info = refs[first].info
        rows_mapped = vocab is not None and spec.layer is None and spec.inputs[0] in self.vocab_tensors
        shape = (vocab.size, *info.shape[1:]) if rows_mapped else info.shape
        if len({r.info.shape[1:] if rows_mapped else r.info.shape for r in refs}) > 1:
            raise IncompatibleModels(f"tensor '{spec.name}' comes from inputs of different shapes: "
                                     + ", ".join(f"{role} '{src.ref}' '{n}' {list(r.info.shape)}"
                                                 for role, src, n, r in zip(roles, sl.sources, feed, refs)),
                                     hint="slices must take matching layers")
        if kinds == {False}:
            _check_equal(spec, sl, refs, self.inputs)
            self.int_copies.append(spec.name)
            return TensorJob(spec.name, info.shape, info.numel, info.dtype.name, True, method, None,
                             (source(sl.sources[first].ckpt, feed[first]),), {}, (), 1, constants.BLOCK,
                             layer=spec.layer)
        unsupported = {d for d in dtypes if d not in DECODABLE}
        if len(kinds) > 1 or unsupported:
            raise IncompatibleModels(
                f"tensor '{spec.name}' cannot be merged: dtypes " + ", ".join(map(" ".join, zip(roles, dtypes))),
                hint="a float tensor in one model is an integer tensor in another" if len(kinds) > 1
                     else "npmerge merges BF16, F16, F32, F64 and FP8 (E4M3, E5M2) float tensors")
        if len(set(dtypes)) > 1:
            self.mixed.add(spec.name)
        merged = [(src, n) for src, n in zip(sl.sources, spec.inputs) if src.member >= 0]  # filters see these names
        g, mp = self.resolve(spec, sl, merged)
        out_dtype = self.recipe.out_dtype or info.dtype.name
        if out_dtype not in ENCODABLE:
            raise RecipeError(f"tensor '{spec.name}' is stored as {out_dtype}, which npmerge cannot write",
                              hint="choose an output dtype with --out-dtype (bfloat16, float16, float32)")
        srcs = [_read(src, self.slot(src), n, feeds[name], self.inputs, vocab if rows_mapped else None)
                for src, n, name in zip(sl.sources, feed, spec.inputs)]
        b = srcs[first] if sl.sources[first].member < 0 else None
        m = tuple(s for s, src in zip(srcs, sl.sources) if src.member >= 0)
        members = tuple(src.member for src, _ in merged)
        if method.copies and method.copies(g, mp) and _unchanged(m[0], out_dtype, self.rounding):
            return TensorJob(spec.name, info.shape, info.numel, m[0].dtype, True, method, None, m, g, tuple(mp),
                             1, constants.BLOCK, layer=spec.layer, members=members)
        job = TensorJob(spec.name, shape, math.prod(shape), out_dtype, False, method, b, m, g, tuple(mp), 1,
                        constants.BLOCK, input_round=self.rounding, stream_index=tuple(range(len(m))),
                        layer=spec.layer, members=members)
        return job.with_driver(self.threads)


def _read(src: _Source, slot: int, name: str, feeding, inputs, vocab: OutputVocab | None) -> TensorSource:
    """The tensor `name` of one slice source as the engine reads it: with `vocab`, its rows
    in output-vocabulary order (from every input's tensor feeding this output, `feeding`),
    unless they already are."""
    if vocab is None or vocab.identity(slot):
        return source(src.ckpt, name)
    return VocabRowsSource(vocab, slot, [source(c, n) for (_, c), n in zip(inputs, feeding.inputs)], src.ckpt.label)


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


def _vocab_tensors(inputs, tensor_map: LayoutPlan) -> tuple[list[int | None], set[str]]:
    """Each input's embedding row count (None: no single embedding tensor) and the output
    tensors with one row per token in every input (embeddings, output heads)."""
    rows = []
    for _, c in inputs:
        name = embedding_name(c.tensors)
        shape = c.tensors[name].info.shape if name else ()
        rows.append(shape[0] if len(shape) == 2 else None)
    if None in rows:
        return rows, set()
    vocab = {t.name for t in tensor_map.tensors if t.copy_from is None and all(
        is_vocab_tensor(n, c.tensors[n].info.shape, r) for n, (_, c), r in zip(t.inputs, inputs, rows))}
    return rows, vocab


def _vocabulary(recipe: Recipe, inputs, rows: list, notes: list) -> OutputVocab:
    """The output vocabulary of the recipe's tokenizer source (io/vocab.py: mergekit's rules)."""
    src = recipe.tokenizer_source
    has_base = recipe.base is not None
    if None in rows:
        role, c = inputs[rows.index(None)]
        raise IncompatibleModels(f"tokenizer source '{src}': npmerge finds no single input embedding tensor in "
                                 f"{label(role, c)}, so it cannot map its rows to tokens",
                                 hint="merge without a tokenizer source (rows are then merged by position)")
    if src in ("base", "union"):
        which = src
    elif has_base and same_model(src, recipe.base):
        which = 0
    else:
        which = next(i for i, e in enumerate(recipe.models) if same_model(src, e.path)) + has_base
    (ref_role, ref), *others = inputs
    base_tok = _tokenizer(ref_role, ref, rows[0], None)
    toks = [base_tok] + [_tokenizer(role, c, r, base_tok) for (role, c), r in zip(others, rows[1:])]
    vocab = build_output_vocab(which, [(c.label, t) for (_, c), t in zip(inputs, toks)], 0 if has_base else None,
                               recipe.pad_to_multiple_of)
    notes.extend(vocab.notes)
    if all(vocab.identity(i) for i in range(len(inputs))):
        notes.append(f"tokenizer source '{src}': every model has the output vocabulary in the same rows, so no "
                     f"row is remapped")
    return vocab


def _tokenizer(role: str, ckpt: Checkpoint, rows: int, fallback):
    """A model's tokenizer with its embedding row count; a model without tokenizer.json
    is assumed to have the base's (as mergekit)."""
    if ckpt.root is None:
        if fallback is None:
            raise InvalidCheckpoint(f"{label(role, ckpt)} is a single .safetensors file without tokenizer files: "
                                    "a tokenizer source needs its tokenizer.json",
                                    hint="point to the model's directory")
        return replace(fallback, path=None, rows=rows, assumed_from=fallback.path)
    return read_tokenizer(ckpt.root, rows, fallback=fallback)


def _with_chat_template(recipe: Recipe, base, models, tokenizer_files: dict | None, notes: list) -> dict | None:
    """The output's tokenizer files (a tokenizer source's, else the reference's, as copied)
    with the recipe's chat template written in; unchanged when `auto` finds none."""
    text = chat_template.resolve(recipe.chat_template, [c.root for c in ([base] if base else []) + models], notes)
    if text is None:
        return tokenizer_files
    if tokenizer_files is None:
        root = (base or models[0]).root
        tokenizer_files = {n: (root / n).read_bytes() for n in TOKENIZER_FILES if root and (root / n).is_file()}
    return chat_template.apply(tokenizer_files, text, notes)


def _compare_tokenizers(inputs, rows: list, notes: list, template_note: bool = True) -> None:
    """Without a tokenizer source rows are merged by position and the reference's tokenizer
    is copied: refuse a model that has other tokens at the reference's ids; note tokens it
    keeps in the reference's padded rows, and a chat template the output will not have
    (`template_note`: unless the recipe sets one)."""
    (ref_role, ref), *others = inputs
    if ref.root is None or not (ref.root / "tokenizer.json").is_file():
        return
    known = [r for r in rows if r is not None]
    common = min(known) if known else None
    want = None
    for i, (role, c) in enumerate(others, 1):
        if c.root is None or not (c.root / "tokenizer.json").is_file() or _same_files(ref.root, c.root):
            continue
        want = want or read_tokenizer(ref.root, rows[0])
        have = read_tokenizer(c.root, rows[i])
        diff = compare_vocabs(want, have, label(role, c), rows=common)
        if diff.error() is not None:
            raise diff.error()
        if diff.note() is not None:
            notes.append(diff.note())
        if template_note and have.chat_template is not None and have.chat_template != want.chat_template:
            notes.append(f"the chat template of {label(role, c)} is not in the output: the tokenizer files of "
                         f"{label(ref_role, ref)} are copied (tokenizer_source: '{c.label}' writes that model's "
                         "tokenizer and template)")


def _same_files(a: Path, b: Path) -> bool:
    """Both directories' tokenizer.json and tokenizer_config.json are byte-identical (or both absent)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        x, y = a / name, b / name
        if x.is_file() != y.is_file() or (x.is_file() and x.read_bytes() != y.read_bytes()):
            return False
    return True

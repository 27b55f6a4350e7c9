"""The frozen Recipe: what to merge and how, from CLI flags or mergekit-style YAML
(docs/recipes.md).

A recipe never touches tensors. Everything that can be checked without opening a
model is checked here: keys (misspelled ones get a "did you mean"), the shape and type
of every parameter value, which level a parameter may sit at, the base model rules and
the supported subset of `slices:`. Where mergekit silently ignores something that
changes nothing, a note says so; where ignoring would change the result, it is an
error. Values that vary per tensor (gradients, filter lists) are resolved by the
planner, which knows the tensors.

The recipe keeps the user's structure (model references as written, gradients, filters,
slices), so `to_yaml` writes a recipe that reproduces the merge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__, chat_template
from .dtypes import ALIASES, TORCH_NAMES, parse_user_dtype
from .errors import RecipeError, shown
from .methods import registry
from .recipe_yaml import decode_recipe, dumper, load_yaml, plain, with_params
from .values import check_level, filters, is_varying, other_methods, suggest

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "npmerge")
REFUSED_KEYS = {
    "modules": "per-module recipes ('modules:') are not supported; use 'models:' or 'slices:'",
}
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
NPMERGE_KEYS = ("allow_nonfinite",)
INPUT_DTYPES = ("BF16", "F16", "F32")  # `dtype:` rounds inputs to BF16/F16; F32 changes nothing
MODELS_HINT = "list them as entries: models: [{model: path/to/model, parameters: {weight: 1.0}}]"
SLICES_HINT = "e.g. slices: [{sources: [{model: path/to/model, layer_range: [0, 16]}]}]"


def same_model(a: str | None, b: str | None) -> bool:
    """Two model references written differently but naming the same path (./x, x/)."""
    if a is None or b is None:
        return False
    return _norm(a) == _norm(b)


def _norm(ref: str) -> str:
    return os.path.normpath(os.path.expanduser(ref))


@dataclass(frozen=True)
class ModelEntry:
    """A model of `models:` (or of the command line) and its own parameter settings."""

    path: str  # the reference as written
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """A model's layers a..b-1 feeding one output slice."""

    model: str
    layers: tuple[int, int]
    params: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A merge as the user wrote it, validated.

    `entries` is the `models:` list as written (it may list the base); `slices` the
    `slices:` list (one of the two is given). Settings (`params` of every level) are
    normalised by values.parse_setting. Derived on construction: `base` (the base
    model, None for methods without one), `models` (the merged models, in order: the
    entries less the base, or the slices' distinct non-base sources) and `notes`.
    """

    method: str
    entries: tuple[ModelEntry, ...] = ()
    base_model: str | None = None  # as written; for a method without a base it must be a listed model
    params: dict = field(default_factory=dict)  # top-level settings
    slices: tuple[Slice, ...] = ()
    dtype: str | None = None  # input rounding: BF16 / F16, or F32 (none)
    out_dtype: str | None = None  # explicit output dtype (out_dtype, else dtype); None: each tensor's stored dtype
    tokenizer_source: str | None = None  # 'base', 'union' or a model reference (io/vocab.py)
    pad_to_multiple_of: int | None = None  # output vocabulary rows rounded up to a multiple (tokenizer source only)
    chat_template: str | None = None  # a built-in name, 'auto' or a Jinja template (chat_template.py)
    allow_nonfinite: bool = False
    notes: tuple[str, ...] = ()
    source: str | None = field(default=None, compare=False)  # recipe file name for messages; None: command line
    listed_base_is_base: bool = True  # mergekit's rule; False on the command line, where BASE given again is an error
    base: str | None = field(init=False, default=None)
    models: tuple[ModelEntry, ...] = field(init=False, default=())

    def __post_init__(self):
        method = registry.get(self.method)
        object.__setattr__(self, "method", method.name)
        if self.entries and self.slices:
            raise self._error("give either 'models' or 'slices', not both")
        if not self.entries and not self.slices:
            raise self._error("no models to merge", hint="list them under 'models:' (or 'slices:')")
        notes = list(self.notes)
        self._check_base(method, notes)
        self._check_settings(method, notes)
        if self.slices:
            self._check_slices(method)
        else:
            self._check_models(method, notes)
        self._check_tokenizer()
        object.__setattr__(self, "notes", tuple(dict.fromkeys(notes)))

    # -- derived facts ---------------------------------------------------------------
    def is_base(self, ref: str) -> bool:
        """Whether a listed model is the base (and so not merged as a model)."""
        return self.listed_base_is_base and self.base is not None and same_model(ref, self.base)

    @property
    def is_uniform(self) -> bool:
        """No slices, gradients or filters: every tensor gets the same values."""
        return not self.slices and not any(is_varying(v) for p in self._all_settings() for v in p.values())

    def filters(self) -> list[tuple[str, str]]:
        """(where, filter) of every filter string in the recipe."""
        out = []
        for where, params in self._levels():
            for key, setting in params.items():
                out += [(f"'{key}' of {where}" if where != "top level" else f"parameter '{key}'", f)
                        for f in filters(setting)]
        return out

    def _all_settings(self):
        return [params for _, params in self._levels()]

    def _levels(self):
        """(where, settings) of every level that holds parameters."""
        yield "top level", self.params
        for i, e in enumerate(self.entries):
            yield f"model {i + 1} '{e.path}'", e.params
        for k, s in enumerate(self.slices):
            yield f"slice {k + 1}", s.params
            for src in s.sources:
                yield f"slice {k + 1} model '{src.model}'", src.params

    def _error(self, message: str, hint: str | None = None) -> RecipeError:
        return RecipeError(f"{self.source}: {message}" if self.source else message, hint=hint)

    # -- checks ------------------------------------------------------------------------
    def _listed(self) -> list[str]:
        return [e.path for e in self.entries] + [src.model for s in self.slices for src in s.sources]

    def _check_base(self, method, notes: list) -> None:
        given = self.base_model
        if method.base == "required" and not given:
            raise self._error(f"{method.name} needs a base model",
                              hint="give base_model in the recipe (or BASE first on the command line)")
        if given and method.base == "none":
            if not any(same_model(given, ref) for ref in self._listed()):
                raise self._error(f"{method.name} has no base model, but base_model '{given}' is given",
                                  hint="list it among the models (with its parameters) to merge it, "
                                       "or remove base_model")
            notes.append(f"base_model '{given}' is merged as one of the models: {method.name} has no base "
                         "(as mergekit)")
            given = None
        object.__setattr__(self, "base", given)

    def _check_settings(self, method, notes: list) -> None:
        """Validate every level's settings; drop what changes nothing, with notes."""
        ignored: dict[str, list[str]] = {}
        other = other_methods(method)

        def clean(params: dict, where: str | None, level: str) -> dict:
            try:
                return check_level(method, other, params, where, level, self._error, ignored)
            except RecipeError as exc:
                if self.source and exc.message.startswith(f"{self.source}: "):
                    raise
                raise self._error(exc.message, exc.hint) from None

        object.__setattr__(self, "params", clean(self.params, None, "top"))
        entries = []
        for i, e in enumerate(self.entries):
            where = f"model {i + 1} '{e.path}'"
            params = clean(e.params, where, "model")
            if self.is_base(e.path) and params:
                notes.append(f"parameters of the base model '{e.path}' are ignored ({', '.join(params)}): "
                             "the base contributes no task vector (as mergekit)")
                params = {}
            entries.append(ModelEntry(e.path, params))
        object.__setattr__(self, "entries", tuple(entries))
        slices = []
        for k, s in enumerate(self.slices):
            sources = []
            for src in s.sources:
                where = f"slice {k + 1} model '{src.model}'"
                params = clean(src.params, where, "model")
                if self.is_base(src.model) and params:
                    notes.append(f"parameters of the base model '{src.model}' in slice {k + 1} are ignored "
                                 f"({', '.join(params)}): the base contributes no task vector (as mergekit)")
                    params = {}
                sources.append(SliceSource(src.model, src.layers, params))
            slices.append(Slice(tuple(sources), clean(s.params, f"slice {k + 1}", "slice")))
        object.__setattr__(self, "slices", tuple(slices))
        for key, places in ignored.items():
            users = other.get(key)
            notes.append(f"'{key}' is not a parameter of {method.name}"
                         + (f" (it is one of {', '.join(users)})" if users else "")
                         + f": ignored ({', '.join(dict.fromkeys(places))})")

    def _check_models(self, method, notes: list) -> None:
        models = tuple(e for e in self.entries if not self.is_base(e.path))
        object.__setattr__(self, "models", models)
        besides = " besides the base" if method.base != "none" else ""
        example = f"e.g. {method.example}" if method.example else None
        if not models:
            raise self._error("no models to merge", hint="list the models to merge under 'models:'")
        if method.min_models == method.max_models != len(models):
            raise self._error(f"{method.name} merges exactly {method.min_models} model(s){besides}, got {len(models)}",
                              hint=example)
        if len(models) < method.min_models:
            raise self._error(f"{method.name} needs at least {method.min_models} model(s){besides}, got {len(models)}",
                              hint=example)
        if method.max_models is not None and len(models) > method.max_models:
            raise self._error(f"{method.name} merges at most {method.max_models} model(s), got {len(models)}",
                              hint="use 'slices:' to take different layers from different models"
                              if method.max_models == 1 else None)
        if self.is_uniform:  # every tensor gets these values: check them all now, before any file is opened
            g, m = self.uniform_values()
            if method.warn is not None:  # valid but odd values (t outside [0, 1], ...)
                notes += method.warn(g, m, [f"model {i + 1} '{e.path}'" for i, e in enumerate(models)])

    def uniform_values(self) -> tuple[dict, list[dict]]:
        """(global, per-model) values of a uniform recipe (see is_uniform), defaults filled
        and checked; other recipes get their values per tensor from the planner."""
        if not self.is_uniform:
            raise ValueError("uniform_values() of a recipe with slices, gradients or filters")
        method = registry.get(self.method)
        g_names = {p.name for p in method.global_params}
        top_g = {k: v for k, v in self.params.items() if k in g_names}
        top_m = {k: v for k, v in self.params.items() if k not in g_names}
        labels = [m.path for m in self.models]
        try:
            return method.resolve(top_g, [{**top_m, **m.params} for m in self.models], labels)
        except RecipeError as exc:
            raise self._error(exc.message, exc.hint) from None

    def _check_slices(self, method) -> None:
        one_model = method.max_models == 1  # a one-model method (passthrough) maps each slice to its own model
        first: tuple | None = None
        first_refs: list[str] = []
        models: list[str] = []
        for k, s in enumerate(self.slices):
            at = f"slice {k + 1}"
            lengths = {src.length for src in s.sources}
            if len(lengths) > 1:
                raise self._error(f"the sources of {at} have different lengths "
                                  + ", ".join(f"'{src.model}' {list(src.layers)}" for src in s.sources),
                                  hint="every source of a slice gives the same number of layers")
            if self.base is not None and not any(self.is_base(src.model) for src in s.sources):
                raise self._error(f"{at} does not list the base model '{self.base}' among its sources",
                                  hint="under 'slices:' the base is read only from the sources (as mergekit): "
                                       f"add '- model: {self.base}' with the same layer_range")
            merged = [src.model for src in s.sources if not self.is_base(src.model)]
            seen: list[str] = []
            for ref in merged:
                if any(same_model(ref, x) for x in seen):
                    raise self._error(f"{at} lists '{ref}' twice", hint="each model may feed a slice once")
                seen.append(ref)
            if len(merged) < method.min_models or (method.max_models is not None and len(merged) > method.max_models):
                want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                        else f"at least {method.min_models}" if method.max_models is None
                        else f"{method.min_models} to {method.max_models}")
                raise self._error(f"{method.name} merges {want} model(s) per slice; {at} has {len(merged)}",
                                  hint="one source per slice: a frankenmerge stacks slices" if one_model else None)
            key = tuple(_norm(r) for r in merged)
            if first is None:
                first, first_refs = key, merged
            elif key != first and not one_model:
                raise self._error(f"{at} merges other models than slice 1 ({', '.join(merged)} vs "
                                  f"{', '.join(first_refs)})",
                                  hint="npmerge supports slices with the same models in the same order in every "
                                       "slice (and one-source slices for passthrough)")
            for ref in merged:
                if not any(same_model(ref, x) for x in models):
                    models.append(ref)
        object.__setattr__(self, "models", tuple(ModelEntry(m) for m in models))

    def _check_tokenizer(self) -> None:
        """The tokenizer source names 'base', 'union' or a model of the merge (as mergekit)."""
        src = self.tokenizer_source
        if self.pad_to_multiple_of is not None and src is None:
            raise self._error("pad_to_multiple_of needs a tokenizer source", hint="tokenizer: {source: base, "
                                                                                "pad_to_multiple_of: 64}")
        if src is None or src in ("base", "union") or same_model(src, self.base_model):
            return
        if not any(same_model(src, ref) for ref in self._listed()):
            where = "--tokenizer-source" if self.source is None else "tokenizer source"
            raise self._error(f"{where} '{src}' is not one of the merged models",
                              hint="give base (the base's vocabulary), union (every model's tokens) or one of the "
                                   "models, written as in the recipe")

    # -- CLI ---------------------------------------------------------------------
    @classmethod
    def from_cli(cls, method: str, base: str | None, models: list[str], *, per_model: dict[str, list] | None = None,
                 params: dict | None = None, out_dtype: str | None = None, dtype: str | None = None,
                 allow_nonfinite: bool = False, tokenizer_source: str | None = None) -> "Recipe":
        """`per_model`: a repeated option's values, one per model in order or one for all."""
        entries = [dict() for _ in models]
        for key, values in (per_model or {}).items():
            if not values:
                continue
            flag = "--" + key.replace("_", "-")
            if len(values) not in (1, len(models)):
                raise RecipeError(f"got {len(values)} {flag} values for {len(models)} models",
                                  hint=f"give one {flag} for all models or one per model, in model order")
            for i, entry in enumerate(entries):
                entry[key] = values[0] if len(values) == 1 else values[i]
        rounding = _input_dtype(dtype, "--dtype") if dtype else None
        return cls(method=method, base_model=base, entries=tuple(ModelEntry(m, p) for m, p in zip(models, entries)),
                   params={k: v for k, v in (params or {}).items() if v is not None}, dtype=rounding,
                   out_dtype=parse_user_dtype(out_dtype) if out_dtype else rounding, allow_nonfinite=allow_nonfinite,
                   tokenizer_source=tokenizer_source, listed_base_is_base=False)

    # -- YAML --------------------------------------------------------------------
    @classmethod
    def from_file(cls, path) -> "Recipe":
        """Read a recipe file: UTF-8 (with or without BOM) or UTF-16 with a BOM."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise RecipeError(f"cannot read recipe '{path}': {exc.strerror or exc}") from None
        return cls.from_yaml(decode_recipe(data, str(path)), str(path))

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> "Recipe":
        return cls.from_data(load_yaml(text, source), source)

    @classmethod
    def from_data(cls, data, source: str = "recipe") -> "Recipe":
        """A recipe from its parsed YAML (one document)."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source} must be a mapping with merge_method, models, ...")
        err = lambda message, hint=None: RecipeError(f"{source}: {message}", hint=hint)
        _keys(data, TOP_KEYS, "", err, refused=REFUSED_KEYS,
              hint="known keys: " + ", ".join(TOP_KEYS) + (" ('experts' is mergekit-moe's, not supported)"
                                                           if "experts" in data else ""))
        if "merge_method" not in data:
            raise err("missing 'merge_method'", hint="e.g. merge_method: ties")
        method = data["merge_method"]
        if not isinstance(method, str):
            raise err(f"merge_method must be a string, got {shown(method)}")
        notes: list[str] = []
        base = _ref(data.get("base_model"), "base_model", err) if data.get("base_model") is not None else None
        entries = ()
        if data.get("models") is not None:
            raw = data["models"]
            if not isinstance(raw, list) or not raw:
                raise err("'models' must be a non-empty list", hint=MODELS_HINT)
            entries = tuple(_model_entry(e, i, err) for i, e in enumerate(raw))
        slices = ()
        if data.get("slices") is not None:
            raw = data["slices"]
            if not isinstance(raw, list) or not raw:
                raise err("'slices' must be a non-empty list", hint=SLICES_HINT)
            slices = tuple(_slice(s, k, base, err) for k, s in enumerate(raw))
        params = _params(data.get("parameters"), "parameters", err)
        dtype = _input_dtype(data.get("dtype"), "dtype", err) if data.get("dtype") is not None else None
        out_dtype = dtype
        if "out_dtype" in data:
            if data["out_dtype"] is None:
                notes.append("out_dtype: null means the default output dtype: "
                             + (f"{TORCH_NAMES[dtype]} (from dtype)" if dtype else "each tensor's stored dtype "
                                "in the base (first model without a base)"))
            elif not isinstance(data["out_dtype"], str):
                raise err(f"out_dtype must be a dtype name, got {shown(data['out_dtype'])}",
                          hint="bfloat16, float16, float32 or float64")
            else:
                out_dtype = parse_user_dtype(data["out_dtype"])
        if "dtype" in data and data["dtype"] is None:
            notes.append("dtype: null means inputs are used as stored (no rounding)")
        tokenizer_source, pad_to = _tokenizer(data, err, notes)
        template = data.get("chat_template")
        if template is not None:
            try:
                template = chat_template.check(template)
            except RecipeError as e:
                raise err(e.message, hint=e.hint) from None
        options = data.get("npmerge") or {}
        if not isinstance(options, dict):
            raise err("'npmerge' must be a mapping", hint="npmerge: {allow_nonfinite: true}")
        _keys(options, NPMERGE_KEYS, "npmerge.", err)
        allow = options.get("allow_nonfinite", False)
        if not isinstance(allow, bool):
            raise err(f"npmerge.allow_nonfinite must be true or false, got {shown(allow)}")
        return cls(method=method, entries=entries, base_model=base, params=params, slices=slices, dtype=dtype,
                   out_dtype=out_dtype, tokenizer_source=tokenizer_source, pad_to_multiple_of=pad_to,
                   chat_template=template, allow_nonfinite=allow,
                   notes=tuple(notes), source=source)

    def to_yaml(self) -> str:
        """A re-runnable recipe (`npmerge run`): the user's structure and model references,
        with every method default the recipe leaves open written at the top level."""
        import yaml

        header = f"# npmerge {__version__} recipe; re-run with: npmerge run THIS_FILE -o OUT\n"
        return header + yaml.dump(self.to_data(), Dumper=dumper(), sort_keys=False, default_flow_style=False,
                                  allow_unicode=True)

    def to_data(self) -> dict[str, Any]:
        """The recipe `to_yaml` writes, as plain data (also kept in plan.json, so a refused
        --resume can name what changed)."""
        method = registry.get(self.method)
        data: dict[str, Any] = {"merge_method": method.name}
        if self.base_model:
            data["base_model"] = self.base_model
        if self.slices:
            data["slices"] = [with_params({"sources": [with_params({"model": src.model,
                                                                       "layer_range": list(src.layers)}, src.params)
                                                        for src in s.sources]}, s.params) for s in self.slices]
        else:
            data["models"] = [with_params({"model": e.path}, e.params) for e in self.entries]
        params = {k: plain(v) for k, v in self.params.items()}
        for p in (*method.model_params, *method.global_params):
            if p.name not in params and p.default is not None:
                params[p.name] = p.default
        if params:
            data["parameters"] = params
        if self.dtype:
            data["dtype"] = TORCH_NAMES[self.dtype]
        if self.out_dtype and self.out_dtype != self.dtype:
            data["out_dtype"] = TORCH_NAMES[self.out_dtype]
        if self.pad_to_multiple_of is not None:
            data["tokenizer"] = {"source": self.tokenizer_source, "pad_to_multiple_of": self.pad_to_multiple_of}
        elif self.tokenizer_source:
            data["tokenizer_source"] = self.tokenizer_source
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        if self.allow_nonfinite:
            data["npmerge"] = {"allow_nonfinite": True}
        return data


# ------------------------------------------------------------------ YAML parsing


def _keys(data: dict, known, where: str, error: Callable, refused: dict | None = None, hint: str | None = None):
    for key in data:
        if refused and key in refused:
            raise error(f"{refused[key]} (key '{where}{key}')")
        if key not in known:
            raise error(f"unknown key '{where}{key}'" + suggest(key, known),
                        hint=hint or f"known keys here: {', '.join(known)}")


def _ref(value: Any, what: str, error: Callable) -> str:
    if not isinstance(value, str) or not value.strip():
        raise error(f"{what} must be a path string, got {shown(value)}",
                    hint="a model directory, .safetensors file or Hub id")
    return value


def _params(value: Any, what: str, error: Callable) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(f"'{what}' must be a mapping, got {shown(value)}", hint="e.g. parameters: {weight: 0.5}")
    return dict(value)


def _model_entry(entry: Any, i: int, error: Callable) -> ModelEntry:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise error(f"models[{i}] must be a mapping with a 'model' key", hint=MODELS_HINT)
    _keys(entry, MODEL_KEYS, f"models[{i}].", error,
          hint="a model entry holds 'model' and 'parameters' (weight, density, ...)")
    return ModelEntry(_ref(entry["model"], f"models[{i}].model", error),
                      _params(entry.get("parameters"), f"models[{i}].parameters", error))


def _slice(data: Any, k: int, base: str | None, error: Callable) -> Slice:
    at = f"slices[{k}]"
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list) or not data["sources"]:
        raise error(f"{at} must be a mapping with a non-empty 'sources' list",
                    hint=SLICES_HINT)
    _keys(data, SLICE_KEYS, f"{at}.", error)
    if "residual_weight" in data:
        raise error(f"{at}.residual_weight is not supported (mergekit parses it and ignores it)",
                    hint="remove it")
    if data.get("base_model") is not None and not same_model(data["base_model"], base):
        differs = (f"differs from the recipe's base_model '{base}'" if base
                   else "is given without a top-level base_model")
        raise error(f"{at}.base_model '{data['base_model']}' {differs}",
                    hint="npmerge merges every slice against the one top-level base_model")
    sources = []
    for j, src in enumerate(data["sources"]):
        where = f"{at}.sources[{j}]"
        if not isinstance(src, dict) or "model" not in src:
            raise error(f"{where} must be a mapping with 'model' and 'layer_range'")
        _keys(src, SOURCE_KEYS, f"{where}.", error)
        rng = src.get("layer_range")
        if (not isinstance(rng, list) or len(rng) != 2 or not all(type(x) is int for x in rng)
                or not 0 <= rng[0] < rng[1]):
            raise error(f"{where}.layer_range must be [first, end] with 0 <= first < end (end excluded), got {shown(rng)}",
                        hint="e.g. layer_range: [0, 16] takes layers 0..15")
        sources.append(SliceSource(_ref(src["model"], f"{where}.model", error), (rng[0], rng[1]),
                                   _params(src.get("parameters"), f"{where}.parameters", error)))
    return Slice(tuple(sources), _params(data.get("parameters"), f"{at}.parameters", error))


def _tokenizer(data: dict, error: Callable, notes: list) -> tuple[str | None, int | None]:
    """(source, pad_to_multiple_of) from `tokenizer_source:` or `tokenizer: {source, pad_to_multiple_of}`."""
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise error("give either tokenizer_source or tokenizer, not both")
    if data.get("tokenizer") is None:
        source = data.get("tokenizer_source")
        return (None if source is None else _ref(source, "tokenizer_source", error)), None
    tok = data["tokenizer"]
    if not isinstance(tok, dict):
        raise error("'tokenizer' must be a mapping", hint="tokenizer: {source: base}")
    _keys(tok, TOKENIZER_KEYS, "tokenizer.", error)
    if tok.get("tokens") is not None:
        raise error("tokenizer.tokens (per-token embedding choices) is not supported",
                    hint="remove it: tokens a model lacks take mergekit's default rows (README 'Vocabularies')")
    pad = tok.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad < 1):
        raise error(f"tokenizer.pad_to_multiple_of must be a positive integer, got {shown(pad)}", hint="e.g. 64")
    if tok.get("source") is None:
        notes.append("tokenizer: without 'source' means source: union (mergekit's default)")
        return "union", pad
    return _ref(tok["source"], "tokenizer.source", error), pad


def _input_dtype(value: Any, what: str, error: Callable | None = None) -> str:
    code = ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if code not in INPUT_DTYPES:
        message = f"{what} '{value}' is not supported"
        hint = ("npmerge computes in float32: dtype bfloat16 or float16 rounds every input to that type first "
                "(as mergekit loads them), float32 changes nothing; the output type is out_dtype")
        raise error(message, hint) if error else RecipeError(message, hint=hint)
    return code



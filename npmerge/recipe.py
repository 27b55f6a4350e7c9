"""The frozen Recipe: what to merge and how, from CLI flags or mergekit-style YAML.

A recipe never touches tensors. Parameter values are validated against the
method's schema here, so a typo fails before any file is opened. Unknown keys and
features npmerge does not implement yet are errors, never silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .dtypes import parse_user_dtype
from .errors import RecipeError
from .methods import registry

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "npmerge"}
UNSUPPORTED_KEYS = {
    "slices": "slice-based recipes (layer ranges) are not supported yet",
    "tokenizer_source": "tokenizer merging is not supported yet; all models must share a vocabulary",
    "tokenizer": "tokenizer merging is not supported yet; all models must share a vocabulary",
    "chat_template": "chat_template is not supported yet",
}
MODEL_KEYS = {"model", "parameters"}


@dataclass(frozen=True)
class ModelEntry:
    path: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    method: str
    models: tuple[ModelEntry, ...]
    base: str | None = None
    params: dict = field(default_factory=dict)
    out_dtype: str | None = None  # safetensors code; None: each tensor's base dtype
    allow_nonfinite: bool = False
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        method = registry.get(self.method)
        object.__setattr__(self, "method", method.name)
        if method.base == "required" and not self.base:
            raise RecipeError(f"{method.name} needs a base model",
                              hint="give base_model in the recipe (or BASE first on the command line)")
        if method.base == "none" and self.base:
            raise RecipeError(f"{method.name} has no base model, but one is given ('{self.base}')",
                              hint="list it among the models (with a weight) or remove base_model")
        if len(self.models) < method.min_models:
            raise RecipeError(f"{method.name} needs at least {method.min_models} model(s), got {len(self.models)}"
                              if self.models else "no models to merge")
        if method.max_models is not None and len(self.models) > method.max_models:
            raise RecipeError(f"{method.name} merges at most {method.max_models} model(s), got {len(self.models)}")
        notes: list[str] = []
        method.resolve(self.params, [m.params for m in self.models], [m.path for m in self.models],
                       notes=notes)  # validates early
        object.__setattr__(self, "notes", tuple(self.notes) + tuple(n for n in notes if n not in self.notes))

    def resolved(self):
        """(Method, global params, per-model params) with defaults filled in."""
        method = registry.get(self.method)
        global_params, model_params = method.resolve(self.params, [m.params for m in self.models],
                                                      [m.path for m in self.models])
        return method, global_params, model_params

    # -- CLI ---------------------------------------------------------------------
    @classmethod
    def from_cli(cls, method: str, base: str | None, models: list[str], *, per_model: dict[str, list] | None = None,
                 params: dict | None = None, out_dtype: str | None = None,
                 allow_nonfinite: bool = False) -> "Recipe":
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
        return cls(method=method, base=base, models=tuple(ModelEntry(m, p) for m, p in zip(models, entries)),
                   params={k: v for k, v in (params or {}).items() if v is not None},
                   out_dtype=parse_user_dtype(out_dtype) if out_dtype else None,
                   allow_nonfinite=allow_nonfinite)

    # -- YAML --------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe", relative_to: Path | None = None) -> "Recipe":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{source} must be a mapping with merge_method, models, ...")
        for key in data:
            if key in UNSUPPORTED_KEYS:
                raise RecipeError(f"{source}: {UNSUPPORTED_KEYS[key]} (key '{key}')")
            if key not in TOP_KEYS:
                raise RecipeError(f"{source}: unknown key '{key}'", hint=f"known keys: {', '.join(sorted(TOP_KEYS))}")
        if "merge_method" not in data:
            raise RecipeError(f"{source}: missing 'merge_method'")
        method = data["merge_method"]
        if not isinstance(method, str):
            raise RecipeError(f"{source}: merge_method must be a string")

        def path_of(value: Any, what: str) -> str:
            if not isinstance(value, str) or not value:
                raise RecipeError(f"{source}: {what} must be a path string, got {value!r}")
            p = Path(os.path.expanduser(value))
            if relative_to is not None and not p.is_absolute():
                p = relative_to / p
            return str(p)

        base = path_of(data["base_model"], "base_model") if data.get("base_model") is not None else None
        models_raw = data.get("models")
        if not isinstance(models_raw, list) or not models_raw:
            raise RecipeError(f"{source}: 'models' must be a non-empty list")
        models, notes = [], []
        for i, entry in enumerate(models_raw):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise RecipeError(f"{source}: models[{i}] must be a mapping with a 'model' key")
            extra = set(entry) - MODEL_KEYS
            if extra:
                raise RecipeError(f"{source}: unknown key(s) {', '.join(sorted(extra))} in models[{i}]",
                                  hint="a model entry holds 'model' and 'parameters' (weight, density, ...)")
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                raise RecipeError(f"{source}: models[{i}].parameters must be a mapping")
            _no_gradients(params, f"{source}: models[{i}].parameters")
            path = path_of(entry["model"], f"models[{i}].model")
            if base is not None and path == base and not params:
                notes.append(f"base model listed in models[{i}] without parameters: used as the base only (as mergekit)")
                continue
            models.append(ModelEntry(path, dict(params)))
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"{source}: 'parameters' must be a mapping")
        _no_gradients(params, f"{source}: parameters")
        dtype = data.get("dtype")
        if dtype is not None and not isinstance(dtype, str):
            raise RecipeError(f"{source}: dtype must be a string")
        out_dtype = data.get("out_dtype", dtype)  # mergekit: output in `dtype` unless out_dtype says otherwise
        if dtype is not None:
            parse_user_dtype(dtype)  # validates; npmerge always computes in float32
        options = data.get("npmerge") or {}
        if not isinstance(options, dict) or set(options) - {"allow_nonfinite"}:
            raise RecipeError(f"{source}: 'npmerge' options may only hold allow_nonfinite")
        return cls(method=method, base=base, models=tuple(models), params=dict(params),
                   out_dtype=parse_user_dtype(out_dtype) if isinstance(out_dtype, str) else None,
                   allow_nonfinite=bool(options.get("allow_nonfinite", False)), notes=tuple(notes))

    def to_yaml(self) -> str:
        """A re-runnable recipe (`npmerge run`) with absolute paths and every parameter explicit."""
        import yaml

        method, global_params, model_params = self.resolved()
        data: dict[str, Any] = {"merge_method": method.name}
        if self.base:
            data["base_model"] = os.path.abspath(self.base)
        data["models"] = [{"model": os.path.abspath(m.path), "parameters": p}
                          for m, p in zip(self.models, model_params)]
        if global_params:
            data["parameters"] = global_params
        if self.out_dtype:
            data["out_dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}[self.out_dtype]
        if self.allow_nonfinite:
            data["npmerge"] = {"allow_nonfinite": True}
        header = f"# npmerge {__version__} recipe; re-run with: npmerge run THIS_FILE -o OUT\n"
        return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _no_gradients(params: dict, where: str) -> None:
    for key, value in params.items():
        if isinstance(value, (list, dict)):
            raise RecipeError(f"{where}.{key}: per-layer lists and tensor filters are not supported yet",
                              hint="give a single number")

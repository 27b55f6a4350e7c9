"""Merge methods as data: name, paper, parameters with defaults and validation, the
statistics they report, and the per-tensor driver that does the work.

Adding a method is one new module in this package that calls `register` (and is
listed in `_MODULES`); the CLI subcommand, its options and help, the recipe keys, the
report and the summary all come from here.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RecipeError, shown
from .protocol import Driver, Stat, TensorContext

_MODULES = ("ties", "task_arithmetic", "linear", "dare", "breadcrumbs", "della", "slerp", "nuslerp", "model_stock",
            "sce", "passthrough", "nearswap", "ram", "multislerp", "karcher", "arcee_fusion")


# A check gets the parameter's display name, e.g. "'density' of model 2 'ft-b'", and the value.
def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{name} must be a number, got {shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise RecipeError(f"{name} must be finite, got {value}")
    return value


def non_negative(hint: str) -> Callable[[str, Any], float]:
    """A check for a finite number >= 0; `hint` says what the parameter means."""
    def check(name: str, value: Any) -> float:
        value = _finite(name, value)
        if value < 0.0:
            raise RecipeError(f"{name} must be >= 0, got {value}", hint=hint)
        return value
    return check


density = non_negative("density is the fraction of each task vector kept, e.g. 0.2 (1 keeps all)")


def number(name: str, value: Any) -> float:
    return _finite(name, value)


def positive(name: str, value: Any) -> float:
    value = _finite(name, value)
    if value <= 0:
        raise RecipeError(f"{name} must be > 0, got {value}")
    return value


def fraction(name: str, value: Any) -> float:
    value = _finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise RecipeError(f"{name} must be in [0, 1], got {value}")
    return value


def seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"{name} must be an integer, got {shown(value)}", hint="a seed is an integer in [0, 2**64)")
    if not 0 <= value < 2**64:
        raise RecipeError(f"{name} must be in [0, 2**64), got {value}", hint="a seed is an integer in [0, 2**64)")
    return int(value)


seed.kind = "int"


def boolean(name: str, value: Any) -> bool:
    if value is True or value is False:
        return value
    if type(value) is int and value in (0, 1):  # YAML habits: normalize: 1
        return bool(value)
    raise RecipeError(f"{name} must be true or false, got {shown(value)}")


def choice(*options: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in options:
            raise RecipeError(f"{name} must be one of {', '.join(map(str, options))}, got {shown(value)}")
        return value
    check.options = options
    return check


@dataclass(frozen=True)
class Param:
    name: str
    default: Any  # None: required (unless optional)
    check: Callable[[str, Any], Any]
    help: str
    optional: bool = False  # default None means "not given" (left out of the resolved values), not required

    @property
    def kind(self) -> str:
        """How the CLI takes it: number, bool, choice or int."""
        if self.check is boolean:
            return "bool"
        if hasattr(self.check, "options"):
            return "choice"
        return getattr(self.check, "kind", "number")

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Method:
    """One merge method (docs/semantics.md)."""

    name: str  # recipe name, e.g. "task_arithmetic"
    title: str
    paper: str | None
    summary: str
    base: str  # "required", "optional" or "none"
    model_params: tuple[Param, ...]
    global_params: tuple[Param, ...]
    driver: Callable[[TensorContext], Driver]
    stats: tuple[Stat, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    example: str = ""  # CLI example for the help text and README
    check: Callable[[dict, list[dict], list[str]], None] | None = None  # cross-parameter validation
    l2_label: str = "‖Δ‖₂"  # what the engine's per-model norm measures (task vectors by default)
    warmup_params: dict | None = None  # global parameters `npmerge warmup` runs it with (required ones)
    warmup_variants: tuple[dict, ...] = ()  # further parameter sets warmup runs (kernels other settings use)
    warn: Callable[[dict, list[dict], list[str]], list[str]] | None = None  # notes on valid but odd values
    copies: Callable[[dict, list[dict]], bool] | None = None  # (global, per-model values) -> the output is
    # model 1's input unchanged, so the plan may copy the stored bytes (passthrough without a scale)

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")

    def resolve(self, global_params: dict, model_params: list[dict], labels: list[str] | None = None,
                cross_check: bool = True) -> tuple[dict, list[dict]]:
        """Validate and fill defaults; unknown parameter names are errors. `labels` (model
        names) make messages name the model, e.g. "'density' of model 2 'ft-b' must be ...".
        `cross_check=False` skips the method's checks across parameters (kernel tests)."""
        models = [f"model {i + 1}" + (f" '{labels[i]}'" if labels else "") for i in range(len(model_params))]
        g = _fill(self.global_params, global_params, f"{self.name} parameters", "")
        m = [_fill(self.model_params, p, f"parameters of {who}", f" of {who}") for p, who in zip(model_params, models)]
        if self.check is not None and cross_check:
            self.check(g, m, models)
        return g, m


def _fill(schema: tuple[Param, ...], given: dict, where: str, of: str) -> dict:
    known = {p.name: p for p in schema}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise RecipeError(f"unknown parameter(s) {', '.join(unknown)} in {where}",
                          hint=f"known: {', '.join(known) or 'none'}")
    out = {}
    for p in schema:
        label = f"'{p.name}'{of}" if of else f"parameter '{p.name}'"
        if p.name in given:
            out[p.name] = p.check(label, given[p.name])
        elif p.default is None and not p.optional:
            raise RecipeError(f"missing {label}", hint=f"{p.name}: {p.help}")
        elif p.default is None:
            continue
        else:
            out[p.name] = p.default
    return out


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"{__package__}.{module}")  # modules register themselves


def get(name: str) -> Method:
    _load_all()
    key = name.replace("-", "_") if isinstance(name, str) else name
    if key not in METHODS:
        raise RecipeError(f"unknown merge method '{name}'", hint=f"available: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def all_methods() -> dict[str, Method]:
    _load_all()
    return dict(METHODS)


WEIGHT = Param("weight", 1.0, number, "weight of the model's contribution")
DENSITY = Param("density", 1.0, density, "fraction of the task vector kept (1 keeps all)")
LAMBDA = Param("lambda", 1.0, number, "scale of the merged task vector")
SEED = Param("seed", 0, seed, "seed of the random masks (an integer in [0, 2**64))")

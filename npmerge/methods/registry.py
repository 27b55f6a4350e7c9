"""Merge methods as data: name, paper, parameters with defaults and validation,
and the shape of the math (which family options it uses).

Adding a method of the TIES family is one new module that calls `register`;
the engine and CLI read everything else from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import RecipeError


# A check gets the parameter's display name, e.g. "'density' of model 2 'ft-b'", and the value.
def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise RecipeError(f"{name} must be finite, got {value}")
    return value


def density(name: str, value: Any) -> float:
    value = _finite(name, value)
    if not 0.0 < value <= 1.0:
        raise RecipeError(f"{name} must be in (0, 1], got {value}",
                          hint="density is the fraction of each task vector kept, e.g. 0.2")
    return value


def number(name: str, value: Any) -> float:
    return _finite(name, value)


def positive(name: str, value: Any) -> float:
    value = _finite(name, value)
    if value <= 0:
        raise RecipeError(f"{name} must be > 0, got {value}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{name} must be true or false, got {value!r}")
    return value


def choice(*options: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in options:
            raise RecipeError(f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value
    return check


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    check: Callable[[str, Any], Any]
    help: str


@dataclass(frozen=True)
class Method:
    """One merge method of the TIES family (SEMANTICS.md)."""

    name: str  # recipe name, e.g. "task_arithmetic"
    title: str
    paper: str | None
    summary: str
    uses_base: bool  # task vectors against a base (else: models themselves)
    model_params: tuple[Param, ...]
    global_params: tuple[Param, ...]
    trims: bool = False  # per-model magnitude trim by `density`
    zero_denominator_eps: float = 0.0  # |D| < eps (or D == 0) divides by 1 instead
    fixed: dict = field(default_factory=dict)  # family options not exposed as parameters

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")

    def resolve(self, global_params: dict, model_params: list[dict],
                labels: list[str] | None = None) -> tuple[dict, list[dict]]:
        """Validate and fill defaults; unknown parameter names are errors. `labels` (model
        paths) make messages name the model, e.g. "'density' of model 2 'ft-b' must be ..."."""
        models = [f"model {i + 1}" + (f" '{labels[i]}'" if labels else "") for i in range(len(model_params))]
        return (_fill(self.global_params, global_params, f"{self.name} parameters", ""),
                [_fill(self.model_params, p, f"parameters of {m}", f" of {m}") for p, m in zip(model_params, models)])


def _fill(schema: tuple[Param, ...], given: dict, where: str, of: str) -> dict:
    known = {p.name: p for p in schema}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise RecipeError(f"unknown parameter(s) {', '.join(unknown)} in {where}",
                          hint=f"known: {', '.join(known) or 'none'}")
    return {p.name: p.check(f"'{p.name}'{of}" if of else f"parameter '{p.name}'", given[p.name])
            if p.name in given else p.default for p in schema}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    _load_all()
    key = name.replace("-", "_")
    if key not in METHODS:
        raise RecipeError(f"unknown merge method '{name}'", hint=f"available: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def _load_all() -> None:
    from . import linear, task_arithmetic, ties  # noqa: F401  (modules register themselves)


def all_methods() -> dict[str, Method]:
    _load_all()
    return dict(METHODS)


WEIGHT = Param("weight", 1.0, number, "weight of the model's contribution")
DENSITY = Param("density", 1.0, density, "fraction of the task vector kept (largest magnitudes)")
LAMBDA = Param("lambda", 1.0, positive, "scale of the merged task vector")

"""Parameter values of a recipe (docs/recipes.md): scalars, gradients and filter lists,
checked when the recipe is read and evaluated per tensor when the merge is planned.

A *setting* is what a recipe writes for one parameter at one level:
- a scalar (number, boolean or word);
- a gradient: a list of numbers, or of booleans, interpolated along the layers of a slice;
- a filter list: `{filter, value}` entries (a single entry may stand alone) scanned in
  order; the first with no filter, filter "*", or a filter that is a substring of the
  tensor's name gives the value (a scalar or a gradient). No match: the next level.

`parse_setting` normalises a setting (a lone entry becomes a list of one) and checks its
shape and every value it can produce; `evaluate` and `resolve` give the value for one
tensor. The arithmetic is tests/reference.py's, operation for operation.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Iterator

from .errors import RecipeError, shown
from .methods import registry

NO_MATCH = object()  # a filter list with no matching entry: ask the next level
ENTRY_KEYS = ("filter", "value")


def suggest(word: str, options) -> str:
    """' (did you mean 'x'?)' for the closest of `options`, or ''."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _is_bool(x: Any) -> bool:
    return x is True or x is False


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not _is_bool(x)


def _is_scalar(x: Any) -> bool:
    return _is_bool(x) or _is_number(x) or isinstance(x, str)


def is_entries(setting: Any) -> bool:
    """A filter list (after parse_setting: a list of dicts)."""
    return isinstance(setting, list) and bool(setting) and isinstance(setting[0], dict)


def is_varying(setting: Any) -> bool:
    """Whether the setting can take different values on different tensors."""
    return isinstance(setting, list)


def parse_setting(value: Any, where: str, check: Callable[[str, Any], Any] | None) -> Any:
    """Normalise and validate one setting; `check` (the parameter's check) is applied to
    every scalar and every gradient anchor, so a bad value fails before any file is read.
    Interpolating between valid anchors stays between them, so gradients need no more."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        out = []
        for i, entry in enumerate(value):
            at = f"{where} (filter entry {i + 1})"
            unknown = [k for k in entry if k not in ENTRY_KEYS]
            if unknown:
                raise RecipeError(f"{at}: unknown key '{unknown[0]}' in a filter entry" + suggest(unknown[0], ENTRY_KEYS),
                                  hint="a filter entry is {filter: <part of a tensor name>, value: <number or list>}")
            if "value" not in entry:
                raise RecipeError(f"{at}: filter entry without 'value'",
                                  hint="a filter entry is {filter: <part of a tensor name>, value: <number or list>}")
            flt = entry.get("filter")
            if flt is not None and (not isinstance(flt, str) or not flt):
                raise RecipeError(f"{at}: filter must be a non-empty string (part of a tensor name), got {shown(flt)}")
            inner = entry["value"]
            if isinstance(inner, dict) or is_entries(inner):
                raise RecipeError(f"{at}: filter entries cannot be nested",
                                  hint="give a number or a list of numbers as the value")
            out.append({"filter": flt, "value": parse_setting(inner, at, check)})
        return out
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{where}: an empty list", hint="give a number, or a list of numbers (a gradient)")
        if not (all(_is_number(a) for a in value) or all(_is_bool(a) for a in value)):
            raise RecipeError(f"{where}: a gradient must be a list of numbers (or of booleans), got {shown(value)}",
                              hint="e.g. [0.2, 0.5, 0.8]: interpolated from the first to the last layer of a slice")
        return [_checked(check, f"{where} (gradient value {i + 1})" if len(value) > 1 else where, a)
                for i, a in enumerate(value)]
    if value is None:
        raise RecipeError(f"{where} has no value", hint="give a number, a list of numbers, or filter entries")
    if not _is_scalar(value):
        raise RecipeError(f"{where} must be a number, a list or filter entries, got {shown(value)}")
    return _checked(check, where, value)


def _checked(check, where: str, value: Any) -> Any:
    """Validate with the parameter's check but keep the value as written (1 stays 1)."""
    if check is not None:
        check(where, value)
    return value


def gradient_value(anchors: list, t: float) -> Any:
    """The gradient s_0 .. s_(A-1) at t in [0, 1]: x = t*(A-1), i0 = floor(x),
    i1 = min(A-1, i0+1), f = x - i0, (1-f)*s_i0 + f*s_i1 in float64; booleans take s_i0."""
    A = len(anchors)
    x = t * (A - 1)
    i0 = math.floor(x)
    if _is_bool(anchors[0]):
        return anchors[i0]
    i1 = min(A - 1, i0 + 1)
    f = x - i0
    return (1.0 - f) * float(anchors[i0]) + f * float(anchors[i1])


def _matches(flt: str | None, name: str) -> bool:
    return flt is None or flt == "*" or flt in name


def evaluate(setting: Any, name: str, t: float) -> Any:
    """The setting's value for tensor `name` at gradient position t; NO_MATCH if it is a
    filter list none of whose entries matches."""
    if is_entries(setting):
        for entry in setting:
            if _matches(entry["filter"], name):
                return evaluate(entry["value"], name, t)
        return NO_MATCH
    if isinstance(setting, list):
        return gradient_value(setting, t)
    return setting


def resolve(levels, name: str, t: float) -> Any:
    """The first level (settings in precedence order, None where absent) that yields a
    value for `name`, else NO_MATCH."""
    for setting in levels:
        if setting is None:
            continue
        value = evaluate(setting, name, t)
        if value is not NO_MATCH:
            return value
    return NO_MATCH


def filters(setting: Any) -> Iterator[str]:
    """The filter strings of a setting (not None or '*')."""
    if is_entries(setting):
        for entry in setting:
            if entry["filter"] not in (None, "*"):
                yield entry["filter"]


# ------------------------------------------------- which parameter goes where

# Parameters of mergekit 0.1.5 methods, for telling "another method's parameter" (a
# note) from a typo (an error) when npmerge does not register that method.
MERGEKIT_GLOBAL = ("t", "lambda", "normalize", "rescale", "int8_mask", "filter_wise", "select_topk",
                   "nuslerp_flatten", "nuslerp_row_wise", "max_iter", "tol", "normalize_weights", "eps")
MERGEKIT_PER_MODEL = ("weight", "density", "gamma", "epsilon", "scale")
NO_OP_GLOBAL = ("int8_mask",)  # accepted and changes nothing (in mergekit it only saves memory)


def other_methods(method) -> dict[str, list[str]]:
    """Parameter name -> the other registered methods that take it."""
    out: dict[str, list[str]] = {}
    for m in registry.all_methods().values():
        if m.name != method.name:
            for p in (*m.model_params, *m.global_params):
                out.setdefault(p.name, []).append(m.name)
    return out


def check_level(method, other: dict, params: dict, where: str | None, level: str, error: Callable,
                ignored: dict) -> dict:
    """Check one level's settings (level: top, slice or model) and return those that apply:
    a global parameter under a model is an error, int8_mask is accepted and dropped,
    another method's parameter is dropped and recorded in `ignored` (for a note), an
    unknown name is an error with the closest known one. `error(message, hint)` makes
    the exception (prefixed with the recipe's name)."""
    per_model = {p.name: p for p in method.model_params}
    global_ = {p.name: p for p in method.global_params}
    out = {}
    for key, value in params.items():
        label = f"'{key}' of {where}" if where else f"parameter '{key}'"
        if level == "model" and key not in per_model and _is_global(key, global_, other):
            raise error(f"'{key}' is a global parameter" + (f" of {method.name}" if key in global_ else "")
                        + f": it cannot be set per model ({where})",
                        hint=f"move it to the top-level parameters (parameters: {{{key}: ...}})")
        if key in per_model or key in global_:
            out[key] = parse_setting(value, label, (per_model.get(key) or global_[key]).check)
        elif key in NO_OP_GLOBAL:
            parse_setting(value, label, registry.boolean)  # accepted, changes nothing
        elif key == "embed_slerp":
            raise error(f"{label}: embed_slerp was removed from mergekit in 2024 and has been ignored since",
                        hint="remove it; embeddings are merged like every other tensor")
        elif key in other or key in MERGEKIT_GLOBAL or key in MERGEKIT_PER_MODEL:
            parse_setting(value, label, None)
            ignored.setdefault(key, []).append(where or "top level")
        else:
            known = [*per_model, *global_]
            raise error(f"unknown parameter '{key}' in " + (f"parameters of {where}" if where else "parameters")
                        + suggest(key, [*known, *other, *MERGEKIT_GLOBAL, *MERGEKIT_PER_MODEL]),
                        hint=f"{method.name} takes: {', '.join(known) or 'no parameters'}")
    return out


def _is_global(key: str, global_: dict, other: dict) -> bool:
    """A parameter of the whole tensor (this method's, a no-op, or another method's global one)."""
    if key in global_ or key in NO_OP_GLOBAL or key in MERGEKIT_GLOBAL:
        return True
    return any(key in {p.name for p in registry.get(m).global_params} for m in other.get(key, ()))

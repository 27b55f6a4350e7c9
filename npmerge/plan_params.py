"""What the plan, the dry run and the report show about per-tensor parameter values.

Every job carries its own values (gradients, filters and slices resolved by the
planner). To keep that readable: the *headline* values are, per parameter, the value
that covers the most elements; the report lists only tensors whose values differ from
the headline, and the dry run prints a table of the distinct values per layer range for
the parameters that vary at all.
"""

from __future__ import annotations

from pathlib import Path

from .layers import is_pre

_ABSENT = object()


def _with_params(jobs):
    """Jobs that carry method parameters (not integer copies)."""
    return [j for j in jobs if j.model_params or j.params]


def headline(jobs, n_models: int) -> tuple[dict, list[dict]]:
    """(global, per-model) values covering the most elements, per parameter."""
    jobs = _with_params(jobs)

    def pick(values_with_weight) -> dict:
        tally: dict[str, dict] = {}
        for values, weight in values_with_weight:
            for key, value in values.items():
                bucket = tally.setdefault(key, {})
                bucket[value] = bucket.get(value, 0) + weight
        return {k: max(b, key=b.get) for k, b in tally.items()}

    g = pick((j.params, j.numel) for j in jobs)
    per_model = []
    for i in range(n_models):
        rows = [(p, j.numel) for j in jobs for k, p in zip(j.member_indices, j.model_params) if k == i]
        keys = list(dict.fromkeys(k for p, _ in rows for k in p))
        filled = [({k: p.get(k, _ABSENT) for k in keys}, n) for p, n in rows]
        per_model.append({k: v for k, v in pick(filled).items() if v is not _ABSENT})
    return g, per_model


def deviations(plan) -> dict:
    """Tensor name -> the values that differ from the headline: {"parameters": {...},
    "models": {model index (1-based, str): {...}}}; only tensors with a difference."""
    out = {}
    for job in _with_params(plan.jobs):
        g = {k: v for k, v in job.params.items() if plan.global_params.get(k, _ABSENT) != v}
        m = {}
        for i, p in zip(job.member_indices, job.model_params):
            head = plan.model_params[i]
            diff = {k: v for k, v in p.items() if head.get(k, _ABSENT) != v}
            diff.update({k: None for k in head if k not in p})
            if diff:
                m[str(i + 1)] = diff
        if g or m:
            out[job.name] = {**({"parameters": g} if g else {}), **({"models": m} if m else {})}
    return out


def _columns(plan) -> list[tuple[int | None, str]]:
    """(model index or None for global, parameter) of every parameter that varies."""
    seen: dict[tuple, set] = {}
    for job in _with_params(plan.jobs):
        for k, v in job.params.items():
            seen.setdefault((None, k), set()).add(v)
        for i, p in zip(job.member_indices, job.model_params):
            for k in dict.fromkeys([*p, *plan.model_params[i]]):
                seen.setdefault((i, k), set()).add(p.get(k, _ABSENT))
    return [c for c, vals in seen.items() if len(vals) > 1]


def column_label(plan, column: tuple[int | None, str]) -> str:
    i, key = column
    if i is None:
        return key
    ref = plan.recipe.models[i].path
    return f"{key} ({Path(ref).name or ref})"


def _fmt(values: set) -> str:
    shown = sorted(("-" if v is _ABSENT else f"{v:.6g}" if isinstance(v, float) else str(v)) for v in values)
    return ", ".join(shown[:4]) + (f", ... ({len(shown)} values)" if len(shown) > 4 else "")


def layer_table(plan) -> list[dict]:
    """Rows {"tensors": label, "values": {column label: distinct values}}: the tensors before
    the layers (embeddings), maximal runs of output layers with the same distinct values,
    the tensors after the layers; empty when no parameter varies."""
    columns = _columns(plan)
    if not columns:
        return []
    jobs = _with_params(plan.jobs)
    by_layer: dict[int, list] = {}
    for job in jobs:
        if job.layer is not None:
            by_layer.setdefault(job.layer, []).append(job)
    pre = [j for j in jobs if j.layer is None and is_pre(j.name)]
    post = [j for j in jobs if j.layer is None and not is_pre(j.name)]
    groups = [g for g in [pre, *(by_layer[k] for k in sorted(by_layer)), post] if g]
    rows: list[dict] = []
    for group in groups:
        cells = {}
        for col in columns:
            i, key = col
            vals = set()
            for job in group:
                if i is None:
                    if key in job.params:
                        vals.add(job.params[key])
                else:
                    vals |= {p.get(key, _ABSENT) for k, p in zip(job.member_indices, job.model_params) if k == i}
            cells[column_label(plan, col)] = _fmt(vals) if vals else ""
        layer = group[0].layer
        last = rows[-1] if rows else None
        if layer is not None and last and last["last"] is not None and last["last"] == layer - 1 \
                and last["values"] == cells:
            last["last"] = layer
            continue
        rows.append({"first": layer, "last": layer, "names": [j.name for j in group], "values": cells})
    out = []
    for r in rows:
        if r["first"] is None:
            names = r["names"]
            what = ", ".join(names) if len(names) <= 2 else f"{names[0]} and {len(names) - 1} more"
        else:
            what = f"layer {r['first']}" if r["first"] == r["last"] else f"layers {r['first']}-{r['last']}"
        out.append({"tensors": what, "values": r["values"]})
    return out

"""Merge statistics, the JSON report and the model card.

Everything written here is deterministic (no timestamps, durations, thread
counts or memory figures), so the whole output directory is byte-identical for
the same inputs and recipe.
"""

from __future__ import annotations

import json
import math
import os

from . import __version__


def totals(method, stats: dict[str, dict], n_models: int) -> dict:
    """Model-level figures over all tensors, as each of the method's statistics declares
    (element-weighted mean, or a ratio of summed counts; over the tensors that report it,
    and absent where none does); and the task-vector norms."""
    tensors = list(stats.values())
    numel = sum(s["numel"] for s in tensors) or 1

    def total(spec, entries: list[dict]) -> float:
        have = [(e, s["numel"]) for e, s in entries if spec.key in e]
        if spec.total == "ratio":
            den = sum(e[spec.den] for e, _ in have)
            return sum(e[spec.num] for e, _ in have) / den if den else 0.0
        return sum(e[spec.key] * n for e, n in have) / (sum(n for _, n in have) or 1)

    models = []
    for i in range(n_models):
        entries = [(s["models"][i], s) for s in tensors]
        m = {spec.key: total(spec, entries) for spec in method.stats
             if spec.per_model and any(spec.key in e for e, _ in entries)}
        m["l2"] = math.sqrt(math.fsum(e["l2"] ** 2 for e, _ in entries))
        models.append(m)
    out = {spec.key: total(spec, [(s, s) for s in tensors]) for spec in method.stats
           if not spec.per_model and any(spec.key in s for s in tensors)}
    out["models"] = models
    out["numel"] = numel
    return out


def input_passes(plan, stats: dict[str, dict]) -> float:
    """How many times the merge read its input, on average over bytes (copied tensors: once)."""
    read = sum(j.read_bytes for j in plan.jobs) or 1
    return sum(j.read_bytes * stats.get(j.name, {}).get("passes", 1) for j in plan.jobs) / read


def build_report(plan, stats: dict[str, dict], files: dict[str, dict]) -> dict:
    method = plan.method
    return {
        "npmerge_version": __version__,
        "method": method.name,
        "base": os.path.abspath(plan.recipe.base) if plan.recipe.base else None,
        "models": [{"path": os.path.abspath(e.path), "parameters": p}
                   for e, p in zip(plan.recipe.models, plan.model_params)],
        "parameters": plan.global_params,
        "out_dtype": plan.recipe.out_dtype,
        "notes": plan.notes + _nonfinite_notes(stats),
        "tensors_merged": sum(1 for j in plan.jobs if not j.copy),
        "tensors_copied": sum(1 for j in plan.jobs if j.copy),
        "totals": {**totals(method, stats, len(plan.models)), "input_passes": input_passes(plan, stats)},
        "tensors": {name: {k: v for k, v in s.items()} for name, s in stats.items()},
        "files": files,
    }


def _nonfinite_notes(stats: dict[str, dict]) -> list[str]:
    """Where NaN/Inf inputs were merged anyway (--allow-nonfinite)."""
    notes = []
    for name, s in stats.items():
        counts = s.get("nonfinite") or []
        where = [f"base {c}" if i == 0 else f"model {i} {c}" for i, c in enumerate(counts) if c]
        if where:
            notes.append(f"tensor '{name}' has NaN/Inf input values ({', '.join(where)}); "
                         "merged anyway (--allow-nonfinite)")
    return notes


def report_json(report: dict) -> bytes:
    return (json.dumps(report, indent=2, allow_nan=True) + "\n").encode()


def model_card(plan, recipe_yaml: str) -> str:
    method = plan.method
    base = plan.recipe.base
    lines = ["---"]
    if base:
        lines.append(f"base_model: {json.dumps(os.path.abspath(base))}")
    lines += ["base_model_relation: merge", "library_name: transformers", "tags:", "- merge", "- npmerge", "---", ""]
    lines += ["# Merged model", "",
              f"This model was made with [npmerge](https://pypi.org/project/npmerge/) {__version__} using "
              f"**{method.title}**" + (f" ([paper]({method.paper}))" if method.paper else "") + f": {method.summary}.",
              ""]
    if base:
        lines += [f"Base model: `{os.path.abspath(base)}`", ""]
    lines += ["| model | parameters |", "| --- | --- |"]
    for e, p in zip(plan.recipe.models, plan.model_params):
        params = ", ".join(f"{k}={v}" for k, v in p.items())
        lines.append(f"| `{os.path.abspath(e.path)}` | {params} |")
    lines += ["", "All arithmetic ran in float32 and was rounded once to the output dtype; "
              "the statistics of the merge are in `merge_report.json`.", "",
              "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)

"""Merge statistics, the JSON report and the model card.

Everything written here is deterministic (no timestamps, durations, thread
counts or memory figures), so the whole output directory is byte-identical for
the same inputs and recipe.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from . import __version__
from .io.hub import ModelRef, card_metadata, card_yaml
from .io.models import fingerprints
from .plan_params import deviations


def totals(method, stats: dict[str, dict], n_models: int, members: dict[str, tuple] | None = None) -> dict:
    """Model-level figures over all tensors, as each of the method's statistics declares
    (element-weighted mean, or a ratio of summed counts; over the tensors that report it,
    and absent where none does); and the task-vector norms.
    `members`: tensor name -> the plan's model index of each of its models, where a
    tensor merges only some of them (slices of a frankenmerge)."""
    tensors = list(stats.values())
    members = members or {}
    numel = sum(s["numel"] for s in tensors) or 1

    def total(spec, entries: list[dict]) -> float:
        have = [(e, s["numel"]) for e, s in entries if spec.key in e]
        if spec.total == "ratio":
            den = sum(e[spec.den] for e, _ in have)
            return sum(e[spec.num] for e, _ in have) / den if den else 0.0
        return sum(e[spec.key] * n for e, n in have) / (sum(n for _, n in have) or 1)

    models = []
    for i in range(n_models):
        entries = [(s["models"][list(members.get(name, range(n_models))).index(i)], s)
                   for name, s in stats.items() if i in members.get(name, range(n_models))]
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


# -- how shared files name the models ------------------------------------------------------
def model_ref(model) -> ModelRef:
    """How an opened input was named (io/hub.py); by its label when it kept no reference."""
    ref = getattr(model, "ref", None)
    return ref if ref is not None else ModelRef(path=Path(model.path), name=model.label)


def public_name(ref: ModelRef) -> str:
    """How the report names a model: as the user gave it (a Hub id, or a path relative to the
    working directory), but never by an absolute path, which would publish the user's directory
    layout with the model: then by its directory name."""
    return ref.card_name if os.path.isabs(os.path.expanduser(ref.name)) else ref.name


def card_name(ref: ModelRef) -> str:
    """How the model card names a model: the Hub id as given (with @revision), else the directory name."""
    return ref.name if ref.hub_id else ref.card_name


def model_records(plan, public: bool = True) -> tuple[dict | None, list[dict]]:
    """The base's and each model's record (name, Hub id, revision, resolved commit; the models'
    resolved parameters): what reproduces the merge. `public`: named by public_name, without a
    path of this machine (the report); else by the name as given (the plan on the terminal)."""
    def record(model) -> dict:
        ref = model_ref(model)
        return {**ref.as_record(), "name": public_name(ref) if public else ref.name}

    base = record(plan.base) if plan.base is not None else None
    return base, [{**record(m), "parameters": p} for m, p in zip(plan.models, plan.model_params)]


def public_notes(plan, notes: list[str]) -> list[str]:
    """`notes` with each model given by an absolute path named by its public name instead."""
    refs = [model_ref(m) for m in plan.inputs]
    swaps = sorted(((r.name, public_name(r)) for r in refs if r.name != public_name(r)), key=lambda s: -len(s[0]))
    out = []
    for note in notes:
        for old, new in swaps:
            note = note.replace(old, new)
        out.append(note)
    return out


def build_report(plan, stats: dict[str, dict], files: dict[str, dict]) -> dict:
    method = plan.method
    base, models = model_records(plan)
    return {
        "npmerge_version": __version__,
        "method": method.name,
        "base": base,
        "models": models,
        "parameters": plan.global_params,
        "out_dtype": plan.recipe.out_dtype,
        "notes": public_notes(plan, plan.notes + _nonfinite_notes(stats)),
        "tensors_merged": sum(1 for j in plan.jobs if not j.copy),
        "tensors_copied": sum(1 for j in plan.jobs if j.copy),
        "totals": {**totals(method, stats, len(plan.models), {j.name: j.members for j in plan.jobs if j.members}),
                   "input_passes": input_passes(plan, stats)},
        "tensors": {name: {k: v for k, v in s.items()} for name, s in stats.items()},
        "tensor_parameters": deviations(plan),  # per-tensor values that differ from "parameters"/"models"
        **_vocab_and_layout(plan),
        **({"stages": _stages(plan.stages)} if plan.stages else {}),
        "inputs": input_records(plan),
        "output": {"shard_size": plan.layout.shard_bytes},
        "files": files,
    }


def input_records(plan) -> list[dict]:
    """Each input's files as `verify --recompute` checks them before re-running the recipe:
    file name, size and sha256 of the safetensors header (or of the whole small file, an
    adapter's config). No path and no inode: the report is published with the model."""
    def entry(e: dict) -> dict:
        digest = {k: e[k] for k in ("header_sha256", "sha256") if k in e}
        return {"file": os.path.basename(e["path"]), "size": e["size"], **digest}

    return [{"name": public_name(model_ref(m)), "files": [entry(e) for e in fingerprints(m)]} for m in plan.inputs]


def _stages(stages: list[dict]) -> list[dict]:
    """The earlier stages of a multi-stage recipe, by name (a report is published: no paths)."""
    return [{"stage": s["stage"], "method": s["method"], "reused": s["reused"]} for s in stages]


def _vocab_and_layout(plan) -> dict:
    """How the inputs' tensors were matched, when it was not name for name (io/layout.py):
    `layout` (the head each model contributed, ignored tensors, the output's tying) and, with
    a tokenizer source, `vocabulary` (io/vocab.py). Models by public name; the notes say why."""
    names = [public_name(model_ref(m)) for m in plan.inputs]
    out = {}
    vocab = getattr(plan, "vocab", None)
    if vocab is not None:
        src = plan.recipe.tokenizer_source
        out["vocabulary"] = {
            "source": src if src in ("base", "union") else names[vocab.source_index],
            "tokens": vocab.n_tokens, "rows": vocab.size,
            "models": [{"name": name, "rows": vocab.in_rows[i], "lacks": len(vocab.missing(i)),
                        "remapped": not vocab.identity(i)} for i, name in enumerate(names)]}
    layout = getattr(plan, "tensor_map", None)
    if layout is None:
        return out
    renamed = {t.name: t.inputs for t in layout.tensors
               if t.copy_from is None and any(n != t.name for n in t.inputs)}
    if layout.ignored or renamed or layout.tie_word_embeddings is not None:
        record = {"tie_word_embeddings": layout.tie_word_embeddings,
                  "ignored": [{"model": names[i], "tensor": t} for i, t in layout.ignored]}
        for name, inputs in renamed.items():
            record.setdefault("inputs", {})[name] = dict(zip(names, inputs))
        out["layout"] = record
    return out


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
    """README.md: front matter the Hub reads (base_model: the Hub ids merged, with
    base_model_relation: merge; tags with the method), then the method, the models and the
    recipe. Models are named by Hub id or directory name: a card is published, so it never
    holds a path of this machine."""
    method = plan.method
    base = model_ref(plan.base) if plan.base is not None else None
    models = [model_ref(m) for m in plan.models]
    lines = [card_yaml(card_metadata(base, models, method.name)).rstrip("\n"), "", "# Merged model", "",
             f"This model was made with [npmerge](https://pypi.org/project/npmerge/) {__version__} using "
             f"**{method.title}**" + (f" ([paper]({method.paper}))" if method.paper else "") + f": {method.summary}.",
             ""]
    if base is not None:
        lines += [f"Base model: {_card_model(base)}", ""]
    lines += ["| model | parameters |", "| --- | --- |"]
    for ref, p in zip(models, plan.model_params):
        params = ", ".join(f"{k}={v}" for k, v in p.items())
        lines.append(f"| {_card_model(ref)} | {params} |")
    if plan.stages:
        lines += ["", "Made in stages: the models named below by a stage's name are the outputs of earlier stages "
                  "of the same recipe:", ""]
        lines += [f"- `{s['stage']}`: {s['method']}" for s in plan.stages]
    lines += ["", "All arithmetic ran in float32 and was rounded once to the output dtype; "
              "the statistics of the merge are in `merge_report.json`.", "",
              "## Recipe", "", "Models are named by Hub id or directory name; `npmerge_recipe.yml` holds the recipe "
              "as it was run.", "", "```yaml", _card_recipe(plan, recipe_yaml).rstrip(), "```", ""]
    return "\n".join(lines)


def _card_model(ref: ModelRef) -> str:
    """A Hub model links to the commit merged; a local one is its directory name."""
    if ref.hub_id and ref.commit:
        return f"[{ref.name}](https://huggingface.co/{ref.hub_id}/tree/{ref.commit})"
    return f"`{card_name(ref)}`"


def _card_recipe(plan, recipe_yaml: str) -> str:
    """The recipe with every model reference (as given, or made absolute) replaced by its
    card name; whatever form Recipe.to_yaml writes references in, none reaches the card."""
    import yaml

    names: dict[str, str] = {}
    given = ([plan.recipe.base] if plan.base is not None else []) + [e.path for e in plan.recipe.models]
    for text, model in zip(given, plan.inputs):
        ref = model_ref(model)
        for key in (text, os.path.abspath(text), os.path.abspath(os.path.expanduser(text)), ref.name,
                    str(ref.path), os.path.abspath(ref.path)):
            names[str(key)] = card_name(ref)

    def rename(value):
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        return names.get(value, value) if isinstance(value, str) else value

    return yaml.safe_dump(rename(yaml.safe_load(recipe_yaml)), sort_keys=False, default_flow_style=False)

"""Model compatibility checks, run at plan time before any tensor data is read (except
integer tensors, which must be equal in every model): same tensors (once io/layout.py has
matched tied heads and buffers), shapes and vocabularies, no FP8-scaled checkpoints, no
model given twice."""

from __future__ import annotations

import numpy as np

from .errors import IncompatibleModels, RecipeError
from .io.checkpoint import Checkpoint, TensorRef


def check_distinct(base: Checkpoint | None, models: list[Checkpoint]) -> None:
    seen: dict = {}
    for role, ckpt in ([("base", base)] if base else []) + [(f"model {i + 1}", m) for i, m in enumerate(models)]:
        for ident in ckpt.identity():
            if ident in seen:
                other_role, other = seen[ident]
                raise RecipeError(f"{role} '{ckpt.label}' is the same model as {other_role} '{other.label}'",
                                  hint="each model may appear once; weight it instead of repeating it")
            seen[ident] = (role, ckpt)


def check_inputs(inputs, layout, vocab_tensors=frozenset(), remapped: bool = False) -> None:
    """Same shapes (and vocabulary sizes) of the tensors feeding each output tensor; no
    FP8-scaled weights. `inputs`: (role, checkpoint) pairs, the reference first; `layout`:
    io/layout.py's plan over them (check_names has passed); `vocab_tensors`: the output
    tensors with one row per token; `remapped`: a tokenizer source maps their rows, so only
    their hidden axis must agree (and config.json vocab sizes may differ)."""
    problems = []
    for t in layout.tensors:
        if t.copy_from is not None:
            continue
        shapes = {role: c.tensors[n].info.shape for (role, c), n in zip(inputs, t.inputs)}
        keys = {s[1:] if remapped and t.name in vocab_tensors else s for s in shapes.values()}
        if len(keys) > 1:
            problems.append((t.name, shapes))
    if problems:
        _refuse_shapes(inputs, problems)
    if not remapped:
        _check_vocab(inputs)
    _refuse_fp8_scaled(inputs)


def _refuse_fp8_scaled(inputs) -> None:
    """FP8 weights with *_scale / *_scale_inv companions: their raw values are not the weights."""
    for role, ckpt in inputs:
        scales = [n for n in ckpt.tensors if n.endswith(("_scale", "_scale_inv"))]
        if scales and any(r.info.dtype.name.startswith("F8") for r in ckpt.tensors.values()):
            raise IncompatibleModels(f"{label(role, ckpt)} is an FP8-quantised checkpoint (e.g. '{scales[0]}')",
                                     hint="dequantise it first: averaging raw FP8 values without their scales is wrong")


def label(role: str, ckpt: Checkpoint) -> str:
    return f"{role} '{ckpt.label}'"


def _architecture(ckpt: Checkpoint):
    """config.json's architecture (e.g. LlamaForCausalLM) or model_type; None when not given."""
    config = ckpt.config or {}
    archs = config.get("architectures")
    value = archs[0] if isinstance(archs, list) and archs else config.get("model_type")
    return value if isinstance(value, str) else None


def _vocab_size(ckpt: Checkpoint):
    value = (ckpt.config or {}).get("vocab_size")
    return value if type(value) is int else None


def _check_vocab(inputs) -> None:
    """Same tensor shapes but different config.json vocab sizes still means different tokenizers."""
    sized = [(role, c, _vocab_size(c)) for role, c in inputs if _vocab_size(c) is not None]
    for role, ckpt, size in sized[1:]:
        if size != sized[0][2]:
            raise IncompatibleModels(f"vocabulary sizes differ in config.json: {label(*sized[0][:2])} has "
                                     f"{sized[0][2]} tokens, {label(role, ckpt)} has {size}", hint=_VOCAB_HINT)


_VOCAB_HINT = ("map the rows by token: --tokenizer-source base (the base's vocabulary), union (every model's tokens) "
               "or a model, or tokenizer_source: in a recipe")


def _refuse_shapes(inputs, problems) -> None:
    name, shapes = problems[0]
    roles = dict(inputs)
    (role_a, shape_a), *rest = shapes.items()
    role_b, shape_b = next((r, s) for r, s in rest if s != shape_a)
    who_a, who_b = label(role_a, roles[role_a]), label(role_b, roles[role_b])
    more = [f"  {n}: " + ", ".join(f"{r} {list(s)}" for r, s in shp.items()) for n, shp in problems[1:5]]
    detail = (f" (and {len(problems) - 1} more tensor(s))" if len(problems) > 1 else "") + "".join("\n" + m for m in more)
    if ("embed" in name or "lm_head" in name or "wte" in name) and shape_a and shape_b and shape_a[1:] == shape_b[1:]:
        raise IncompatibleModels(f"shape mismatch for '{name}': the vocabulary sizes differ, {who_a} has "
                                 f"{shape_a[0]} tokens, {who_b} has {shape_b[0]}{detail}", hint=_VOCAB_HINT)
    raise IncompatibleModels(f"shape mismatch for '{name}': {who_a} {list(shape_a)} vs {who_b} {list(shape_b)}{detail}",
                             hint="the models do not share an architecture; merge only fine-tunes of the same base")


def check_names(inputs, layout) -> None:
    """Every output tensor has a feeding tensor in every model (io/layout.py resolves tied
    heads, dead head copies and buffers first): else the models differ in architecture.
    `inputs`: (role, checkpoint) pairs in the layout's order, the reference first."""
    unresolved = layout.unresolved()
    if not unresolved:
        return
    ref_role, ref = inputs[0]
    for i, (role, ckpt) in enumerate(inputs[1:], 1):
        missing = [n for n, j in unresolved if j == i]
        extra = [n for n, j in unresolved if j == 0 and n in ckpt.tensors]
        if not (missing or extra):
            continue
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): " + ", ".join(missing[:5]))
        if extra:
            parts.append(f"has {len(extra)} extra tensor(s): " + ", ".join(extra[:5]))
        hint = "all models must have the same tensors (same architecture)"
        archs = [_architecture(c) for c in (ref, ckpt)]
        if None not in archs and archs[0] != archs[1]:
            parts.insert(0, f"different architectures ({archs[0]} vs {archs[1]})")
            hint = "merge only models of one architecture (fine-tunes of the same base model)"
        raise IncompatibleModels(f"{label(role, ckpt)} does not match {label(ref_role, ref)}: " + "; ".join(parts),
                                 hint=hint)


def check_equal_data(name: str, inputs) -> None:
    """Integer and bool tensors are copied, so every model must agree on them."""
    (ref_role, ref), *others = inputs
    a = ref.tensors[name]
    for role, ckpt in others:
        b = ckpt.tensors[name]
        if a.info.dtype != b.info.dtype or not _bytes_equal(a, b):
            raise IncompatibleModels(f"integer tensor '{name}' differs between {ref_role} and {role} '{ckpt.label}'",
                                     hint="integer/bool tensors (ids, masks) are copied, never averaged; "
                                          "they must be identical in every model")


def _bytes_equal(a: TensorRef, b: TensorRef, piece: int = 1 << 24) -> bool:
    x = a.file.flat(a.info.name).view(np.uint8)
    y = b.file.flat(b.info.name).view(np.uint8)
    return all(np.array_equal(x[i:i + piece], y[i:i + piece]) for i in range(0, x.size, piece))

"""Model references -> opened inputs: what a string in a recipe or on the command line
names, opened and validated. Every kind of model input is opened here, so the planner
asks one place:

- a checkpoint directory or .safetensors file (io/checkpoint.py), or a Hub id
  org/name[@revision] from the local Hugging Face cache (io/hub.py);
- a PEFT LoRA adapter directory: that adapter applied to the merge's base model;
- mergekit's `MODEL+ADAPTER`: MODEL with the adapter applied (io/adapted.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..constants import INDEX_NAME, SINGLE_NAME
from ..errors import InvalidCheckpoint, RecipeError
from .adapted import AdaptedModel
from .checkpoint import Checkpoint
from .hub import ModelRef, resolve_model
from .lora import LoraAdapter, is_lora_adapter
from .sources import MappedSource, TensorSource
from .staging import file_fingerprint

_PLUS_HINT = "write MODEL+ADAPTER: a model, '+', and one LoRA adapter directory (as mergekit)"


def split_ref(ref: str) -> tuple[str, str | None]:
    """'MODEL+ADAPTER' -> (MODEL, ADAPTER); any other reference -> (ref, None). A path
    that exists is taken whole (a '+' in a directory name stays a '+')."""
    if "+" not in ref or os.path.exists(ref):
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"cannot read model reference '{ref}': it does not exist, and it is not "
                          "MODEL+ADAPTER", hint=_PLUS_HINT)
    return parts[0], parts[1]


def open_model(ref: str, base=None, *, role: str = "model"):
    """Open what `ref` names (see the module docstring). `base`: the merge's base model,
    already opened, which a bare adapter is applied to (and which MODEL+ADAPTER reuses
    when MODEL is the base); `role` names the reference in messages."""
    model_ref, adapter_ref = split_ref(ref)
    if adapter_ref is not None:
        return _model_plus_adapter(ref, model_ref, adapter_ref, base)
    if is_adapter(ref):
        if base is None:
            raise _needs_base(ref, role)
        return _adapted(ref, LoraAdapter(ref), lambda: base, base)
    model = resolve_model(ref)  # a local path, or a Hub id from the Hugging Face cache (io/hub.py)
    return Checkpoint(model.path, ref=model)


def _model_plus_adapter(ref: str, model_ref: str, adapter_ref: str, base):
    if not os.path.exists(adapter_ref):
        raise InvalidCheckpoint(f"adapter path '{adapter_ref}' (of '{ref}') does not exist",
                                hint="check the path; " + _PLUS_HINT)
    if is_adapter(model_ref):
        raise RecipeError(f"model reference '{ref}' applies an adapter to an adapter", hint=_PLUS_HINT)

    def model():
        opened = open_model(model_ref)
        if base is not None and opened.identity() == base.identity():
            opened.close()  # MODEL is the merge's base: the adapter's task vector is delivered as it is
            return base
        return opened

    return _adapted(ref, LoraAdapter(adapter_ref), model, base)


def _adapted(ref: str, adapter: LoraAdapter, open_on, base) -> AdaptedModel:
    """`adapter` applied to open_on() (task vectors if that is `base`, the merge's base);
    closes what it opened if a check fails."""
    on = None
    try:
        on = open_on()
        on_base = on is base
        model = AdaptedModel(ref, adapter, on, on_base=on_base, owns_on=not on_base)
        model.ref = ModelRef(path=Path(adapter.path), name=ref)
        return model
    except BaseException:
        adapter.close()
        if on is not None and on is not base:
            on.close()
        raise


def is_adapter(ref: str) -> bool:
    """A PEFT adapter directory; one that also holds full model weights is a model."""
    return is_lora_adapter(ref) and not any(os.path.lexists(os.path.join(ref, n)) for n in (SINGLE_NAME, INDEX_NAME))


def _needs_base(ref: str, role: str) -> RecipeError:
    if role == "base":
        return RecipeError(f"base model '{ref}' is a LoRA adapter, not a model",
                           hint="give the model the adapter was trained on as the base and the adapter among "
                                "the models, or write MODEL+ADAPTER to use the adapted model as the base")
    return RecipeError(f"{role} '{ref}' is a LoRA adapter, and this merge has no base model to apply it to",
                       hint="give the base model (the one the adapter was trained on), or write "
                            "MODEL+ADAPTER to merge MODEL with the adapter applied")


def source(model, name: str) -> TensorSource:
    """The tensor `name` of an opened model, as the engine reads it."""
    if isinstance(model, AdaptedModel):
        return model.source(name, source(model.on, name))
    return MappedSource(model.tensors[name], model.label)


def fingerprints(model) -> list[dict]:
    """staging.file_fingerprint entries of every file the model's values come from."""
    if isinstance(model, AdaptedModel):
        return model.fingerprints()
    return [file_fingerprint(p) for p in model.files]

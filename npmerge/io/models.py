"""Model references -> opened inputs: what a string in a recipe or on the command line
names, opened and validated. Every kind of model input (a checkpoint directory or file
today) is opened here, so the planner asks one place."""

from __future__ import annotations

from .checkpoint import Checkpoint
from .hub import resolve_model
from .sources import MappedSource, TensorSource


def open_model(ref: str) -> Checkpoint:
    """Open the model `ref` names: a local directory or .safetensors file (a path that exists
    wins), else a Hub id org/name[@revision] from the Hugging Face cache (io/hub.py). The
    opened model keeps the resolved reference (`.ref`): its name as given, Hub commit, notes."""
    model = resolve_model(ref)
    return Checkpoint(model.path, ref=model)


def source(model: Checkpoint, name: str) -> TensorSource:
    """The tensor `name` of an opened model, as the engine reads it."""
    return MappedSource(model.tensors[name], model.label)

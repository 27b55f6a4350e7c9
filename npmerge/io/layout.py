"""Which input tensor feeds which output tensor when the models agree on the weights but
not on how they store them: tied vs untied output heads, dead head copies, and
non-persistent buffers that only some exporters wrote.

Pure functions on tensor-name sets and configs; the planner turns the result into jobs.

- **Heads.** A model's head is live when it stores `lm_head.weight` (or `embed_out.weight`)
  and its config does not say `tie_word_embeddings: true`; a stored head in a model
  whose config says tied is a dead copy (transformers replaces it by the embeddings on
  load): ignored, with a note. If any model's head is live the output is untied:
  `lm_head.weight` is merged, each model contributing its live head or else its input
  embeddings, and config.json gets `tie_word_embeddings: false` when some model is tied
  (and the reference's config does not already say so). Otherwise the output is
  tied and stores no head. (mergekit: `lm_head.weight` is optional with
  `tied_names: [embed_tokens]`, so a tied model contributes its embeddings; it keeps the
  base's config, so a tied base with an untied fine-tune yields a checkpoint that
  transformers loads tied, dropping the merged head.)
- **Buffers** (`rotary_emb.inv_freq`, `*.masked_bias`, GPT-2 `attn.bias`, rotary
  caches): values computed from the config, not trained. Copied from the reference
  model (the base) when it has them, else dropped; a note when not every model has
  them. (mergekit writes only the tensors its architecture files list, so it drops them.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                  "tok_embeddings.weight")
_BUFFER = re.compile(r"(^|\.)(rotary_emb\.(inv_freq|cos_cached|sin_cached)|masked_bias|attn\.bias)$")


def is_buffer(name: str) -> bool:
    """A non-persistent buffer some exporters save: recomputed by the model, never merged."""
    return bool(_BUFFER.search(name))


def is_vocab_tensor(name: str, shape: Sequence[int], rows: int) -> bool:
    """An embedding or output head: 2-D, one row per token (`rows` = the model's embedding rows)."""
    named = name in HEAD_NAMES or name == "output.weight" or any(
        name == s or name.endswith("." + s) for s in EMBED_SUFFIXES)
    return named and len(shape) == 2 and shape[0] == rows


def embedding_name(names) -> str | None:
    """The input-embedding tensor among `names` (None when there is none or several)."""
    found = [n for n in names if any(n == s or n.endswith("." + s) for s in EMBED_SUFFIXES)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class ModelLayout:
    """What the policy needs of one input: its label, tensor names (in file order) and config.json."""

    label: str
    names: Sequence[str]
    config: Mapping | None = None


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: per input model the tensor feeding it (None: the model lacks it).

    `copy_from` is set for buffers: that model's bytes are copied, nothing is merged.
    """

    name: str
    inputs: tuple[str | None, ...]
    copy_from: int | None = None


@dataclass(frozen=True)
class LayoutPlan:
    tensors: tuple[OutputTensor, ...]
    ignored: tuple[tuple[int, str], ...]  # (model, tensor) that feeds no output tensor
    tie_word_embeddings: bool | None  # value for config.json; None: leave the reference's
    notes: tuple[str, ...]

    def unresolved(self) -> list[tuple[str, int]]:
        """(tensor, model) pairs of merged tensors a model lacks: the planner's 'not the same architecture' case."""
        return [(t.name, i) for t in self.tensors if t.copy_from is None
                for i, src in enumerate(t.inputs) if src is None]

    def get(self, name: str) -> OutputTensor:
        return next(t for t in self.tensors if t.name == name)


def _tied(model: ModelLayout, head: str) -> bool:
    value = (model.config or {}).get("tie_word_embeddings")
    if isinstance(value, bool):
        return value
    text = (model.config or {}).get("text_config")
    if isinstance(text, dict) and isinstance(text.get("tie_word_embeddings"), bool):
        return text["tie_word_embeddings"]
    return head not in model.names  # no key: judge by what is stored


def plan_layout(models: Sequence[ModelLayout], base_index: int | None = None) -> LayoutPlan:
    """Map output tensors to input tensors for heads and buffers; every other name maps to itself."""
    ref = 0 if base_index is None else base_index
    names = [set(m.names) for m in models]
    order: dict[str, None] = dict.fromkeys(models[ref].names)
    for m in models:
        order.update(dict.fromkeys(n for n in m.names if n not in order))
    notes: list[str] = []
    ignored: list[tuple[int, str]] = []
    special: dict[str, OutputTensor] = {}
    tie = None

    head = next((h for h in HEAD_NAMES if any(h in s for s in names)), None)
    embeds = {embedding_name(m.names) for m in models}
    embed = embeds.pop() if len(embeds) == 1 else None
    if head is not None and embed is not None:
        live = [head in s and not _tied(m, head) for m, s in zip(models, names)]
        for i, (m, s) in enumerate(zip(models, names)):
            if head in s and not live[i]:
                ignored.append((i, head))
                notes.append(f"{m.label} stores '{head}' but its config ties it to the embeddings "
                             f"(tie_word_embeddings): the stored copy is ignored")
        if any(live):
            special[head] = OutputTensor(head, tuple(head if live[i] else embed for i in range(len(models))))
            tied = [models[i].label for i in range(len(models)) if not live[i]]
            if tied and (models[ref].config or {}).get("tie_word_embeddings") is not False:
                tie = False  # say it: a tied config would make transformers drop the merged head
            if tied:
                notes.append(f"untied output head: '{head}' is merged, with the embeddings '{embed}' as the head of "
                             + ", ".join(tied) + ("; config.json gets tie_word_embeddings: false" if tie is False
                                                  else ""))
        else:
            order.pop(head, None)

    for name in [n for n in order if is_buffer(n)]:
        has = [name in s for s in names]
        if has[ref]:
            special[name] = OutputTensor(name, tuple(name if h else None for h in has), copy_from=ref)
            ignored.extend((i, name) for i, h in enumerate(has) if h and i != ref)
        else:
            order.pop(name)
            ignored.extend((i, name) for i, h in enumerate(has) if h)
        if not all(has):
            who = ", ".join(m.label for m, h in zip(models, has) if h)
            notes.append(f"buffer '{name}' (recomputed by the model, not trained) is only in {who}: "
                         + (f"copied from {models[ref].label}" if has[ref] else "left out of the output"))

    tensors = tuple(special.get(n) or OutputTensor(n, tuple(n if n in s else None for s in names)) for n in order)
    return LayoutPlan(tensors, tuple(ignored), tie, tuple(notes))


def apply_config(config: Mapping, vocab_size: int | None = None, tie_word_embeddings: bool | None = None) -> dict:
    """A copy of config.json's object with the output's vocab_size and head tying (key order kept).

    vocab_size goes where the model keeps it (top level, else `text_config`);
    tie_word_embeddings is set at the top level and in a `text_config` that has it.
    """
    out = dict(config)
    text = dict(out["text_config"]) if isinstance(out.get("text_config"), dict) else None
    if vocab_size is not None:
        if "vocab_size" in out or text is None or "vocab_size" not in text:
            out["vocab_size"] = vocab_size
        else:
            text["vocab_size"] = vocab_size
    if tie_word_embeddings is not None:
        out["tie_word_embeddings"] = tie_word_embeddings
        if text is not None and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = tie_word_embeddings
    if text is not None:
        out["text_config"] = text
    return out


def config_changes(config: Mapping, vocab_size: int | None = None,
                   tie_word_embeddings: bool | None = None) -> dict[tuple, object]:
    """apply_config's changes as key paths (("vocab_size",), ("text_config", "vocab_size"), ...) -> value,
    the form the planner's config.json updates take."""
    new = apply_config(config, vocab_size, tie_word_embeddings)
    out: dict[tuple, object] = {}
    for key, value in new.items():
        old = config.get(key, _MISSING)
        if key == "text_config" and isinstance(value, dict) and isinstance(old, dict):
            out.update({(key, k): v for k, v in value.items() if old.get(k, _MISSING) != v})
        elif old != value:
            out[(key,)] = value
    return out


_MISSING = object()

"""What `npmerge extract-lora` writes besides tensor data: PEFT's key names,
adapter_config.json and the adapter's model card. The inverse of io/lora.py, which
reads all of it back (and checks it against PEFT's conventions, described there).

- low-rank modules: `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight`
  [out, r]; an input embedding (--embed-lora): `lora_embedding_A` [r, vocab] and
  `lora_embedding_B` [dim, r];
- tensors saved whole: `base_model.model.<tensor>` with the module in `modules_to_save`
  (PEFT's ModulesToSaveWrapper saves it under that key); a changed tensor of a low-rank
  module other than its weight (a bias) as `<module>.base_layer.<param>` with
  `bias: "all"`, the key PEFT gives a LoRA layer's own bias;
- `r` = the largest rank, `lora_alpha` = r and, per module of another rank, the same
  value in `rank_pattern` and `alpha_pattern` (keys: the escaped module name), so every
  module's scale alpha/r is 1 and B·A is the change (as mergekit writes them);
- `target_modules` and `modules_to_save` list full module names, so PEFT wraps exactly
  the modules the adapter holds (a suffix like `q_proj` would also wrap unchanged ones).
"""

from __future__ import annotations

import json
import re

from .. import __version__
from .hub import ModelRef, card_yaml
from .lora import CONFIG_NAME, KEY_PREFIX

# Key segments PEFT gives a meaning: a base tensor named with one would be misread.
RESERVED_SEGMENTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "base_layer",
                               "modules_to_save", "original_module", "lora_magnitude_vector", "token_adapter"})


def lowrank_keys(module: str, embedding: bool) -> tuple[str, str]:
    """(A key, B key) of a low-rank module."""
    if embedding:
        return f"{KEY_PREFIX}{module}.lora_embedding_A", f"{KEY_PREFIX}{module}.lora_embedding_B"
    return f"{KEY_PREFIX}{module}.lora_A.weight", f"{KEY_PREFIX}{module}.lora_B.weight"


def whole_key(name: str, lowrank_module: bool) -> str:
    """Key of a tensor saved whole; `lowrank_module`: its module also holds LoRA factors."""
    if lowrank_module:
        module, _, param = name.rpartition(".")
        return f"{KEY_PREFIX}{module}.base_layer.{param}"
    return KEY_PREFIX + name


def adapter_config(base_name: str, ranks: dict[str, int], modules_to_save: list[str], *,
                   layer_bias: bool, fan_in_fan_out: bool, task_type: str | None) -> dict:
    """adapter_config.json for modules `ranks` (module -> rank)."""
    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    return {
        "alpha_pattern": dict(pattern),
        "base_model_name_or_path": base_name,
        "bias": "all" if layer_bias else "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": r,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": sorted(modules_to_save) or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": pattern,
        "target_modules": sorted(ranks),
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": False,
    }


def config_bytes(config: dict) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def adapter_card(base: ModelRef, ft: ModelRef, config: dict, summary: dict) -> str:
    """README.md: front matter the Hub reads (base_model: the base's Hub id; library_name:
    peft), then what was extracted. Models by Hub id or directory name, never a path."""
    meta: dict = {}
    if base.hub_id:
        meta["base_model"] = base.hub_id
    meta["library_name"] = "peft"
    meta["tags"] = ["lora", "npmerge", "extract-lora"]

    def named(ref: ModelRef) -> str:
        return f"`{ref.hub_id or ref.card_name}`"

    ranks = sorted({config["r"], *config["rank_pattern"].values()})
    lines = [card_yaml(meta).rstrip("\n"), "", "# LoRA adapter", "",
             f"Extracted with [npmerge](https://pypi.org/project/npmerge/) {__version__} `extract-lora` from the "
             f"fine-tune {named(ft)} against its base {named(base)}: each module's change Δ = FT − BASE "
             "(float32) is approximated by its best rank-r factorisation B·A (truncated SVD in float64), "
             "rounded once to the adapter's dtype.", "",
             f"- rank {ranks[-1]}" + (f" (per module {ranks[0]}–{ranks[-1]}, see `rank_pattern`)" if len(ranks) > 1
                                      else "") + f", lora_alpha = r (scale 1); {summary['lowrank']} low-rank "
             f"module(s), {summary['whole']} tensor(s) saved whole",
             f"- ‖Δ‖² kept overall: {summary['energy']:.6f}; relative error of B·A overall: "
             f"{summary['error']:.3e}", "",
             "Per-module ranks, kept energy and errors are in `extract_report.json`; load with PEFT "
             "(`PeftModel.from_pretrained(base, DIR)`) or merge with `npmerge task-arithmetic BASE DIR`.",
             f"`{CONFIG_NAME}` names the base as `{config['base_model_name_or_path']}`.", ""]
    return "\n".join(lines)

#!/usr/bin/env python
"""Generate the PEFT LoRA adapter fixtures under fixtures/tiny-lora/ (NumPy only).

    make_lora_fixtures(out_dir)    # called by scripts/make_fixtures.py's generate()

Adapters are written exactly as PEFT's `save_pretrained(..., safe_serialization=True)`
lays them out: `adapter_config.json` (LoraConfig.to_dict(), sorted keys, indent 2) and
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` etc.
(adapter name removed). The safetensors bytes, the random numbers (PCG64 + Irwin-Hall
normals) and BF16 rounding are mf.py's, so the files are byte-identical on
every run and `tests/test_fixtures.py` checks them like the other fixtures.

Llama adapters target the bundled `tiny-llama/base` (BF16, untied lm_head, no
biases). Conv1D layers (fan_in_fan_out), embedding LoRA, `bias: all` and `lora_bias`
need a model that has them, so a small GPT-2-like base (`tiny-gpt2/base`, F32, tied
wte) is generated here too.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np

import fixtures_base as mf  # the shared generator helpers (a sibling: scripts/ is on sys.path)

SEED_LORA = 20240615
GPT2 = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16)
LLAMA_BASE = "fixtures/tiny-llama/base"
GPT2_BASE = "fixtures/tiny-lora/tiny-gpt2/base"
PREFIX = "base_model.model."


def adapter_config(**overrides) -> dict:
    """PEFT LoraConfig.to_dict() with its defaults (peft 0.13), then `overrides`."""
    cfg = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None,
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    cfg.update(overrides)
    return cfg


def _factors(module: str, out: int, inn: int, r: int, embedding: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """float32 A [r, inn] and B [out, r] of a trained-looking LoRA (tau ~ 1e-3)."""
    rng = mf._rng(SEED_LORA, 1, mf._key(module), r)
    a = mf._normal(rng, (r, inn)) / math.sqrt(inn)
    b = 2e-3 * mf._normal(rng, (out, r))
    if embedding:  # PEFT initialises embedding A to zeros and B to N(0, 1): trained A is the small one
        a, b = 2e-3 * mf._normal(rng, (r, inn)), mf._normal(rng, (out, r)) / math.sqrt(r)
    return a.astype(np.float32), b.astype(np.float32)


def _stored(x: np.ndarray, code: str) -> tuple[str, np.ndarray]:
    return (code, mf.f32_to_bf16_bits(x)) if code == "BF16" else (code, np.ascontiguousarray(x, np.float32))


def _write_adapter(d: Path, cfg: dict, tensors: dict) -> None:
    mf._write(d / "adapter_config.json", mf._json(cfg, sort_keys=True))
    mf._write(d / "adapter_model.safetensors", mf._safetensors_bytes(tensors))


def _lora(tensors: dict, module: str, out: int, inn: int, r: int, code: str) -> None:
    a, b = _factors(module, out, inn, r)
    tensors[f"{PREFIX}{module}.lora_A.weight"] = _stored(a, code)
    tensors[f"{PREFIX}{module}.lora_B.weight"] = _stored(b, code)


def _small(name: str, shape, scale: float) -> np.ndarray:
    return scale * mf._normal(mf._rng(SEED_LORA, 2, mf._key(name)), shape)


# --------------------------------------------------------------------------- llama


def _llama_adapters(root: Path) -> None:
    specs = dict(mf.llama_tensor_specs(mf.LLAMA))
    layers = range(mf.LLAMA["num_hidden_layers"])

    def modules(kinds):
        return [f"model.layers.{i}.{'mlp' if k.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{k}"
                for i in layers for k in kinds]

    def adapter(name, kinds, r_of, code, cfg, extra=None):
        tensors = dict(extra or {})
        for m in modules(kinds):
            out, inn = specs[m + ".weight"]
            _lora(tensors, m, out, inn, r_of(m), code)
        _write_adapter(root / name, adapter_config(base_model_name_or_path=LLAMA_BASE, **cfg), tensors)

    adapter("qv-f32", ["q_proj", "v_proj"], lambda m: 8, "F32",
            dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

    # first matching key wins, per pattern; keys are regular expressions (see README)
    rank_pattern = {"model.layers.0.self_attn.q_proj": 2, "q_proj": 4, "k_proj": 6}
    alpha_pattern = {r"model\.layers\.1\..*": 8, "v_proj": 32}
    ranks = {"q_proj": 4, "k_proj": 6, "v_proj": 8, "o_proj": 8}
    adapter("rslora-patterns", list(ranks),
            lambda m: 2 if m == "model.layers.0.self_attn.q_proj" else ranks[m.rsplit(".", 1)[1]], "F32",
            dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                 target_modules=list(ranks)))

    linear = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    adapter("all-linear-bf16", linear, lambda m: 4, "BF16", dict(r=4, lora_alpha=8, target_modules=linear))

    # modules_to_save: the whole lm_head, trained, in the base's dtype (BF16)
    shape = specs["lm_head.weight"]
    base = mf.bf16_bits_to_f32(mf.f32_to_bf16_bits(
        mf._base_value(mf.SEED_LLAMA, "lm_head.weight", shape, mf.LLAMA["num_hidden_layers"]).astype(np.float32)))
    head = (base.astype(np.float64) + _small("lm_head.weight", shape, 1e-3)).astype(np.float32)
    adapter("lm-head-save", ["q_proj", "v_proj"], lambda m: 4, "F32",
            dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
            extra={f"{PREFIX}lm_head.weight": _stored(head, "BF16")})


# ---------------------------------------------------------------------------- gpt2


def gpt2_tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a GPT2LMHeadModel state dict (Conv1D weights are [in, out]; lm_head tied)."""
    h, v = cfg["n_embd"], cfg["vocab_size"]
    specs = [("transformer.wte.weight", (v, h)), ("transformer.wpe.weight", (cfg["n_positions"], h))]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        specs += [(p + "ln_1.weight", (h,)), (p + "ln_1.bias", (h,)),
                  (p + "attn.c_attn.weight", (h, 3 * h)), (p + "attn.c_attn.bias", (3 * h,)),
                  (p + "attn.c_proj.weight", (h, h)), (p + "attn.c_proj.bias", (h,)),
                  (p + "ln_2.weight", (h,)), (p + "ln_2.bias", (h,)),
                  (p + "mlp.c_fc.weight", (h, 4 * h)), (p + "mlp.c_fc.bias", (4 * h,)),
                  (p + "mlp.c_proj.weight", (4 * h, h)), (p + "mlp.c_proj.bias", (h,))]
    return specs + [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]


def gpt2_base() -> dict[str, np.ndarray]:
    """float32 values of the tiny GPT-2 base."""
    out = {}
    for name, shape in gpt2_tensor_specs(GPT2):
        rng = mf._rng(SEED_LORA, 0, mf._key(name))
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            x = 1.0 + 0.02 * mf._normal(rng, shape)
        else:
            x = (0.01 if name.endswith(".bias") else 0.02) * mf._normal(rng, shape)
        out[name] = x.astype(np.float32)
    return out


def _gpt2_config() -> dict:
    c = GPT2
    return {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.0,
        "bos_token_id": 0, "embd_pdrop": 0.0, "eos_token_id": 0, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": c["n_embd"], "n_head": c["n_head"],
        "n_inner": None, "n_layer": c["n_layer"], "n_positions": c["n_positions"], "resid_pdrop": 0.0,
        "tie_word_embeddings": True, "torch_dtype": "float32", "transformers_version": "4.44.2",
        "vocab_size": c["vocab_size"],
    }


def _gpt2_adapters(root: Path) -> None:
    base = gpt2_base()
    mf._write(root / "base" / "model.safetensors", mf._safetensors_bytes({k: ("F32", v) for k, v in base.items()}))
    mf._write(root / "base" / "config.json", mf._json(_gpt2_config(), sort_keys=True))
    layers = range(GPT2["n_layer"])
    conv = [f"transformer.h.{i}.{m}" for i in layers for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]

    def trained(name):  # a bias or norm the fine-tune trained fully
        return ("F32", (base[name].astype(np.float64) + _small(name, base[name].shape, 2e-3)).astype(np.float32))

    # Conv1D LoRA (fan_in_fan_out) + bias "all" + modules_to_save ln_f
    tensors = {}
    for m in conv:
        inn, out = base[m + ".weight"].shape
        _lora(tensors, m, out, inn, 4, "F32")
        tensors[f"{PREFIX}{m}.base_layer.bias"] = trained(m + ".bias")  # a wrapped layer's own bias
    for name in base:
        if name.endswith((".ln_1.bias", ".ln_2.bias")):
            tensors[PREFIX + name] = trained(name)
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        tensors[PREFIX + name] = trained(name)
    _write_adapter(root / "conv1d-bias-all", adapter_config(
        base_model_name_or_path=GPT2_BASE, r=4, lora_alpha=8, fan_in_fan_out=True, bias="all",
        target_modules=["c_attn", "c_fc", "c_proj"], modules_to_save=["ln_f"]), tensors)

    # embedding LoRA on wte (+ the base_layer copy PEFT saves with targeted embeddings) and lora_bias on c_fc
    tensors = {}
    v, h = base["transformer.wte.weight"].shape
    a, b = _factors("transformer.wte", h, v, 4, embedding=True)
    tensors[f"{PREFIX}transformer.wte.lora_embedding_A"] = _stored(a, "F32")
    tensors[f"{PREFIX}transformer.wte.lora_embedding_B"] = _stored(b, "F32")
    tensors[f"{PREFIX}transformer.wte.base_layer.weight"] = ("F32", base["transformer.wte.weight"])
    for i in layers:
        m = f"transformer.h.{i}.mlp.c_fc"
        inn, out = base[m + ".weight"].shape
        _lora(tensors, m, out, inn, 4, "F32")
        tensors[f"{PREFIX}{m}.lora_B.bias"] = ("F32", _small(m + ".lora_B.bias", (out,), 2e-3).astype(np.float32))
    _write_adapter(root / "embedding-lora-bias", adapter_config(
        base_model_name_or_path=GPT2_BASE, r=4, lora_alpha=4, fan_in_fan_out=True, lora_bias=True,
        target_modules=["c_fc", "wte"]), tensors)


_README = """\
# LoRA adapter fixtures

Generated by `scripts/fixtures_lora.py` (through `scripts/make_fixtures.py`) -- do not
edit by hand. PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<module>.lora_A.weight`, adapter name removed), written without torch.

- `tiny-llama/qv-f32` -- q_proj/v_proj, r 8, alpha 16, F32 factors.
- `tiny-llama/rslora-patterns` -- use_rslora, r 8, alpha 16 on q/k/v/o with
  rank_pattern `{"model.layers.0.self_attn.q_proj": 2, "q_proj": 4, "k_proj": 6}` and
  alpha_pattern `{"model\\\\.layers\\\\.1\\\\..*": 8, "v_proj": 32}` (regular expressions;
  the first key K with re.match(r"(.*\\.)?(K)$", module) wins): layer 0 q r 2, layer 1
  q r 4, k r 6, v/o r 8; alpha 8 in layer 1, 32 for layer-0 v, else 16.
- `tiny-llama/all-linear-bf16` -- every linear layer but lm_head, r 4, alpha 8, BF16 factors.
- `tiny-llama/lm-head-save` -- q/v r 4 + modules_to_save lm_head (a full BF16 lm_head.weight).
- `tiny-gpt2/base` -- GPT-2-like F32 model (vocab 64, n_embd 32, 2 layers, Conv1D
  weights [in, out], biases, tied wte).
- `tiny-gpt2/conv1d-bias-all` -- fan_in_fan_out LoRA r 4, alpha 8 on c_attn, attn
  c_proj (square), c_fc, mlp c_proj; bias "all" (wrapped layers' `base_layer.bias`, the
  ln biases) and modules_to_save ln_f.
- `tiny-gpt2/embedding-lora-bias` -- embedding LoRA on wte (`lora_embedding_A/B`, plus
  the `wte.base_layer.weight` copy PEFT saves for a targeted embedding, equal to the
  base) and lora_bias LoRA on c_fc (`lora_B.bias`), r 4, alpha 4.
"""


def make_lora_fixtures(out_dir) -> None:
    """Write `out_dir`/tiny-lora (replacing it)."""
    root = Path(out_dir) / "tiny-lora"
    if root.exists():
        shutil.rmtree(root)
    _llama_adapters(root / "tiny-llama")
    _gpt2_adapters(root / "tiny-gpt2")
    mf._write(root / "README.md", _README)


if __name__ == "__main__":
    make_lora_fixtures(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "fixtures")

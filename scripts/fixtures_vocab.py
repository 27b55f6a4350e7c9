"""Fixtures for vocabulary and layout handling (issue 16), called by make_fixtures.generate().

    make_vocab_fixtures(out_dir)

Small Llama-style BF16 checkpoints (hidden 32, one layer) with WordLevel tokenizers:

- tiny-vocab/{base, ft-chat, ft-tool}: ft-chat adds the special tokens <|im_start|>,
  <|im_end|> (ids 80, 81; 82 rows) and a ChatML chat template; ft-tool adds the plain
  word 'zorba' (80) and the special tokens <tool> (81) and <|im_start|> (82; 83 rows),
  so a union permutes its rows.
- tiny-padded/{base, ft-pad}: 76 tokens in 80 rows; ft-pad puts <|im_start|>, <|im_end|>
  into padded rows 76, 77 (equal shapes, different tokenizers).
- tiny-tied/{base, ft-untied, ft-deadhead}: a tied base without lm_head, an untied
  fine-tune with its own lm_head, and a tied fine-tune whose exporter stored a dead
  lm_head (a stale copy of the base's embeddings, not its own).
- tiny-rope/{base, ft-new, ft-old}: base and ft-old store
  model.layers.0.self_attn.rotary_emb.inv_freq (F32), ft-new does not.

NumPy only and byte-for-byte deterministic, like mf.py whose helpers it uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import fixtures_base as mf  # the shared generator helpers (a sibling: scripts/ is on sys.path)

SEED_VOCAB = 20240615
FAMILIES = ("tiny-vocab", "tiny-padded", "tiny-tied", "tiny-rope")
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOOL_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + ' ' + message['content']}}"
                 "{% if message['role'] == 'tool' %}{{'<tool>'}}{% endif %}{% endfor %}")


def _special(tid: int, content: str) -> dict:
    return {"id": tid, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _tokenizer(size: int, plain=(), added=(), chat_template=None) -> dict[str, str]:
    """fixtures_base's WordLevel tokenizer of `size` words, plus plain words and added special tokens."""
    files = mf.tokenizer_files(size)
    tok = json.loads(files["tokenizer.json"])
    for word in plain:
        tok["model"]["vocab"][word] = len(tok["model"]["vocab"])
    nxt = len(tok["model"]["vocab"])
    for content in added:
        tok["added_tokens"].append(_special(nxt, content))
        nxt += 1
    cfg = json.loads(files["tokenizer_config.json"])
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                   for a in tok["added_tokens"]}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return {"tokenizer.json": json.dumps(tok, indent=2, ensure_ascii=False) + "\n",
            "tokenizer_config.json": mf._json(cfg),
            "special_tokens_map.json": files["special_tokens_map.json"]}


def _specs(rows: int, head: bool) -> list[tuple[str, tuple[int, ...]]]:
    specs = mf.llama_tensor_specs(dict(SHAPE, vocab_size=rows))
    return [(n, s) for n, s in specs if head or n != "lm_head.weight"]


def _base_weights(family: str, rows: int) -> dict[str, np.ndarray]:
    """float64 base values for every tensor of an untied model with `rows` rows."""
    return {n: mf._base_value(SEED_VOCAB + FAMILIES.index(family), n, s, 1) for n, s in _specs(rows, True)}


def _finetune(base: dict[str, np.ndarray], family: str, model: str, rows: int) -> dict[str, np.ndarray]:
    """base + ~1e-3 heavy-tailed deltas; rows beyond the base's are new tokens, N(0, 0.02)."""
    out = {}
    for name, value in base.items():
        rng = mf._rng(SEED_VOCAB, mf._key(family + "/" + model), mf._key(name))
        shape = value.shape
        if len(shape) == 2 and name.endswith(("embed_tokens.weight", "lm_head.weight")) and rows != shape[0]:
            grown = np.empty((rows, shape[1]))
            grown[: shape[0]] = value
            grown[shape[0]:] = 0.02 * mf._normal(rng, (rows - shape[0], shape[1]))
            value = grown
        out[name] = value + 1e-3 * mf._student_t3(rng, value.shape)
    return out


def _write_model(d: Path, tensors: dict[str, np.ndarray], rows: int, tokenizer: dict[str, str] | None,
                 tied: bool = False, extra: dict[str, tuple[str, np.ndarray]] | None = None) -> None:
    st = {n: ("BF16", mf.f32_to_bf16_bits(v.astype(np.float32))) for n, v in tensors.items()}
    st.update(extra or {})
    mf._write(d / "model.safetensors", mf._safetensors_bytes(st))
    cfg = mf.llama_config(dict(SHAPE, vocab_size=rows), "bfloat16")
    cfg["max_position_embeddings"] = 64
    cfg["tie_word_embeddings"] = tied
    mf._write(d / "config.json", mf._json(cfg, sort_keys=True))
    for name, text in (tokenizer or {}).items():
        mf._write(d / name, text)


def _vocab(out: Path) -> None:
    fam = "tiny-vocab"
    base = _base_weights(fam, 80)
    _write_model(out / fam / "base", base, 80, _tokenizer(80))
    chat = _finetune(base, fam, "ft-chat", 82)
    _write_model(out / fam / "ft-chat", chat, 82,
                 _tokenizer(80, added=("<|im_start|>", "<|im_end|>"), chat_template=CHATML))
    tool = _finetune(base, fam, "ft-tool", 83)
    _write_model(out / fam / "ft-tool", tool, 83,
                 _tokenizer(80, plain=("zorba",), added=("<tool>", "<|im_start|>"), chat_template=TOOL_TEMPLATE))


def _padded(out: Path) -> None:
    fam = "tiny-padded"
    base = _base_weights(fam, 80)
    _write_model(out / fam / "base", base, 80, _tokenizer(76))
    _write_model(out / fam / "ft-pad", _finetune(base, fam, "ft-pad", 80), 80,
                 _tokenizer(76, added=("<|im_start|>", "<|im_end|>"), chat_template=CHATML))


def _tied(out: Path) -> None:
    fam = "tiny-tied"
    base = _base_weights(fam, 80)
    del base["lm_head.weight"]
    tok = _tokenizer(80)
    _write_model(out / fam / "base", base, 80, tok, tied=True)
    untied = _finetune(base, fam, "ft-untied", 80)
    own = mf._rng(SEED_VOCAB, mf._key(fam + "/ft-untied/head"))
    untied["lm_head.weight"] = base["model.embed_tokens.weight"] + 2e-3 * mf._student_t3(own, (80, 32))
    _write_model(out / fam / "ft-untied", untied, 80, tok)
    dead = _finetune(base, fam, "ft-deadhead", 80)
    dead["lm_head.weight"] = base["model.embed_tokens.weight"]  # stale: the exporter's copy before fine-tuning
    _write_model(out / fam / "ft-deadhead", dead, 80, tok, tied=True)


def _rope(out: Path) -> None:
    fam = "tiny-rope"
    hd = SHAPE["head_dim"]
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)
    buffer = {"model.layers.0.self_attn.rotary_emb.inv_freq": ("F32", inv_freq)}
    base = _base_weights(fam, 80)
    tok = _tokenizer(80)
    _write_model(out / fam / "base", base, 80, tok, extra=buffer)
    _write_model(out / fam / "ft-new", _finetune(base, fam, "ft-new", 80), 80, tok)
    _write_model(out / fam / "ft-old", _finetune(base, fam, "ft-old", 80), 80, tok, extra=buffer)


def make_vocab_fixtures(out_dir) -> None:
    """(Re)write fixtures/tiny-{vocab,padded,tied,rope} under `out_dir`."""
    out = Path(out_dir)
    for fam in FAMILIES:
        if (out / fam).exists():
            shutil.rmtree(out / fam)
    _vocab(out)
    _padded(out)
    _tied(out)
    _rope(out)

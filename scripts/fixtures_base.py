"""The small, deterministic safetensors checkpoints under fixtures/: the shared generator
helpers and the base families (tiny-llama, tiny-llama-f32, tiny-int). scripts/make_fixtures.py
writes them all (with fixtures_lora.py and fixtures_vocab.py, which use these helpers).

Everything here is NumPy and the standard library only: no torch, no `safetensors`,
no `ml_dtypes`. The safetensors bytes are written by hand in exactly the layout of the
official writer (see `_safetensors_bytes`), BF16 is produced from float32 by
round-to-nearest-even on the uint32 bit patterns, and the output is byte-identical on
every run (tests/test_fixtures.py regenerates into a temp dir and compares).

Portability of the random numbers: only PCG64's raw stream is used, through
`Generator.random()` (uniform doubles built from the integer bits) and
`Generator.permutation()`. Normals are Irwin-Hall sums of 12 uniforms and the
heavy-tailed noise is a Student-t(3) built as z / sqrt(chi2_3 / 3), so the arithmetic
is only + - * / sqrt, each correctly rounded by IEEE-754 and done elementwise in a
fixed order (no libm exp/log, no BLAS matmul, no reductions whose order could change
between NumPy versions or CPUs).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

# Official safetensors Dtype enum order (npmerge/dtypes.py `order`); the writer sorts
# tensors by it, descending, then by name ascending. Duplicated here on purpose so the
# generator does not import the package it is meant to test.
_DTYPE_ORDER = {
    name: i
    for i, name in enumerate(
        [
            "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3",
            "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16",
            "I32", "U32", "F32", "C64", "F64", "I64", "U64",
        ]
    )
}
_STORAGE = {
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("u1"),
}

# Seeds (one per fixture family); per-tensor streams are derived from these plus the
# CRC-32 of the tensor name, so adding a tensor never shifts the others' values.
SEED_LLAMA = 20240611
SEED_LLAMA_F32 = 20240612
SEED_INT = 20240613
SEED_TOKENIZER = 20240614

LLAMA = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
FINETUNES = ("ft-a", "ft-b", "ft-c")
# Signs of the shared low-rank directions (rank 4) in each fine-tune: every pair agrees
# on two directions and is opposed on the other two, which (with the own noise) is
# where the TIES sign conflicts come from.
SHARED_SIGNS = {
    "ft-a": (1.0, 1.0, 1.0, 1.0),
    "ft-b": (1.0, 1.0, -1.0, -1.0),
    "ft-c": (1.0, -1.0, 1.0, -1.0),
}
TRANSFORMERS_VERSION = "4.44.2"


# --------------------------------------------------------------------------- numbers


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Approximately standard normal (Irwin-Hall, n=12), float64, portable bits."""
    u = rng.random((12, *shape))
    acc = u[0].copy()
    for i in range(1, 12):
        acc += u[i]
    acc -= 6.0
    return acc


def _student_t3(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Heavy-tailed noise: Student-t with 3 degrees of freedom, clipped at +-20."""
    z = _normal(rng, shape)
    chi2 = np.zeros(shape)
    for _ in range(3):
        g = _normal(rng, shape)
        chi2 += g * g
    t = z / np.sqrt(chi2 / 3.0 + 1e-12)
    return np.clip(t, -20.0, 20.0)


def _low_rank(rng: np.random.Generator, shape: tuple[int, int], coeffs) -> np.ndarray:
    """sum_r coeffs[r] * u_r v_r^T / sqrt(R), entries of unit-ish scale (no BLAS)."""
    rows, cols = shape
    rank = len(coeffs)
    u = _normal(rng, (rank, rows))
    v = _normal(rng, (rank, cols))
    out = np.zeros(shape)
    for r in range(rank):
        out += coeffs[r] * np.multiply.outer(u[r], v[r])
    out *= 1.0 / np.sqrt(float(rank))
    return out


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16), round to nearest, ties to even.

    Pure integer arithmetic on the uint32 patterns; NaNs stay (quiet) NaNs, infinities
    stay infinite, finite values too large for BF16 round to +-inf as IEEE says.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> np.uint64(16)) & np.uint64(1)
    rounded = ((bits + np.uint64(0x7FFF) + lsb) >> np.uint64(16)).astype(np.uint16)
    is_nan = (bits & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
    quiet = ((bits >> np.uint64(16)) | np.uint64(0x0040)).astype(np.uint16)
    return np.where(is_nan, quiet, rounded).astype("<u2")


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ----------------------------------------------------------------------- safetensors


def _safetensors_bytes(tensors: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """Serialise {name: (dtype code, array)} exactly like the official writer.

    8-byte little-endian header length, compact JSON header with `__metadata__` first,
    tensors ordered by dtype (enum order, descending) then name, contiguous offsets in
    that order, header padded with spaces to a multiple of 8.
    """
    order = sorted(tensors, key=lambda n: (-_DTYPE_ORDER[tensors[n][0]], n))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    chunks = []
    offset = 0
    for name in order:
        code, arr = tensors[name]
        data = np.ascontiguousarray(arr, dtype=_STORAGE[code]).tobytes()
        header[name] = {
            "dtype": code,
            "shape": [int(s) for s in arr.shape],
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def _json(obj, *, sort_keys: bool = False) -> str:
    return json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------- llama


def llama_tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in HF LlamaForCausalLM state-dict order (untied lm_head)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q_out = cfg["num_attention_heads"] * hd
    kv_out = cfg["num_key_value_heads"] * hd
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (q_out, h)),
            (p + "self_attn.k_proj.weight", (kv_out, h)),
            (p + "self_attn.v_proj.weight", (kv_out, h)),
            (p + "self_attn.o_proj.weight", (h, q_out)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _base_value(seed: int, name: str, shape: tuple[int, ...], n_layers: int) -> np.ndarray:
    rng = _rng(seed, 0, _key(name))
    if len(shape) == 1:  # RMSNorm weights: around 1.0
        return 1.0 + 0.02 * _normal(rng, shape)
    std = 0.02
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std = 0.02 / np.sqrt(2.0 * n_layers)  # GPT-2 style residual-projection scaling
    return std * _normal(rng, shape)


def _deltas(seed: int, name: str, shape: tuple[int, ...], fts) -> dict[str, np.ndarray]:
    """Fine-tune deltas (float64) for one tensor, for every fine-tune in `fts`.

    delta_f = s * (0.7 C + 0.8 S_f + 0.35 L_f + 0.4 T_f) for matrices, where
      C   shared heavy-tailed dense pattern (same in every fine-tune: agreement),
      S_f shared rank-4 directions with per-fine-tune signs (SHARED_SIGNS: conflicts),
      L_f the fine-tune's own rank-2 update,
      T_f the fine-tune's own Student-t(3) noise (heavy tails, outliers),
    and s ~ 1e-3 absolute (~5% of the 0.02 weight scale, a few BF16 ulps).
    1-D norm weights get s = 6e-3 and only the C and T_f terms.
    """
    key = _key(name)
    shared = _rng(seed, 1, key)
    out: dict[str, np.ndarray] = {}
    if len(shape) == 1:
        common = _student_t3(shared, shape)
        for ft in fts:
            own = _rng(seed, 2 + FINETUNES.index(ft), key)
            out[ft] = 6e-3 * (0.5 * common + 0.6 * _student_t3(own, shape))
        return out

    common = _student_t3(shared, shape)
    # the shared directions are drawn once; each fine-tune combines them with its signs
    shared_state = shared.bit_generator.state
    scale = 1e-3
    row_scale = None
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        # token-frequency effect: rows of rarely seen (high-id) tokens move less
        ids = np.arange(shape[0], dtype=np.float64)
        row_scale = (1.0 / np.sqrt(1.0 + ids / 64.0))[:, None]
    for ft in fts:
        shared.bit_generator.state = shared_state
        s_f = _low_rank(shared, shape, SHARED_SIGNS[ft])
        own = _rng(seed, 2 + FINETUNES.index(ft), key)
        l_f = _low_rank(own, shape, (1.0, 0.7))
        t_f = _student_t3(own, shape)
        d = 0.7 * common + 0.8 * s_f + 0.35 * l_f + 0.4 * t_f
        d *= scale
        if row_scale is not None:
            d *= row_scale
        out[ft] = d
    return out


def llama_config(cfg: dict, torch_dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": cfg["head_dim"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": 128,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }


GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "transformers_version": TRANSFORMERS_VERSION,
}

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def tokenizer_vocab(size: int) -> list[str]:
    """`size` distinct tokens: 3 specials, a little punctuation, made-up words."""
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh"]
    vowels = ["a", "e", "i", "o"]
    syll = [o + v for o in onsets for v in vowels]  # 64
    two = [a + b for a in syll for b in syll]  # 4096
    tokens = list(SPECIAL_TOKENS) + [".", ",", "!", "?", "'", "-"] + syll
    need = size - len(tokens)
    perm = _rng(SEED_TOKENIZER).permutation(len(two))[:need]
    tokens += [two[int(i)] for i in perm]
    assert len(tokens) == size and len(set(tokens)) == size
    return tokens


def tokenizer_files(size: int) -> dict[str, str]:
    vocab = tokenizer_vocab(size)
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {tok: i for i, tok in enumerate(vocab)},
            "unk_token": "<unk>",
        },
    }
    tokenizer_config = {
        "added_tokens_decoder": {
            str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 128,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {
        "tokenizer.json": json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n",
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(special_map),
    }


def make_tiny_llama(out: Path) -> None:
    """fixtures/tiny-llama/{base,ft-a,ft-b,ft-c}: BF16, two shards + index each."""
    cfg = LLAMA
    specs = llama_tensor_specs(cfg)
    models: dict[str, dict[str, np.ndarray]] = {m: {} for m in ("base", *FINETUNES)}
    for name, shape in specs:
        base_bits = f32_to_bf16_bits(
            _base_value(SEED_LLAMA, name, shape, cfg["num_hidden_layers"]).astype(np.float32)
        )
        models["base"][name] = base_bits
        base32 = bf16_bits_to_f32(base_bits).astype(np.float64)
        for ft, d in _deltas(SEED_LLAMA, name, shape, FINETUNES).items():
            models[ft][name] = f32_to_bf16_bits((base32 + d).astype(np.float32))

    # shard 1: embeddings + first half of the layers; shard 2: the rest
    half = cfg["num_hidden_layers"] // 2
    first = {"model.embed_tokens.weight"} | {
        n for n, _ in specs if n.startswith(tuple(f"model.layers.{i}." for i in range(half)))
    }
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tok = tokenizer_files(cfg["vocab_size"])
    for model, tensors in models.items():
        d = out / "tiny-llama" / model
        shards: list[dict[str, tuple[str, np.ndarray]]] = [{}, {}]
        weight_map = {}
        total = 0
        for name, _ in specs:
            k = 0 if name in first else 1
            shards[k][name] = ("BF16", tensors[name])
            weight_map[name] = names[k]
            total += tensors[name].nbytes
        for fname, shard in zip(names, shards):
            _write(d / fname, _safetensors_bytes(shard))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write(d / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        _write(d / "config.json", _json(llama_config(cfg, "bfloat16"), sort_keys=True))
        _write(d / "generation_config.json", _json(GENERATION_CONFIG))
        for fname, text in tok.items():
            _write(d / fname, text)


def make_tiny_llama_f32(out: Path) -> None:
    """fixtures/tiny-llama-f32/{base,ft-a,ft-b}: F32, one model.safetensors each."""
    cfg = dict(LLAMA, vocab_size=256)
    specs = llama_tensor_specs(cfg)
    fts = FINETUNES[:2]
    models: dict[str, dict[str, tuple[str, np.ndarray]]] = {m: {} for m in ("base", *fts)}
    for name, shape in specs:
        base = _base_value(SEED_LLAMA_F32, name, shape, cfg["num_hidden_layers"])
        base32 = base.astype(np.float32)
        models["base"][name] = ("F32", base32)
        for ft, d in _deltas(SEED_LLAMA_F32, name, shape, fts).items():
            models[ft][name] = ("F32", (base32.astype(np.float64) + d).astype(np.float32))
    for model, tensors in models.items():
        d = out / "tiny-llama-f32" / model
        _write(d / "model.safetensors", _safetensors_bytes(tensors))
        _write(d / "config.json", _json(llama_config(cfg, "float32"), sort_keys=True))
        _write(d / "generation_config.json", _json(GENERATION_CONFIG))


def make_tiny_int(out: Path) -> None:
    """fixtures/tiny-int/{base,ft-a}: F32 weights + I64/BOOL buffers (identical)."""
    float_specs = [
        ("encoder.weight", (8, 16)),
        ("encoder.bias", (8,)),
        ("decoder.weight", (16, 8)),
        ("decoder.bias", (16,)),
    ]
    buffers = {
        "buffers.position_ids": ("I64", np.arange(16, dtype=np.int64).reshape(1, 16)),
        "buffers.mask": ("BOOL", np.array([1, 1, 0, 1], dtype=np.uint8)),
    }
    models: dict[str, dict[str, tuple[str, np.ndarray]]] = {"base": {}, "ft-a": {}}
    for name, shape in float_specs:
        base = (0.1 * _normal(_rng(SEED_INT, 0, _key(name)), shape)).astype(np.float32)
        delta = 1e-2 * _student_t3(_rng(SEED_INT, 2, _key(name)), shape)
        models["base"][name] = ("F32", base)
        models["ft-a"][name] = ("F32", (base.astype(np.float64) + delta).astype(np.float32))
    config = {
        "architectures": ["TinyIntModel"],
        "hidden_size": 8,
        "model_type": "tiny-int",
        "num_positions": 16,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
    }
    for model, tensors in models.items():
        d = out / "tiny-int" / model
        _write(d / "model.safetensors", _safetensors_bytes({**tensors, **buffers}))
        _write(d / "config.json", _json(config, sort_keys=True))


# --------------------------------------------------------------------------- README

"""The committed fixtures/ are reproducible, canonical safetensors, and realistic.

- regenerating with scripts/make_fixtures.py gives byte-identical files;
- the official library reads every file, and `safetensors.numpy.save_file` writes the
  very same bytes for the same tensors (our hand-written writer is canonical);
- indexes, configs and tokenizers are consistent with the tensors;
- fine-tune deltas have real sign conflicts, heavy tails and (in BF16) magnitude ties.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")  # registers bfloat16 with NumPy first
safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
SCRIPT = REPO / "scripts" / "make_fixtures.py"

LLAMA_MODELS = ("base", "ft-a", "ft-b", "ft-c")
F32_MODELS = ("base", "ft-a", "ft-b")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_fixtures", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_fixtures", mod)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()
import fixtures_base  # noqa: E402  (the generator's helpers: make_fixtures put scripts/ on sys.path)


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _all_safetensors() -> list[Path]:
    return sorted(FIXTURES.rglob("*.safetensors"))


def _raw_header(path: Path) -> tuple[dict, int]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), 8 + n


def _load(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a model dir via the official reader (BF16 as ml_dtypes)."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "numpy") as h:
            for k in h.keys():
                assert k not in out, f"{k} in more than one shard of {model_dir}"
                out[k] = h.get_tensor(k)
    return out


def _load_f32(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in _load(model_dir).items()}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    gen.generate(out)
    return out


# ----------------------------------------------------------------- reproducibility


def test_committed_fixtures_exist():
    assert FIXTURES.is_dir(), "run: python scripts/make_fixtures.py"
    files = _files(FIXTURES)
    assert "README.md" in files
    for m in LLAMA_MODELS:
        for f in (*SHARDS, "model.safetensors.index.json", "config.json", *TOKENIZER_FILES):
            assert f"tiny-llama/{m}/{f}" in files
    for m in F32_MODELS:
        assert f"tiny-llama-f32/{m}/model.safetensors" in files
        assert f"tiny-llama-f32/{m}/config.json" in files
    for m in ("base", "ft-a"):
        assert f"tiny-int/{m}/model.safetensors" in files
        assert f"tiny-int/{m}/config.json" in files


def test_regeneration_is_byte_identical(regenerated):
    committed, fresh = _files(FIXTURES), _files(regenerated)
    assert sorted(committed) == sorted(fresh)
    differing = [rel for rel in committed if committed[rel].read_bytes() != fresh[rel].read_bytes()]
    assert not differing, f"regenerated files differ: {differing}"


def test_total_size_is_small():
    total = sum(p.stat().st_size for p in _files(FIXTURES).values())
    assert total < 8 * 1024 * 1024, total


def test_bf16_rounding_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(20000).astype(np.float32) * np.float32(0.02),
            rng.standard_normal(2000).astype(np.float32) * np.float32(1e30),
            # exact ties between two BF16 values (low half 0x8000), both parities
            (np.arange(0x3F800000, 0x3F800000 + 64 * 0x10000, 0x10000, dtype=np.uint32) + 0x8000).view(np.float32),
            np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.3895314e38, 1e-40, -1e-45], np.float32),
            np.array([0x7F7FFFFF, 0x00008000, 0x00018000, 0x80007FFF], np.uint32).view(np.float32),
        ]
    )
    ours = fixtures_base.f32_to_bf16_bits(x)
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(ours, ref)
    nan = np.array([np.nan, -np.nan], np.float32)
    back = fixtures_base.bf16_bits_to_f32(fixtures_base.f32_to_bf16_bits(nan))
    assert np.isnan(back).all()
    np.testing.assert_array_equal(fixtures_base.bf16_bits_to_f32(ours[:100]), ref[:100].view(ml_dtypes.bfloat16).astype(np.float32))


# ---------------------------------------------------------------- canonical format


@pytest.mark.parametrize("path", _all_safetensors(), ids=lambda p: p.relative_to(FIXTURES).as_posix())
def test_official_reader_and_writer_agree(path, tmp_path):
    header, data_start = _raw_header(path)
    raw = path.read_bytes()
    assert header["__metadata__"] == {"format": "pt"}
    assert data_start % 8 == 0
    tensors = {}
    with safe_open(path, "numpy") as h:
        assert h.metadata() == {"format": "pt"}
        assert sorted(h.keys()) == sorted(k for k in header if k != "__metadata__")
        for k in h.keys():
            t = h.get_tensor(k)
            info = header[k]
            assert list(t.shape) == info["shape"]
            assert h.get_slice(k).get_dtype() == info["dtype"]
            begin, end = info["data_offsets"]
            assert t.tobytes() == raw[data_start + begin : data_start + end]
            tensors[k] = t
    expected_dtypes = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "I64": np.int64, "BOOL": np.bool_}
    for k, t in tensors.items():
        assert t.dtype == np.dtype(expected_dtypes[header[k]["dtype"]]), k
    out = tmp_path / "official.safetensors"
    save_file(tensors, out, metadata={"format": "pt"})
    assert out.read_bytes() == raw


# ------------------------------------------------------------ index/config/tokenizer


@pytest.mark.parametrize("model", LLAMA_MODELS)
def test_index_is_consistent(model):
    d = FIXTURES / "tiny-llama" / model
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    weight_map = index["weight_map"]
    cfg = json.loads((d / "config.json").read_text())
    natural = [n for n, _ in fixtures_base.llama_tensor_specs(cfg)]
    assert list(weight_map) == natural  # natural state-dict order
    assert set(weight_map.values()) == set(SHARDS)
    seen: dict[str, str] = {}
    total = 0
    for shard in SHARDS:
        header, _ = _raw_header(d / shard)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            assert name not in seen, f"{name} in {seen.get(name)} and {shard}"
            seen[name] = shard
            begin, end = info["data_offsets"]
            total += end - begin
            assert info["dtype"] == "BF16"
    assert seen == weight_map  # every tensor in exactly the shard the index says
    assert index["metadata"]["total_size"] == total


def _check_llama_shapes(cfg: dict, tensors: dict[str, np.ndarray]) -> None:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    assert hd * cfg["num_attention_heads"] == h
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    kv = cfg["num_key_value_heads"] * hd
    expected = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    assert {k: t.shape for k, t in tensors.items()} == expected


@pytest.mark.parametrize(
    "family,model,dtype,vocab",
    [("tiny-llama", m, "bfloat16", 1024) for m in LLAMA_MODELS]
    + [("tiny-llama-f32", m, "float32", 256) for m in F32_MODELS],
)
def test_config_matches_tensors(family, model, dtype, vocab):
    d = FIXTURES / family / model
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == dtype
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (vocab, 64, 192)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 4, 2)
    assert cfg["head_dim"] == 16 and cfg["max_position_embeddings"] == 128
    tensors = _load(d)
    _check_llama_shapes(cfg, tensors)
    want = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    assert all(t.dtype == np.dtype(want) for t in tensors.values())
    gc = json.loads((d / "generation_config.json").read_text())
    assert (gc["bos_token_id"], gc["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])


@pytest.mark.parametrize("model", LLAMA_MODELS)
def test_tokenizer_files(model):
    d = FIXTURES / "tiny-llama" / model
    cfg = json.loads((d / "config.json").read_text())
    tok = json.loads((d / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "WordLevel"
    assert tok["pre_tokenizer"] == {"type": "Whitespace"}
    vocab = tok["model"]["vocab"]
    assert len(vocab) == cfg["vocab_size"]
    assert sorted(vocab.values()) == list(range(cfg["vocab_size"]))
    assert tok["model"]["unk_token"] in vocab
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert all(vocab[c] == i for c, i in added.items())
    tc = json.loads((d / "tokenizer_config.json").read_text())
    stm = json.loads((d / "special_tokens_map.json").read_text())
    assert vocab[tc["bos_token"]] == cfg["bos_token_id"] == vocab[stm["bos_token"]]
    assert vocab[tc["eos_token"]] == cfg["eos_token_id"] == vocab[stm["eos_token"]]
    for f in TOKENIZER_FILES:  # identical across the family
        assert (d / f).read_bytes() == (FIXTURES / "tiny-llama" / "base" / f).read_bytes()


def test_tiny_int_buffers_identical():
    base, ft = _load(FIXTURES / "tiny-int" / "base"), _load(FIXTURES / "tiny-int" / "ft-a")
    assert set(base) == set(ft)
    pos, mask = base["buffers.position_ids"], base["buffers.mask"]
    assert pos.dtype == np.int64 and pos.shape == (1, 16)
    np.testing.assert_array_equal(pos, np.arange(16).reshape(1, 16))
    assert mask.dtype == np.bool_ and mask.shape == (4,)
    np.testing.assert_array_equal(ft["buffers.position_ids"], pos)
    np.testing.assert_array_equal(ft["buffers.mask"], mask)
    floats = [k for k, t in base.items() if t.dtype == np.float32]
    assert len(floats) == 4
    for k in floats:
        assert ft[k].dtype == np.float32 and not np.array_equal(ft[k], base[k]), k
    cfg = json.loads((FIXTURES / "tiny-int" / "base" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32"


# ------------------------------------------------------------------------- realism


def _deltas(family: str, models) -> dict[str, dict[str, np.ndarray]]:
    base = _load_f32(FIXTURES / family / "base")
    out = {}
    for m in models:
        ft = _load_f32(FIXTURES / family / m)
        out[m] = {k: ft[k] - base[k] for k in base}
    return out


def _big_matrices(tensors: dict[str, np.ndarray]) -> list[str]:
    return [k for k, t in tensors.items() if t.ndim == 2 and t.size >= 2048]


def _conflict(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sign(a) * np.sign(b) < 0))


@pytest.mark.parametrize(
    "family,pairs",
    [
        ("tiny-llama", [("ft-a", "ft-b"), ("ft-a", "ft-c"), ("ft-b", "ft-c")]),
        ("tiny-llama-f32", [("ft-a", "ft-b")]),
    ],
)
def test_sign_conflicts_between_finetunes(family, pairs):
    models = sorted({m for p in pairs for m in p})
    deltas = _deltas(family, models)
    names = _big_matrices(deltas[models[0]])
    assert len(names) == 16
    for x, y in pairs:
        for k in names:
            frac = _conflict(deltas[x][k], deltas[y][k])
            assert 0.1 <= frac <= 0.6, (family, x, y, k, frac)


def _ties_at_density(delta: np.ndarray, density: float) -> int:
    mag = np.abs(delta).ravel()
    k = max(1, int(density * mag.size))
    threshold = np.partition(mag, mag.size - k)[mag.size - k]  # k-th largest
    return int(np.count_nonzero(mag == threshold))


def test_bf16_deltas_tie_at_the_density_threshold():
    deltas = _deltas("tiny-llama", ["ft-a"])["ft-a"]
    ties = {k: _ties_at_density(d, 0.2) for k, d in deltas.items()}
    assert max(ties.values()) >= 10, ties
    assert ties["model.embed_tokens.weight"] >= 10
    # at least half the big matrices have a tied threshold at all
    assert sum(ties[k] >= 2 for k in _big_matrices(deltas)) >= 8, ties


@pytest.mark.parametrize("family,model", [("tiny-llama", "ft-a"), ("tiny-llama-f32", "ft-a")])
def test_deltas_small_dense_heavy_tailed(family, model):
    base = _load_f32(FIXTURES / family / "base")
    deltas = _deltas(family, [model])[model]
    for k in _big_matrices(deltas):
        d = deltas[k].astype(np.float64)
        assert np.mean(d == 0) < 0.15, k  # fine-tuning touches nearly everything
        ratio = d.std() / base[k].astype(np.float64).std()
        assert 0.02 < ratio < 0.3, (k, ratio)  # small relative to the weights
        kurtosis = np.mean((d - d.mean()) ** 4) / d.var() ** 2
        assert kurtosis > 4.0, (k, kurtosis)  # heavier tails than a Gaussian (3)


def _top_energy(m: np.ndarray, r: int = 6) -> float:
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    return float(np.sum(s[:r] ** 2) / np.sum(s**2))


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-llama-f32"])
def test_deltas_have_low_rank_structure(family):
    """The top singular directions carry clearly more energy than for the same entries
    shuffled (which keeps the heavy-tailed marginal but destroys the low-rank part)."""
    deltas = _deltas(family, ["ft-a"])["ft-a"]
    rng = np.random.default_rng(0)
    ratios = {}
    for k in _big_matrices(deltas):
        d = deltas[k]
        if min(d.shape) < 64:  # k/v_proj [32, 64]: too few singular values to tell
            continue
        shuffled = rng.permutation(d.ravel()).reshape(d.shape)
        ratios[k] = _top_energy(d) / _top_energy(shuffled)
    assert len(ratios) == 12
    assert min(ratios.values()) > 1.2, ratios
    assert float(np.median(list(ratios.values()))) > 1.5, ratios


def test_generator_dtype_order_matches_package():
    """The generator duplicates the official enum order; keep it in step with npmerge."""
    from npmerge.dtypes import DTYPES

    assert {n: d.order for n, d in DTYPES.items()} == fixtures_base._DTYPE_ORDER

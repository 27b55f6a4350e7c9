"""PEFT LoRA adapters as task vectors: npmerge/io/lora.py and npmerge/kernels/lora.py.

The fixtures (fixtures/tiny-lora, scripts/fixtures_lora.py) are read here with the
official `safetensors` library (BF16 through ml_dtypes), and every expectation is
written out from PEFT's conventions independently of the module under test:

- float64 reference: base + scale * (B @ A) (transposed for Conv1D / embeddings),
  replacement tensors as they are; outputs within 1e-6 relative L2 per tensor;
- bitwise: a NumPy re-implementation of the kernel's definition (float64 products and
  sums in increasing j from +0.0, times the float64 scale, one rounding to float32);
- read_delta over arbitrary splits of a tensor equals one whole read, bit for bit, and
  so do runs with NUMBA_NUM_THREADS=1 and 2;
- bad adapters fail with the right error class and a message naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import numpy as np
import pytest

from helpers import FIXTURES, LLAMA, LLAMA_F32, load_model
from npmerge import kernels, workers
from npmerge.errors import IncompatibleModels, InvalidCheckpoint
from npmerge.io.checkpoint import Checkpoint
from npmerge.io.lora import LoraAdapter, is_lora_adapter

from safetensors.numpy import save_file  # noqa: E402  (after helpers: ml_dtypes registered)

LORA = FIXTURES / "tiny-lora"
GPT2_BASE = LORA / "tiny-gpt2" / "base"
PREFIX = "base_model.model."


# ------------------------------------------------------------------ references


def adapter_tensors(d) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 (official reader), keys without the PEFT prefix."""
    raw = load_model(d / "adapter_model.safetensors")
    assert all(k.startswith(PREFIX) for k in raw)
    return {k[len(PREFIX):]: v.astype(np.float32) for k, v in raw.items()}


def base_f32(d) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in load_model(d).items()}


def exact_tau(a32, b32, scale, transposed) -> np.ndarray:
    """The kernel's definition in plain NumPy (no matmul): bitwise reference."""
    acc = np.zeros((b32.shape[0], a32.shape[1]), np.float64)  # +0.0
    for j in range(a32.shape[0]):
        acc += np.multiply.outer(b32[:, j].astype(np.float64), a32[j].astype(np.float64))
    tau = (np.float64(scale) * acc).astype(np.float32)
    return tau.T if transposed else tau


def tau64(a32, b32, scale, transposed) -> np.ndarray:
    d = scale * (b32.astype(np.float64) @ a32.astype(np.float64))
    return d.T if transposed else d


def read_all(target, base=None) -> np.ndarray:
    out = np.full(target.numel, np.nan, np.float32)
    target.read_delta(0, target.numel, out, None if base is None else base.ravel())
    return out.reshape(target.shape)


def rel_l2(x, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / max(np.linalg.norm(ref), 1e-300))


def same_bits(x, y) -> bool:
    return x.shape == y.shape and np.array_equal(np.ascontiguousarray(x).view(np.uint32),
                                                 np.ascontiguousarray(y).view(np.uint32))


def opened(d, base_dir):
    ad = LoraAdapter(d)
    base = Checkpoint(base_dir)
    ad.check_against({k: r.info.shape for k, r in base.tensors.items()})
    return ad


def check_lowrank(ad, base, tensors, module, scale, transposed, embedding=False):
    """The target of `module`: bitwise vs exact_tau, outputs within 1e-6 of float64."""
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    a, b = tensors[f"{module}.{a_key}"], tensors[f"{module}.{b_key}"]
    t = ad.targets[module + ".weight"]
    assert (t.rank, t.transposed, t.embedding) == (a.shape[0], transposed, embedding)
    assert t.scale == scale
    got = read_all(t, base[t.name])
    assert same_bits(got, exact_tau(a, b, scale, transposed)), module
    assert rel_l2(got, tau64(a, b, scale, transposed)) < 1e-6
    merged = base[t.name] + got  # base + tau, as task arithmetic with weight 1 writes it
    assert rel_l2(merged, base[t.name].astype(np.float64) + tau64(a, b, scale, transposed)) < 1e-6
    return got


LLAMA_MODULES = [f"model.layers.{i}.{k}" for i in range(2) for k in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


# ---------------------------------------------------------------------- kernel


@pytest.mark.parametrize("rows,r,cols", [(1, 1, 1), (7, 3, 5), (33, 8, 64), (5, 13, 2500), (40, 16, 1030)])
def test_kernel_matches_numpy_definition_bitwise(rows, r, cols):
    """Random factors with zeros, -0.0, subnormals and wide exponents; r not a multiple
    of 4 (the kernel's tail) and rows wider than its 1024-column block."""
    from npmerge import kernels

    rng = np.random.default_rng(rows * 1000 + r)
    left = (rng.standard_normal((rows, r)) * np.exp2(rng.integers(-30, 30, (rows, r)))).astype(np.float32)
    right = (rng.standard_normal((r, cols)) * np.exp2(rng.integers(-30, 30, (r, cols)))).astype(np.float32)
    left.flat[::7] = 0.0
    right.flat[::11] = -0.0
    right.flat[3::13] = np.float32(1e-42)
    scale = 16 / math.sqrt(r)
    want = exact_tau(right, left, scale, False).ravel()  # left plays B, right plays A
    got = np.empty(rows * cols, np.float32)
    kernels.load("lora").lowrank_rows(left, right, scale, 0, got, 0, left.shape[0])
    assert same_bits(got, want)


# -------------------------------------------------------------- adapter kinds


def test_plain_lora_q_v_f32():
    d = LORA / "tiny-llama" / "qv-f32"
    ad, base, tensors = opened(d, LLAMA / "base"), base_f32(LLAMA / "base"), adapter_tensors(d)
    qv = [m for m in LLAMA_MODULES if m.endswith(("q_proj", "v_proj"))]
    assert list(ad.targets) == sorted(m + ".weight" for m in qv)
    for m in qv:
        check_lowrank(ad, base, tensors, m, 16 / 8, False)
    assert all(not t.needs_base for t in ad.targets.values())


def test_rslora_with_rank_and_alpha_patterns():
    """Hand-resolved from the config (see fixtures/tiny-lora/README.md): rank_pattern
    {"k_proj": 6, "model.layers.0.self_attn.q_proj": 2, "q_proj": 4}, alpha_pattern
    {"model\\.layers\\.1\\..*": 8, "v_proj": 32}, r 8, alpha 16, scale alpha / sqrt(r)."""
    d = LORA / "tiny-llama" / "rslora-patterns"
    ad, base, tensors = opened(d, LLAMA / "base"), base_f32(LLAMA / "base"), adapter_tensors(d)
    want = {  # (layer, proj): (r, alpha)
        (0, "q_proj"): (2, 16), (1, "q_proj"): (4, 8),
        (0, "k_proj"): (6, 16), (1, "k_proj"): (6, 8),
        (0, "v_proj"): (8, 32), (1, "v_proj"): (8, 8),  # layer 1: the earlier alpha key wins
        (0, "o_proj"): (8, 16), (1, "o_proj"): (8, 8),
    }
    assert len(ad.targets) == len(want)
    for (i, proj), (r, alpha) in want.items():
        m = f"model.layers.{i}.self_attn.{proj}"
        assert ad.targets[m + ".weight"].rank == r
        check_lowrank(ad, base, tensors, m, alpha / math.sqrt(r), False)
    s = ad.summary()
    assert (s["type"], s["r"], s["lora_alpha"], s["use_rslora"]) == ("rsLoRA", 8, 16, True)
    assert s["scale"] == 16 / math.sqrt(8) and s["ranks"] == [2, 4, 6, 8]


def test_bf16_adapter_on_all_linear_layers():
    d = LORA / "tiny-llama" / "all-linear-bf16"
    ad, base, tensors = opened(d, LLAMA / "base"), base_f32(LLAMA / "base"), adapter_tensors(d)
    assert {t.a.info.dtype.name for t in ad.targets.values()} == {"BF16"}
    assert list(ad.targets) == sorted(m + ".weight" for m in LLAMA_MODULES)
    for m in LLAMA_MODULES:
        check_lowrank(ad, base, tensors, m, 8 / 4, False)


def test_modules_to_save_lm_head_is_a_replacement():
    d = LORA / "tiny-llama" / "lm-head-save"
    ad, base, tensors = opened(d, LLAMA / "base"), base_f32(LLAMA / "base"), adapter_tensors(d)
    head = ad.targets["lm_head.weight"]
    assert head.needs_base and head.a is None and head.kind == "replacement"
    with pytest.raises(ValueError, match="base"):
        head.read_delta(0, 4, np.empty(4, np.float32))
    got = read_all(head, base["lm_head.weight"])
    assert same_bits(got, tensors["lm_head.weight"] - base["lm_head.weight"])
    assert rel_l2(base["lm_head.weight"] + got, tensors["lm_head.weight"]) < 1e-6
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        check_lowrank(ad, base, tensors, m, 4 / 4, False)
    assert "model.embed_tokens.weight" not in ad.targets  # untouched tensors: tau = 0, the engine's job


def test_fan_in_fan_out_conv1d_with_bias_all_and_modules_to_save():
    d = LORA / "tiny-gpt2" / "conv1d-bias-all"
    ad, base, tensors = opened(d, GPT2_BASE), base_f32(GPT2_BASE), adapter_tensors(d)
    conv = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    replaced = ([f"{m}.bias" for m in conv] + [f"transformer.h.{i}.ln_{k}.bias" for i in range(2) for k in (1, 2)]
                + ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    assert sorted(ad.targets) == sorted([m + ".weight" for m in conv] + replaced)
    for m in conv:  # Conv1D weights are [in, out]: the change is (B @ A)^T, the square c_proj too
        got = check_lowrank(ad, base, tensors, m, 8 / 4, True)
        assert got.shape == base[m + ".weight"].shape
    for name in replaced:  # wrapped layers save '<module>.base_layer.bias'
        key = name.replace(".bias", ".base_layer.bias") if name.rpartition(".")[0] in conv else name
        got = read_all(ad.targets[name], base[name])
        assert same_bits(got, tensors[key] - base[name]), name


def test_embedding_lora_and_lora_bias():
    d = LORA / "tiny-gpt2" / "embedding-lora-bias"
    ad, base, tensors = opened(d, GPT2_BASE), base_f32(GPT2_BASE), adapter_tensors(d)
    wte = ad.targets["transformer.wte.weight"]
    assert wte.needs_base and wte.embedding  # the saved base_layer copy plus the low-rank change
    assert same_bits(tensors["transformer.wte.base_layer.weight"], base["transformer.wte.weight"])
    check_lowrank(ad, base, tensors, "transformer.wte", 4 / 4, True, embedding=True)
    for i in range(2):
        m = f"transformer.h.{i}.mlp.c_fc"
        check_lowrank(ad, base, tensors, m, 4 / 4, True)
        bias = ad.targets[m + ".bias"]
        assert not bias.needs_base and bias.kind == "lora bias"
        b = tensors[m + ".lora_B.bias"]
        got = read_all(bias)
        assert same_bits(got, (np.float64(1.0) * b.astype(np.float64)).astype(np.float32))
        assert rel_l2(base[m + ".bias"] + got, base[m + ".bias"].astype(np.float64) + b) < 1e-6


def test_several_adapters_merged_as_task_vectors():
    """base + sum_i w_i * scale_i * B_i @ A_i for two Llama adapters, within 1e-6 of float64."""
    base = base_f32(LLAMA / "base")
    adapters = [(LORA / "tiny-llama" / "qv-f32", 0.6, 2.0), (LORA / "tiny-llama" / "all-linear-bf16", 0.4, 2.0)]
    loaded = [(opened(d, LLAMA / "base"), adapter_tensors(d), w, s) for d, w, s in adapters]
    for m in LLAMA_MODULES:
        name = m + ".weight"
        got = base[name].astype(np.float32).copy()
        want = base[name].astype(np.float64)
        for ad, tensors, w, s in loaded:
            if name in ad.targets:
                got += np.float32(w) * read_all(ad.targets[name])
                want = want + w * tau64(tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"], s, False)
        assert rel_l2(got, want) < 1e-6, name


def test_orientation_follows_the_layer_type_like_peft(tmp_path):
    """PEFT decides fan_in_fan_out per layer type (Conv1D true, Linear false) whatever the
    config says: known from config.json's model_type; without one, a non-square weight
    shows its layer type and a square one keeps the config's flag."""
    shapes = {k: r.info.shape for k, r in Checkpoint(GPT2_BASE).tensors.items()}
    ad = LoraAdapter(copy_adapter(tmp_path, "tiny-gpt2/conv1d-bias-all", fan_in_fan_out=False))
    assert not ad.targets["transformer.h.0.attn.c_attn.weight"].transposed
    notes = ad.check_against(shapes, "gpt2")
    assert all(ad.targets[f"transformer.h.{i}.{m}.weight"].transposed
               for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert len(notes) == 1 and "fan_in_fan_out: false, but transformer.h.0.attn.c_attn" in notes[0]
    ad = LoraAdapter(copy_adapter(tmp_path / "2", "tiny-gpt2/conv1d-bias-all", fan_in_fan_out=False))
    assert ad.check_against(shapes) == [  # no model_type: the shapes decide the non-square ones
        f"adapter '{ad.path}': adapter_config.json says fan_in_fan_out: false, but transformer.h.0.attn.c_attn, "
        "transformer.h.0.mlp.c_fc, transformer.h.0.mlp.c_proj, transformer.h.1.attn.c_attn and 2 more are Conv1D "
        "layers: applied as (B @ A)^T, as PEFT does"]
    assert ad.targets["transformer.h.0.attn.c_attn.weight"].transposed  # [32, 96] only fits (B @ A)^T
    assert not ad.targets["transformer.h.0.attn.c_proj.weight"].transposed  # square: the config decides
    ad = LoraAdapter(LORA / "tiny-gpt2" / "conv1d-bias-all")
    assert ad.check_against(shapes, "gpt2") == []  # as saved: nothing to say


def test_summary_for_info():
    s = LoraAdapter(LORA / "tiny-llama" / "lm-head-save").summary()
    assert s["type"] == "LoRA" and (s["r"], s["lora_alpha"], s["scale"], s["use_rslora"]) == (4, 4, 1.0, False)
    assert s["target_modules"] == ["q_proj", "v_proj"] and s["modules_to_save"] == ["lm_head"]
    assert s["replaced_tensors"] == ["lm_head.weight"]
    assert s["base_model_name_or_path"] == "fixtures/tiny-llama/base"
    assert s["adapted_modules"] == sorted(m for m in LLAMA_MODULES if m.endswith(("q_proj", "v_proj")))
    json.dumps(s)  # JSON-ready for `npmerge info --json`
    assert is_lora_adapter(LORA / "tiny-llama" / "qv-f32") and not is_lora_adapter(LLAMA / "base")


# --------------------------------------------------------- determinism, splits


def all_targets():
    out = []
    for d, base_dir in [(LORA / "tiny-llama" / n, LLAMA / "base") for n in
                        ("qv-f32", "rslora-patterns", "all-linear-bf16", "lm-head-save")] + [
            (LORA / "tiny-gpt2" / n, GPT2_BASE) for n in ("conv1d-bias-all", "embedding-lora-bias")]:
        ad = opened(d, base_dir)
        out += [(d.name, t) for t in ad.targets.values()]
    return out


def test_read_delta_over_any_split_equals_one_read():
    rng = np.random.default_rng(7)
    for label, t in all_targets():
        base = rng.standard_normal(t.numel).astype(np.float32) if t.needs_base else None
        whole = np.empty(t.numel, np.float32)
        t.read_delta(0, t.numel, whole, base)
        for _ in range(6):
            cuts = np.unique(np.concatenate([[0, t.numel], rng.integers(0, t.numel + 1, rng.integers(1, 9))]))
            pieces = []
            for s, e in zip(cuts[:-1], cuts[1:]):
                out = np.full(e - s, np.nan, np.float32)
                t.read_delta(int(s), int(e - s), out, None if base is None else base[s:e])
                pieces.append(out)
            assert same_bits(np.concatenate(pieces), whole), (label, t.name, cuts)
        t.read_delta(3, 0, np.empty(0, np.float32), None if base is None else base[:0])


def _digest() -> str:
    h = hashlib.sha256()
    for label, t in all_targets():
        base = np.linspace(-1, 1, t.numel, dtype=np.float32) if t.needs_base else None
        out = np.empty(t.numel, np.float32)
        t.read_delta(0, t.numel, out, base)
        h.update(out.tobytes())
    rng = np.random.default_rng(3)
    left, right = rng.standard_normal((300, 13)).astype(np.float32), rng.standard_normal((13, 2100)).astype(np.float32)
    out = np.empty(300 * 2100 - 5, np.float32)
    kernels.load("lora").lowrank_rows(left, right, 0.7, 5, out, 0, 300)
    h.update(out.tobytes())
    return h.hexdigest()


def test_same_bytes_with_one_and_two_threads():
    """The products split their rows among the running merge's threads: the same bytes
    with 1, 2 or 3 of them."""
    digests = set()
    for threads in (1, 2, 3):
        pool = workers.Workers(threads)
        workers.activate(pool)
        try:
            digests.add(_digest())
        finally:
            workers.activate(None)
            pool.close()
    assert len(digests) == 1


# ----------------------------------------------------------------- bad adapters


def copy_adapter(tmp_path, name="tiny-llama/qv-f32", **config):
    d = tmp_path / "adapter"
    shutil.copytree(LORA / name, d)
    if config:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def rewrite_tensors(d, edit):
    tensors = load_model(d / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_pickle_adapter_is_refused_with_the_convert_hint(tmp_path):
    d = copy_adapter(tmp_path)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(InvalidCheckpoint, match="adapter_model.bin") as err:
        LoraAdapter(d)
    assert "pickle" in err.value.message and "safe_serialization=True" in err.value.hint
    assert str(d) in err.value.message


@pytest.mark.parametrize("how", ["config", "key"])
def test_dora_is_refused_and_says_why(tmp_path, how):
    if how == "config":
        d = copy_adapter(tmp_path, use_dora=True)
    else:
        d = copy_adapter(tmp_path)
        rewrite_tensors(d, lambda t: t.update({PREFIX + "model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                               np.ones(64, np.float32)}))
    with pytest.raises(InvalidCheckpoint, match="DoRA") as err:
        LoraAdapter(d)
    assert "magnitude" in err.value.message and "merge_and_unload" in err.value.hint


def test_shape_mismatch_names_module_and_both_shapes_before_reading_data():
    ad = LoraAdapter(LORA / "tiny-llama" / "lm-head-save")
    f32_base = Checkpoint(LLAMA_F32 / "base")  # vocab 256, not 1024
    with pytest.raises(IncompatibleModels) as err:
        ad.check_against({k: r.info.shape for k, r in f32_base.tensors.items()})
    msg = err.value.message
    assert "'lm_head'" in msg and "[1024, 64]" in msg and "[256, 64]" in msg
    assert "fixtures/tiny-llama/base" in err.value.hint  # the base the adapter names
    assert ad.file._raw is None  # nothing was mapped, let alone read

    ad = LoraAdapter(LORA / "tiny-llama" / "qv-f32")
    shapes = {k: r.info.shape for k, r in Checkpoint(LLAMA / "base").tensors.items()}
    shapes["model.layers.1.self_attn.v_proj.weight"] = (32, 48)
    with pytest.raises(IncompatibleModels) as err:
        ad.check_against(shapes)
    msg = err.value.message
    assert "'model.layers.1.self_attn.v_proj'" in msg
    assert "lora_B [32, 8] x lora_A [8, 64] = [32, 64]" in msg and "[32, 48]" in msg


def test_target_missing_in_base():
    ad = LoraAdapter(LORA / "tiny-llama" / "qv-f32")
    shapes = {k: r.info.shape for k, r in Checkpoint(FIXTURES / "tiny-int" / "base").tensors.items()}
    with pytest.raises(IncompatibleModels, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*3 more"):
        ad.check_against(shapes)

    ad = LoraAdapter(LORA / "tiny-gpt2" / "embedding-lora-bias")  # lora_bias into a layer without bias
    shapes = {k: r.info.shape for k, r in Checkpoint(GPT2_BASE).tensors.items()
              if k != "transformer.h.0.mlp.c_fc.bias"}
    with pytest.raises(IncompatibleModels, match=r"c_fc\.bias.*lora_bias"):
        ad.check_against(shapes)


@pytest.mark.parametrize("text,phrase", [
    ("{not json", "invalid adapter_config.json"),
    ("[1, 2]", "not a JSON object"),
    ('{"peft_type": "LORA", "r": "8"}', "r must be a positive integer"),
    ('{"peft_type": "LORA", "r": 0}', "r must be a positive integer"),
    ('{"peft_type": "LORA", "lora_alpha": null}', "lora_alpha must be a number"),
    ('{"peft_type": "LORA", "bias": "some"}', "bias must be"),
    ('{"peft_type": "LORA", "use_rslora": "yes"}', "use_rslora must be true or false"),
    ('{"peft_type": "LORA", "rank_pattern": {"q_proj(": 4}}', "not a valid regular expression"),
    ('{"peft_type": "LORA", "alpha_pattern": [1]}', "alpha_pattern must be an object"),
    ('{"r": 8}', "no peft_type"),
])
def test_malformed_adapter_config(tmp_path, text, phrase):
    d = copy_adapter(tmp_path)
    (d / "adapter_config.json").write_text(text)
    with pytest.raises(InvalidCheckpoint, match=phrase) as err:
        LoraAdapter(d)
    assert str(d) in err.value.message


def test_missing_config_and_not_a_directory(tmp_path):
    d = copy_adapter(tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(InvalidCheckpoint, match="no adapter_config.json"):
        LoraAdapter(d)
    with pytest.raises(InvalidCheckpoint, match="not a directory"):
        LoraAdapter(d / "adapter_model.safetensors")


@pytest.mark.parametrize("config,phrase", [
    ({"peft_type": "PROMPT_TUNING"}, "peft_type 'PROMPT_TUNING'"),
    ({"peft_type": "IA3"}, "LoRA adapters .peft_type LORA. only"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
    ({"init_lora_weights": "loftq"}, "modified base weights"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"alora_invocation_tokens": [5]}, "activated LoRA"),
])
def test_other_peft_types_and_features_refused(tmp_path, config, phrase):
    with pytest.raises(InvalidCheckpoint, match=phrase):
        LoraAdapter(copy_adapter(tmp_path, **config))


Q0 = PREFIX + "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,config,phrase", [
    (lambda t: t.pop(Q0 + ".lora_B.weight"), {}, "q_proj' has lora_A but no lora_B"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), np.float32)}), {},
     "not a PEFT LoRA key"),
    (lambda t: t.update({Q0 + ".lora_A.default.weight": np.zeros((8, 64), np.float32)}), {}, "unexpected tensor"),
    (lambda t: t.update({Q0 + ".lora_A.weight": t[Q0 + ".lora_A.weight"].astype(np.float64)}), {},
     "dtype F64; LoRA factors"),
    (lambda t: t.update({Q0 + ".lora_A.weight": np.zeros((8, 64, 1, 1), np.float32)}), {}, "convolution LoRA"),
    (lambda t: t.update({Q0 + ".lora_B.weight": np.zeros((64, 4), np.float32)}), {}, "does not fit"),
    (lambda t: None, {"r": 4}, "has rank 8 .* gives r = 4"),
    (lambda t: t.update({Q0 + ".lora_B.bias": np.zeros(64, np.float32)}), {}, "lora_bias false"),
])
def test_bad_adapter_tensors(tmp_path, edit, config, phrase):
    d = copy_adapter(tmp_path, **config)
    rewrite_tensors(d, edit)
    with pytest.raises(InvalidCheckpoint, match=phrase):
        LoraAdapter(d)


def test_reads_are_bounded_by_work_bytes(tmp_path):
    """A read touches only its rows: scratch memory (traced NumPy allocations) stays
    under work_bytes(n), far below the tensor, for plain, Conv1D-style and embedding LoRA."""
    import tracemalloc

    rng = np.random.default_rng(5)
    d = tmp_path / "big"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    save_file({PREFIX + "lin.lora_A.weight": f(16, 700), PREFIX + "lin.lora_B.weight": f(900, 16),
               PREFIX + "emb.lora_embedding_A": f(16, 5000), PREFIX + "emb.lora_embedding_B": f(48, 16),
               PREFIX + "emb.base_layer.weight": f(5000, 48)}, str(d / "adapter_model.safetensors"))
    ad = LoraAdapter(d)
    ad.check_against({"lin.weight": (700, 900), "emb.weight": (5000, 48)})  # lin: a Conv1D-style [in, out]
    for t in ad.targets.values():
        for start, n in ((0, 30000), (12345, 20000), (t.numel - 7, 7)):
            base = np.zeros(n, np.float32) if t.needs_base else None
            out = np.empty(n, np.float32)
            t.read_delta(start, n, out, base)  # warm: kernel loaded
            tracemalloc.start()
            t.read_delta(start, n, out, base)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak <= t.work_bytes(n) + 4096, (t.name, n, peak, t.work_bytes(n))
            assert t.work_bytes(n) < t.numel * 4 // 4


def test_identity_and_fingerprint_inputs(tmp_path):
    ad = LoraAdapter(LORA / "tiny-llama" / "qv-f32")
    weights = LORA / "tiny-llama" / "qv-f32" / "adapter_model.safetensors"
    assert list(ad.files) == [str(weights)]
    st = os.stat(weights)
    assert ad.identity() == {(st.st_dev, st.st_ino)}
    import hashlib

    assert ad.config_sha256 == hashlib.sha256((weights.parent / "adapter_config.json").read_bytes()).hexdigest()
    assert LoraAdapter(copy_adapter(tmp_path, r=8, lora_alpha=17)).config_sha256 != ad.config_sha256

"""`npmerge extract-lora` (issue 23), against references written here: fine-tunes built
from the bundled tiny Llama (or synthetic tensors) with the official safetensors API,
float64 NumPy SVDs as the optimum, the adapter read back with the official library and
merged back by `npmerge task-arithmetic BASE BASE+ADAPTER`.

- an exact rank-8 change is recovered (B·A to 1e-6 relative) and merged back equals the
  fine-tune (F32: to 1e-6; BF16: within one BF16 rounding);
- noise-like changes: ‖Δ − B·A‖ within 1 + 1e-3 of the Eckart–Young optimum;
- --rank-energy gives per-module ranks (rank_pattern/alpha_pattern, read back by npmerge);
- embeddings, head and norms: modules_to_save by default, embedding LoRA with --embed-lora;
- the same bytes for 1 and 2 threads and any --max-memory;
- bad input: `Error:`/`Hint:`, the right exit code, nothing left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest

from helpers import FIXTURES, LLAMA, LLAMA_F32, load_model, tree_bytes
from npmerge.dtypes import encode_f64
from npmerge.io.lora import LoraAdapter
from safety_helpers import assert_clean, assert_error, make_model, run

BASE = LLAMA_F32 / "base"
PREFIX = "base_model.model."
LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def lowrank_delta(rng, shape, rank: int, scale: float = 0.02) -> np.ndarray:
    """An exact rank-`rank` float64 matrix, entries ~ `scale`."""
    b = rng.standard_normal((shape[0], rank))
    a = rng.standard_normal((rank, shape[1])) * (scale / np.sqrt(rank))
    return b @ a


def fine_tune(tmp_path, name: str, change, src=BASE, **extra) -> tuple:
    """A fine-tune of `src`: every linear weight W + change(W) rounded once to W's dtype;
    `extra` tensors replaced by the given values. Returns (path, {tensor: Δ float64 exact})."""
    tensors = load_model(src)
    deltas = {}
    for k, v in tensors.items():
        if LINEAR.search(k):
            deltas[k] = change(k, v.shape)
            tensors[k] = (v.astype(np.float64) + deltas[k]).astype(v.dtype)
    tensors.update(extra)
    return make_model(tmp_path / name, tensors, src=src), deltas


def adapter(path) -> tuple[dict, dict, dict]:
    """(config, tensors by key, report) of an adapter directory."""
    return (json.loads((path / "adapter_config.json").read_text()), load_model(path / "adapter_model.safetensors"),
            json.loads((path / "extract_report.json").read_text()))


def product(tensors: dict, module: str) -> np.ndarray:
    b = tensors[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
    a = tensors[f"{PREFIX}{module}.lora_A.weight"].astype(np.float64)
    return b @ a


def actual_deltas(ft, base=BASE) -> dict:
    """FT − BASE in float32, as extract-lora defines Δ, in float64."""
    f, b = load_model(ft), load_model(base)
    return {k: (f[k].astype(np.float32) - b[k].astype(np.float32)).astype(np.float64) for k in f}


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def test_exact_rank8_change_is_recovered_and_merges_back(tmp_path):
    rng = np.random.default_rng(23)
    ft, _ = fine_tune(tmp_path, "ft", lambda k, s: lowrank_delta(rng, s, 8))
    out = tmp_path / "lora"
    res = run("extract-lora", BASE, ft, "--rank", "8", "-o", out)
    assert res.code == 0, res.err
    config, tensors, report = adapter(out)
    deltas = actual_deltas(ft)
    modules = sorted(k[:-len(".weight")] for k in deltas if LINEAR.search(k))
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert config["target_modules"] == modules and config["rank_pattern"] == {} and not config["modules_to_save"]
    named = config["base_model_name_or_path"]  # the public name: as given, never an absolute path
    assert not os.path.isabs(named) and named.endswith("tiny-llama-f32/base")
    assert str(tmp_path) not in "".join(p.read_text() for p in out.iterdir() if p.suffix in (".json", ".md"))
    for module in modules:
        assert tensors[f"{PREFIX}{module}.lora_A.weight"].dtype == np.float32  # the base's dtype
        assert rel(product(tensors, module), deltas[module + ".weight"]) < 1e-6
        assert report["modules"][module]["rank"] == 8 and report["modules"][module]["error"] < 1e-6
    assert report["files"]["adapter_model.safetensors"]["size"] == (out / "adapter_model.safetensors").stat().st_size
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card.split("---")[1]
    assert LoraAdapter(out).summary()["ranks"] == [8]  # npmerge's own reader accepts it

    merged = tmp_path / "merged"
    assert run("task-arithmetic", BASE, f"{BASE}+{out}", "-o", merged, "-q").code == 0
    got, want = load_model(merged), load_model(ft)
    for k in want:
        assert rel(got[k].astype(np.float64), want[k].astype(np.float64)) < 1e-6, k


def test_bf16_round_trip_within_bf16_rounding(tmp_path):
    rng = np.random.default_rng(5)
    src = LLAMA / "base"
    ft, _ = fine_tune(tmp_path, "ft", lambda k, s: lowrank_delta(rng, s, 8), src=src)
    out, merged = tmp_path / "lora", tmp_path / "merged"
    assert run("extract-lora", src, ft, "--rank", "8", "-o", out, "-q").code == 0
    config, tensors, _ = adapter(out)
    assert {v.dtype for v in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert run("task-arithmetic", src, f"{src}+{out}", "-o", merged, "-q").code == 0
    got, want = load_model(merged), load_model(ft)
    for k in want:  # Δ = FT − BASE holds FT's own BF16 rounding (full rank), and the factors are BF16
        g, w = got[k].astype(np.float64), want[k].astype(np.float64)
        assert rel(g, w) <= 2.0 ** -8 if np.any(w) else not np.any(g), k  # measured: ~2.2e-3
        assert np.max(np.abs(g - w)) <= 2 * 2.0 ** -8 * np.max(np.abs(w)), k  # measured: < 1.5 BF16 ulps


def test_noise_like_changes_meet_the_optimum(tmp_path):
    rng = np.random.default_rng(7)
    ft, _ = fine_tune(tmp_path, "ft", lambda k, s: rng.standard_normal(s) * 0.01)
    out = tmp_path / "lora"
    assert run("extract-lora", BASE, ft, "--rank", "5", "-o", out, "-q").code == 0
    _, tensors, report = adapter(out)
    for name, delta in actual_deltas(ft).items():
        if not LINEAR.search(name):
            continue
        module = name[:-len(".weight")]
        s = np.linalg.svd(delta, compute_uv=False)  # float64 reference
        optimum = np.sqrt(np.sum(s[5:] ** 2))
        error = np.linalg.norm(delta - product(tensors, module))
        assert error <= (1 + 1e-3) * optimum, (module, error / optimum)
        assert report["modules"][module]["optimal_error"] == pytest.approx(optimum / np.linalg.norm(delta), rel=1e-9)
        assert report["modules"][module]["energy"] == pytest.approx(1 - (optimum / np.linalg.norm(s)) ** 2, rel=1e-9)


def test_rank_energy_gives_rank_pattern(tmp_path):
    rng = np.random.default_rng(11)
    ranks = {"q_proj": 2, "k_proj": 3}  # exact ranks; every other module rank 6
    ft, _ = fine_tune(tmp_path, "ft", lambda k, s: lowrank_delta(rng, s, next(
        (r for m, r in ranks.items() if m in k), 6)))
    out = tmp_path / "lora"
    assert run("extract-lora", BASE, ft, "--rank", "16", "--rank-energy", "0.99999", "-o", out, "-q").code == 0
    config, tensors, report = adapter(out)
    assert config["r"] == config["lora_alpha"] == 6
    want = {re.escape(m): r for m in config["target_modules"] for p, r in ranks.items() if m.endswith(p)}
    assert config["rank_pattern"] == config["alpha_pattern"] == want
    targets = LoraAdapter(out).targets
    for module in config["target_modules"]:
        r = report["modules"][module]["rank"]
        assert targets[module + ".weight"].rank == r and targets[module + ".weight"].scale == 1.0
        assert tensors[f"{PREFIX}{module}.lora_A.weight"].shape[0] == r


def test_embeddings_head_and_norms(tmp_path):
    rng = np.random.default_rng(3)
    base = load_model(BASE)
    extra = {k: base[k] + np.float32(0.25) for k in ("model.embed_tokens.weight", "lm_head.weight",
                                                    "model.layers.1.input_layernorm.weight")}
    ft, _ = fine_tune(tmp_path, "ft", lambda k, s: lowrank_delta(rng, s, 4), **extra)
    out = tmp_path / "lora"
    assert run("extract-lora", BASE, ft, "--rank", "4", "-o", out, "-q").code == 0
    config, tensors, report = adapter(out)
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.layers.1.input_layernorm"]
    for name, value in extra.items():
        assert np.array_equal(tensors[PREFIX + name], value)  # saved whole, exactly
    assert report["skipped"]["unchanged"] == ["model.layers.0.input_layernorm.weight",
                                              "model.layers.0.post_attention_layernorm.weight",
                                              "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"]

    embed = tmp_path / "embed"
    assert run("extract-lora", BASE, ft, "--rank", "4", "--embed-lora", "--skip-undecomposable", "-o", embed,
               "-q").code == 0
    config, tensors, report = adapter(embed)
    assert config["modules_to_save"] is None
    assert "model.embed_tokens" in config["target_modules"] and "lm_head" in config["target_modules"]
    a, b = (tensors[f"{PREFIX}model.embed_tokens.lora_embedding_{x}"] for x in "AB")
    assert a.shape == (4, 256) and b.shape == (64, 4)  # PEFT: [r, vocab], [dim, r]; Δ = (B·A)ᵀ
    assert rel((b.astype(np.float64) @ a).T, actual_deltas(ft)["model.embed_tokens.weight"]) < 1e-2  # rank 4 of rank 1
    norms = sorted(k for k in load_model(BASE) if k.endswith("norm.weight"))  # left out unread, changed or not
    assert report["skipped"]["undecomposable (--skip-undecomposable)"] == norms
    merged = tmp_path / "merged"
    assert run("task-arithmetic", BASE, f"{BASE}+{embed}", "-o", merged, "-q").code == 0
    assert rel(load_model(merged)["model.embed_tokens.weight"].astype(np.float64),
               load_model(ft)["model.embed_tokens.weight"].astype(np.float64)) < 1e-6


def test_conv1d_layers_and_biases(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]; PEFT applies (B·A)ᵀ with lora_A [r, in]. Changed
    biases of LoRA modules are saved whole under PEFT's own key, `<module>.base_layer.bias`."""
    rng = np.random.default_rng(9)
    src = FIXTURES / "tiny-lora" / "tiny-gpt2" / "base"
    tensors = load_model(src)
    for k, v in list(tensors.items()):
        if k.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
            tensors[k] = (v + lowrank_delta(rng, v.shape, 3)).astype(np.float32)
        elif k.endswith("attn.c_attn.bias"):
            tensors[k] = v + np.float32(0.125)
    ft, out, merged = make_model(tmp_path / "ft", tensors, src=src), tmp_path / "lora", tmp_path / "merged"
    assert run("extract-lora", src, ft, "--rank", "3", "-o", out, "-q").code == 0
    config, factors, _ = adapter(out)
    assert config["fan_in_fan_out"] is True and config["bias"] == "all" and not config["modules_to_save"]
    module = "transformer.h.0.mlp.c_fc"
    assert factors[f"{PREFIX}{module}.lora_A.weight"].shape == (3, 32)  # [r, in]; the weight is [in=32, out=128]
    assert factors[f"{PREFIX}{module}.lora_B.weight"].shape == (128, 3)
    assert f"{PREFIX}transformer.h.0.attn.c_attn.base_layer.bias" in factors
    assert run("task-arithmetic", src, f"{src}+{out}", "-o", merged, "-q").code == 0
    got = load_model(merged)
    for k, v in tensors.items():
        assert rel(got[k].astype(np.float64), v.astype(np.float64)) < 1e-6 if np.any(v) else not np.any(got[k]), k


def test_an_adapter_as_the_fine_tune(tmp_path):
    """FT may be anything a merge accepts: here a bare adapter, applied to BASE (Δ = s·B·A)."""
    src, lora = LLAMA / "base", FIXTURES / "tiny-lora" / "tiny-llama" / "qv-f32"
    out = tmp_path / "again"
    assert run("extract-lora", src, lora, "--rank", "8", "--out-dtype", "float32", "-o", out, "-q").code == 0
    config, factors, report = adapter(out)
    original = load_model(lora / "adapter_model.safetensors")
    scale = 16 / 8  # lora_alpha / r of the fixture
    modules = config["target_modules"]
    assert len(modules) == 4 and all(m.endswith(("q_proj", "v_proj")) for m in modules)
    for module in config["target_modules"]:
        want = scale * (original[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
                        @ original[f"{PREFIX}{module}.lora_A.weight"])
        assert rel(product(factors, module), want) < 1e-6
    assert len(report["skipped"]["unchanged"]) == 17  # every tensor the adapter does not touch


def test_dry_run_writes_nothing_and_json_is_the_report(tmp_path, ft_tiny):
    before = set(os.listdir(tmp_path))
    res = run("extract-lora", BASE, ft_tiny, "--rank", "2", "-o", tmp_path / "out", "--dry-run", "--json")
    assert res.code == 0, res.err
    plan = json.loads(res.out)
    kinds = {t["tensor"]: (t["lowrank"], t["kind"], t["max_rank"]) for t in plan["tensors"]}
    assert kinds["model.layers.0.mlp.down_proj.weight"] == (True, "linear", 2)
    assert kinds["model.embed_tokens.weight"] == (False, "embedding", None)
    assert_clean(tmp_path, before)
    res = run("extract-lora", BASE, ft_tiny, "--rank", "2", "-o", tmp_path / "out", "--json")
    assert json.loads(res.out) == json.loads((tmp_path / "out" / "extract_report.json").read_text())


def test_hub_id_base_is_named_by_its_id(tmp_path, monkeypatch, ft_tiny):
    from test_hub import HUB_ENV, add_snapshot, model_files

    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_snapshot(tmp_path / "hf", "org/tiny-base", "c" * 40, model_files(BASE), refs=("main",))
    out = tmp_path / "lora"
    assert run("extract-lora", "org/tiny-base", ft_tiny, "--rank", "2", "-o", out, "-q").code == 0
    config, _, report = adapter(out)
    assert config["base_model_name_or_path"] == "org/tiny-base"
    assert report["base"]["hub_id"] == "org/tiny-base" and report["base"]["commit"] == "c" * 40
    assert "base_model: org/tiny-base\n" in (out / "README.md").read_text().split("---")[1]


def test_same_bytes_for_threads_and_budgets(tmp_path):
    rng = np.random.default_rng(1)
    ft, _ = fine_tune(tmp_path, "ft", lambda k, s: rng.standard_normal(s) * 0.01)
    outs = []
    for i, (threads, memory) in enumerate([("1", "2MiB"), ("2", "1GiB"), ("2", "3MiB")]):
        outs.append(tmp_path / f"out{i}")
        res = run("extract-lora", BASE, ft, "--rank", "6", "--threads", threads, "--max-memory", memory, "-o",
                  outs[-1], "-q")
        assert res.code == 0, res.err
    first = tree_bytes(outs[0])
    assert all(tree_bytes(o) == first for o in outs[1:])


def test_encode_f64_rounds_once():
    """A float64 just above a BF16 tie: float32 first would round onto the tie, then to even."""
    tie = 1.0 + 2.0 ** -8  # halfway between BF16 1.0 and 1.0078125
    x = np.array([tie + 2.0 ** -40, -(tie + 2.0 ** -40), tie, 3.0 + 2.0 ** -60], np.float64)
    out = np.empty(4, np.uint16)
    encode_f64(x, "BF16", out)
    assert out.tolist() == x.astype(ml_dtypes.bfloat16).view(np.uint16).tolist()
    assert out[0] == np.array(1.0078125, ml_dtypes.bfloat16).view(np.uint16)


def test_blas_is_pinned_to_one_thread_while_extracting():
    from npmerge import blas

    found = blas._openblas()
    if found is None:
        pytest.skip(blas.pin_note())
    get, _ = found
    before = get()
    with blas.one_thread():
        assert get() == 1
    assert get() == before


# ------------------------------------------------------------------ bad input


@pytest.fixture
def ft_tiny(tmp_path_factory):
    rng = np.random.default_rng(2)
    return fine_tune(tmp_path_factory.mktemp("in"), "ft", lambda k, s: lowrank_delta(rng, s, 2))[0]


@pytest.mark.parametrize("args, code, phrase", [
    (["--rank", "0"], 2, "--rank must be a positive integer"),
    (["--rank-energy", "0"], 2, "--rank-energy must be in (0, 1]"),
    (["--rank-energy", "1.5"], 2, "--rank-energy must be in (0, 1]"),
    (["--sv-epsilon", "-1"], 2, "--sv-epsilon must be a number >= 0"),
    (["--include", "("], 2, "not a valid regular expression"),
    (["--max-memory", "1MiB"], 2, "too small for the exact SVD of module"),
    (["--exclude", "."], 4, "nothing to extract"),
])
def test_bad_options(tmp_path, ft_tiny, args, code, phrase):
    before = set(os.listdir(tmp_path))
    assert_error(run("extract-lora", BASE, ft_tiny, "-o", tmp_path / "out", *args), code, phrase)
    assert_clean(tmp_path, before)


def test_bad_models_and_outputs(tmp_path, ft_tiny):
    before = set(os.listdir(tmp_path))
    out = tmp_path / "out"
    # a fine-tune of another shape (vocabulary 1024 against 256)
    assert_error(run("extract-lora", BASE, LLAMA / "ft-a", "-o", out), 4, "lm_head.weight", "[1024, 64]", "[256, 64]")
    assert_error(run("extract-lora", BASE, BASE, "-o", out), 2, "is the base model itself")
    # the output inside an input, or an existing output without --force
    assert_error(run("extract-lora", BASE, ft_tiny, "-o", ft_tiny / "lora"), 2, "inside the input")
    assert_clean(tmp_path, before)
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    assert_error(run("extract-lora", BASE, ft_tiny, "-o", out), 2, "exists and is not empty")
    assert (out / "adapter_config.json").read_text() == "{}"
    assert run("extract-lora", BASE, ft_tiny, "-o", out, "--force", "-q").code == 0
    shutil.rmtree(out)
    assert_clean(tmp_path, before)


def test_failure_while_extracting_leaves_nothing(tmp_path):
    """NaN in a Δ is found only when the module is read: the error comes mid-run, after other
    modules were spilled; the spill file is unlinked and no output or staging remains."""
    rng = np.random.default_rng(4)
    bad = load_model(BASE)["model.layers.1.mlp.up_proj.weight"].copy()
    bad[3, 5] = np.nan
    ft, _ = fine_tune(tmp_path, "ft", lambda k, s: lowrank_delta(rng, s, 2), **{"model.layers.1.mlp.up_proj.weight": bad})
    before = set(os.listdir(tmp_path))
    res = run("extract-lora", BASE, ft, "-o", tmp_path / "out", "--threads", "1")
    assert_error(res, 4, "model.layers.1.mlp.up_proj.weight", "NaN")
    assert_clean(tmp_path, before)


def test_interrupt_while_writing_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C after the adapter file is staged: the staging directory goes (there is no
    --resume for an extraction), and so does the spill file."""
    from npmerge import extract_run

    rng = np.random.default_rng(6)
    base = load_model(BASE)
    ft, _ = fine_tune(tmp_path, "ft", lambda k, s: lowrank_delta(rng, s, 2),
                      **{"model.norm.weight": base["model.norm.weight"] + np.float32(1)})

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_run, "_write_whole", interrupted)
    before = set(os.listdir(tmp_path))
    res = run("extract-lora", BASE, ft, "-o", tmp_path / "out")
    assert res.code == 130 and res.err.startswith("Error: interrupted"), res.err
    assert_clean(tmp_path, before)


def test_adapter_name_clash(tmp_path):
    """A base tensor named with a segment PEFT reserves (lora_A, base_layer, ...) would be read
    back as something else: refused, naming it."""
    tensors = load_model(BASE)
    tensors["model.layers.0.mlp.lora_A.weight"] = np.ones((4, 64), np.float32)
    base = make_model(tmp_path / "base", tensors, src=BASE)
    tensors["model.layers.0.mlp.lora_A.weight"] = np.full((4, 64), 2.0, np.float32)
    ft = make_model(tmp_path / "ft", tensors, src=BASE)
    before = set(os.listdir(tmp_path))
    assert_error(run("extract-lora", base, ft, "-o", tmp_path / "out"), 4, "model.layers.0.mlp.lora_A.weight",
                 "reserves")
    assert_clean(tmp_path, before)

"""LoRA adapters merged end to end (issue 14): through the real CLI, against references
written here from PEFT's conventions alone (nothing from npmerge):

- `peft_taus` reads an adapter with the official safetensors library and computes every
  base tensor's task vector: bitwise (float64 products summed in increasing j from +0.0,
  times the float64 scale, one rounding to float32 -- README "LoRA adapters") and in
  float64; replacements are full - base; parts add in the order replacement, low-rank,
  lora bias;
- merged outputs equal tests/reference.py's methods applied to those task vectors, bit
  for bit (`ref.ties(zeros, taus, ...)` is TIES of the task vectors themselves), and,
  written as F32, lie within 1e-6 relative L2 per tensor of float64 base + sum w_i tau_i;
- the same bytes for 1 and 2 threads, any --max-memory, cached or recomputed B @ A;
- bad adapters fail at plan time with `Error:`/`Hint:`, the right exit code, nothing written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import reference as ref
from helpers import FIXTURES, LLAMA, load_model, npmerge
from safety_helpers import assert_clean, assert_error, run

LORA = FIXTURES / "tiny-lora"
LLAMA_BASE = LLAMA / "base"
GPT2_BASE = LORA / "tiny-gpt2" / "base"
QV, RSLORA, BF16, HEAD = (LORA / "tiny-llama" / n for n in ("qv-f32", "rslora-patterns", "all-linear-bf16",
                                                              "lm-head-save"))
CONV1D, EMBEDDING = LORA / "tiny-gpt2" / "conv1d-bias-all", LORA / "tiny-gpt2" / "embedding-lora-bias"
PREFIX = "base_model.model."
GPT2_CONV1D = ("c_attn", "c_proj", "c_fc")  # transformers' GPT-2 builds these as Conv1D (weight [in, out])
_KEY = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$")


# ------------------------------------------------------------------ references


def f32_model(path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in load_model(path).items()}


def peft_taus(adapter: Path, base: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{base tensor: (tau float32, tau float64)} of every tensor the adapter changes."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = {k[len(PREFIX):]: v.astype(np.float32) for k, v in load_model(adapter / "adapter_model.safetensors").items()}

    def pattern(key: str, module: str, default):
        for k, v in (cfg.get(key) or {}).items():  # the first key K with re.match((.*\.)?(K)$) wins
            if re.match(rf"(.*\.)?({k})$", module):
                return v
        return default

    parts: dict[str, dict[str, tuple]] = {}
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, v in tensors.items():
        m = _KEY.match(key)
        if m:
            modules.setdefault(m[1], {})[m[2]] = v
        else:  # a replacement: modules_to_save, bias all, base_layer copies
            name = ".".join(s for s in key.split(".") if s != "base_layer")
            parts.setdefault(name, {})["full"] = (v - base[name], v.astype(np.float64) - base[name].astype(np.float64))
    for module, p in modules.items():
        emb = "lora_embedding_A" in p
        a, b = (p["lora_embedding_A"], p["lora_embedding_B"]) if emb else (p["lora_A.weight"], p["lora_B.weight"])
        r = a.shape[0]
        alpha = pattern("alpha_pattern", module, cfg.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        acc = np.zeros((b.shape[0], a.shape[1]), np.float64)
        for j in range(r):
            acc += np.multiply.outer(b[:, j].astype(np.float64), a[j].astype(np.float64))
        t32, t64 = (np.float64(scale) * acc).astype(np.float32), scale * (b.astype(np.float64) @ a.astype(np.float64))
        if emb or module.rsplit(".", 1)[-1] in GPT2_CONV1D:  # PEFT: by layer type, not the config's flag
            t32, t64 = t32.T, t64.T
        parts.setdefault(module + ".weight", {})["lowrank"] = (t32, t64)
        if "lora_B.bias" in p:
            bias = p["lora_B.bias"].astype(np.float64)
            parts.setdefault(module + ".bias", {})["bias"] = ((np.float64(scale) * bias).astype(np.float32), scale * bias)
    out = {}
    for name, p in parts.items():
        terms = [p[k] for k in ("full", "lowrank", "bias") if k in p]
        t32, t64 = terms[0]
        for x32, x64 in terms[1:]:
            t32, t64 = t32 + x32, t64 + x64  # float32 addition, as the adapter's parts add
        out[name] = (np.ascontiguousarray(t32), t64)
    return out


def taus_of(models: list, base: dict) -> list[dict[str, np.ndarray]]:
    """Float32 task vector of every tensor for each model (an adapter dir or a full model dir)."""
    out = []
    for m in models:
        if (Path(m) / "adapter_config.json").exists():
            t = peft_taus(Path(m), base)
            out.append({n: t[n][0] if n in t else np.zeros_like(b) for n, b in base.items()})
        else:
            ft = f32_model(m)
            out.append({n: ft[n] - b for n, b in base.items()})
    return out


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    return ref.from_f32_bf16(x) if dtype == "BF16" else x.view(np.uint32)


def bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x.view(np.uint32)


def assert_outputs(out_dir, expected: dict[str, np.ndarray], dtype: str) -> None:
    out = load_model(out_dir)
    assert sorted(out) == sorted(expected)
    for name, x in expected.items():
        assert np.array_equal(bits(out[name]), encode(np.ascontiguousarray(x, np.float32), dtype)), name


def rel_l2(x, y) -> float:
    y = np.asarray(y, np.float64)
    return float(np.linalg.norm(np.asarray(x, np.float64) - y) / max(np.linalg.norm(y), 1e-300))


def weights(out_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).glob("model*.safetensors*"))}


def merge(*args) -> None:
    res = run(*args, "-q")
    assert res.code == 0, res.err


# ------------------------------------------------------------- exact merges


ADAPTERS = [(QV, LLAMA_BASE), (RSLORA, LLAMA_BASE), (BF16, LLAMA_BASE), (HEAD, LLAMA_BASE),
            (CONV1D, GPT2_BASE), (EMBEDDING, GPT2_BASE)]


@pytest.mark.parametrize("adapter,base_dir", ADAPTERS, ids=lambda p: p.name if isinstance(p, Path) else None)
def test_task_arithmetic_weight_one_is_base_plus_tau(tmp_path, adapter, base_dir):
    """Merging one adapter with weight 1 = applying it: B + tau bitwise, in the base's dtype
    and in F32 (which is also within 1e-6 relative L2 of float64 B + scale * B @ A)."""
    base = f32_model(base_dir)
    taus = peft_taus(adapter, base)
    expected = {n: b + taus[n][0] if n in taus else b + np.float32(0) for n, b in base.items()}
    dtype = next(iter(load_model(base_dir).values())).dtype
    native = "BF16" if dtype.itemsize == 2 else "F32"
    merge("task-arithmetic", base_dir, adapter, "--weight", "1", "-o", tmp_path / "out")
    assert_outputs(tmp_path / "out", expected, native)
    merge("task-arithmetic", base_dir, adapter, "--weight", "1", "--out-dtype", "float32", "-o", tmp_path / "f32")
    assert_outputs(tmp_path / "f32", expected, "F32")
    out = f32_model(tmp_path / "f32")
    for name, (_, t64) in taus.items():
        assert rel_l2(out[name], base[name].astype(np.float64) + t64) <= 1e-6, name


def test_task_arithmetic_of_several_adapters_matches_float64(tmp_path):
    weights, lam = [0.7, 0.5, 1.25, 0.3], 0.9
    adapters = [QV, RSLORA, BF16, HEAD]
    base = f32_model(LLAMA_BASE)
    merge("task-arithmetic", LLAMA_BASE, *adapters, *[a for w in weights for a in ("--weight", w)], "--lambda", lam,
          "--out-dtype", "float32", "-o", tmp_path / "out")
    taus = taus_of(adapters, base)
    zeros = {n: np.zeros_like(b) for n, b in base.items()}
    expected = {n: b + ref.task_arithmetic(zeros[n], [t[n] for t in taus], weights, lam=lam) for n, b in base.items()}
    assert_outputs(tmp_path / "out", expected, "F32")
    out = f32_model(tmp_path / "out")
    taus64 = [peft_taus(a, base) for a in adapters]
    for name, b in base.items():
        want = b.astype(np.float64) + lam * sum(w * t[name][1] for w, t in zip(weights, taus64) if name in t)
        assert rel_l2(out[name], want) <= 1e-6, name


TIES_CASES = {
    "llama-3-adapters": (LLAMA_BASE, [QV, RSLORA, BF16], [1.0, 0.6, 0.8], [0.3, 0.5, 0.2]),
    "adapter-and-full-finetunes": (LLAMA_BASE, [LLAMA / "ft-a", HEAD, LLAMA / "ft-b"], [1.0, 0.7, 0.5], [0.2, 0.4, 0.3]),
    "gpt2-conv1d-embedding": (GPT2_BASE, [CONV1D, EMBEDDING], [1.0, 0.8], [0.4, 0.6]),
}


@pytest.mark.parametrize("case", list(TIES_CASES))
def test_ties_over_adapters_is_ties_of_their_task_vectors(tmp_path, case):
    base_dir, models, weights, densities = TIES_CASES[case]
    base = f32_model(base_dir)
    args = [a for w in weights for a in ("--weight", w)] + [a for d in densities for a in ("--density", d)]
    merge("ties", base_dir, *models, *args, "--lambda", "0.9", "-o", tmp_path / "out")
    taus = taus_of(models, base)
    native = "BF16" if base_dir == LLAMA_BASE else "F32"
    expected = {n: b + ref.ties(np.zeros_like(b), [t[n] for t in taus], weights, densities, lam=0.9)
                for n, b in base.items()}
    assert_outputs(tmp_path / "out", expected, native)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    for i, t in enumerate(taus):  # the task-vector norms the report shows are those of tau
        l2 = math.sqrt(math.fsum(float(np.sum(x.astype(np.float64) ** 2)) for x in t.values()))
        assert report["totals"]["models"][i]["l2"] == pytest.approx(l2, rel=1e-12)


# -------------------------------------------------- MODEL+ADAPTER references


def test_model_plus_adapter_references(tmp_path):
    """`BASE+ADAPTER` is the bare adapter; `FT+ADAPTER` is FT's values plus tau; a
    method without a base merges `BASE+ADAPTER` as model values."""
    base, ft = f32_model(LLAMA_BASE), f32_model(LLAMA / "ft-a")
    tau = {n: t[0] for n, t in peft_taus(QV, base).items()}
    merge("task-arithmetic", LLAMA_BASE, QV, LLAMA / "ft-b", "--weight", "0.6", "-o", tmp_path / "bare")
    merge("task-arithmetic", LLAMA_BASE, f"{LLAMA_BASE}+{QV}", LLAMA / "ft-b", "--weight", "0.6", "-o", tmp_path / "plus")
    assert weights(tmp_path / "bare") == weights(tmp_path / "plus")

    ft_plus = {n: ft[n] + tau[n] if n in tau else ft[n] for n in base}  # FT with the adapter applied, float32
    merge("task-arithmetic", LLAMA_BASE, f"{LLAMA / 'ft-a'}+{QV}", "--weight", "1", "--out-dtype", "float32",
          "-o", tmp_path / "ft")
    assert_outputs(tmp_path / "ft", {n: ref.task_arithmetic(b, [ft_plus[n]], [1.0]) for n, b in base.items()}, "F32")

    values = {n: b + tau[n] if n in tau else b for n, b in base.items()}
    merge("linear", f"{LLAMA_BASE}+{QV}", LLAMA / "ft-a", "--weight", "0.75", "--weight", "0.25",
          "--out-dtype", "float32", "-o", tmp_path / "linear")
    assert_outputs(tmp_path / "linear", {n: ref.linear([values[n], ft[n]], [0.75, 0.25]) for n in base}, "F32")


def test_adapted_model_as_the_base(tmp_path):
    """base_model BASE+ADAPTER: the base's values are B + tau (float32), fine-tunes' task
    vectors are taken against them, and a bare adapter is applied to that base."""
    base, ft = f32_model(LLAMA_BASE), f32_model(LLAMA / "ft-a")
    tau_qv = {n: t[0] for n, t in peft_taus(QV, base).items()}
    tau_rs = {n: t[0] for n, t in peft_taus(RSLORA, base).items()}
    adapted = {n: b + tau_qv[n] if n in tau_qv else b for n, b in base.items()}
    merge("ties", f"{LLAMA_BASE}+{QV}", LLAMA / "ft-a", RSLORA, "--density", "0.4", "--out-dtype", "float32",
          "-o", tmp_path / "out")
    expected = {n: v + ref.ties(np.zeros_like(v), [ft[n] - v, tau_rs.get(n, np.zeros_like(v))], [1.0, 1.0],
                                [0.4, 0.4]) for n, v in adapted.items()}
    assert_outputs(tmp_path / "out", expected, "F32")


def test_base_plus_adapter_in_a_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(FIXTURES.parent)  # relative paths, as people write recipes
    rel = lambda p: str(Path(p).relative_to(FIXTURES.parent))  # noqa: E731
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {rel(LLAMA_BASE)}\nparameters:\n  lambda: 0.9\nmodels:\n"
                      f"  - model: {rel(LLAMA_BASE)}+{rel(RSLORA)}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                      f"  - model: {rel(LLAMA / 'ft-a')}\n    parameters: {{weight: 1.0, density: 0.3}}\n")
    merge("run", recipe, "-o", tmp_path / "out")
    base = f32_model(LLAMA_BASE)
    taus = taus_of([RSLORA, LLAMA / "ft-a"], base)
    expected = {n: b + ref.ties(np.zeros_like(b), [t[n] for t in taus], [0.6, 1.0], [0.5, 0.3], lam=0.9)
                for n, b in base.items()}
    assert_outputs(tmp_path / "out", expected, "BF16")
    written = (tmp_path / "out" / "npmerge_recipe.yml").read_text()
    assert f"model: {rel(LLAMA_BASE)}+{rel(RSLORA)}\n" in written  # the reference as written
    merge("run", tmp_path / "out" / "npmerge_recipe.yml", "-o", tmp_path / "again")
    assert_outputs(tmp_path / "again", expected, "BF16")


# ------------------------------------------- determinism, budget, resume inputs


def test_same_bytes_for_threads_and_budgets(tmp_path):
    args = ["ties", LLAMA_BASE, QV, LLAMA / "ft-a", BF16, f"{LLAMA / 'ft-b'}+{RSLORA}", "--density", "0.3", "-q"]
    runs = {"t1": ({"NUMBA_NUM_THREADS": "1"}, []), "t2": ({"NUMBA_NUM_THREADS": "2"}, []),
            "t2-small": ({"NUMBA_NUM_THREADS": "2"}, ["--max-memory", "8MiB"])}
    outputs = {}
    for key, (env, extra) in runs.items():
        npmerge(*args, *extra, "-o", tmp_path / key, env=env)
        outputs[key] = weights(tmp_path / key)
    assert outputs["t1"] == outputs["t2"] == outputs["t2-small"]


def big_pair(tmp_path, n_adapters=2, rows=300, cols=200, r=16):
    """A base whose adapted tensor spans several 16384-element blocks, and adapters on it."""
    rng = np.random.default_rng(7)
    base = tmp_path / "base"
    base.mkdir()
    save_file({"layer.weight": (0.02 * rng.standard_normal((rows, cols))).astype(np.float32),
               "other.weight": (0.02 * rng.standard_normal((64, 64))).astype(np.float32)},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    adapters = []
    for i in range(n_adapters):
        d = tmp_path / f"lora{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                           "target_modules": ["layer"]}))
        save_file({f"{PREFIX}layer.lora_A.weight": rng.standard_normal((r, cols)).astype(np.float32) / cols ** 0.5,
                   f"{PREFIX}layer.lora_B.weight": (1e-3 * rng.standard_normal((rows, r))).astype(np.float32)},
                  str(d / "adapter_model.safetensors"))
        adapters.append(d)
    return base, adapters


def test_cached_and_recomputed_products_give_the_same_bytes(tmp_path, monkeypatch):
    """B @ A kept across TIES's passes (in the engine's buffer for a one-span tensor, in
    the source's cache when the budget allows), or recomputed per pass: the same output,
    equal to the reference."""
    from npmerge import api
    from npmerge.io.lora_target import LoraTarget

    computed = []
    read_delta = LoraTarget.read_delta
    monkeypatch.setattr(LoraTarget, "read_delta", lambda t, start, n, *a: computed.append((t.name, start, n))
                        or read_delta(t, start, n, *a))
    from npmerge.recipe import Recipe

    from npmerge.budget import job_bytes, output_bytes
    from npmerge.constants import BLOCK

    base_dir, adapters = big_pair(tmp_path)  # layer.weight: 60000 elements, 4 blocks
    recipe = Recipe.from_cli("ties", str(base_dir), [str(a) for a in adapters], per_model={"density": [0.3]})
    plan = api.plan_merge(recipe, max_memory="64MiB", threads=2)
    job = next(j for j in plan.jobs if j.name == "layer.weight")
    need = {k: output_bytes(k * BLOCK) + job_bytes(job, k * BLOCK, 2) for k in (1, 2, 4)}
    caches = sum(s.cache_bytes for s in job.models)
    plan.close()
    budgets = {"one-span": need[4] + caches, "spans-cached": need[2] + caches,
               "spans-recomputed": need[1] + 1024}
    assert need[2] + caches < need[4]  # else "spans-cached" would be one span
    seen = {}
    for key, budget in budgets.items():
        plan = api.plan_merge(recipe, max_memory=budget, threads=2)
        try:
            job = next(j for j in plan.jobs if j.name == "layer.weight")
            computed.clear()
            assert plan.work_bytes <= budget
            if job.models[0]._chunk is not None:  # the caches are in the plan's working memory
                assert plan.work_bytes >= output_bytes(plan.span) + job_bytes(job, job.span, 2) + caches
            passes = api.execute(plan, tmp_path / key)["tensors"]["layer.weight"]["passes"]
            spans = -(-job.numel // job.span)
            seen[key] = (spans, [s._chunk is not None for s in job.models], len(computed) // len(job.models) // spans)
        finally:
            plan.close()
    assert passes >= 2
    assert seen == {"one-span": (1, [False, False], 1), "spans-cached": (2, [True, True], 1),
                    "spans-recomputed": (4, [False, False], passes)}
    assert len({(tmp_path / k / "model.safetensors").read_bytes() for k in budgets}) == 1
    base = f32_model(base_dir)
    taus = taus_of(adapters, base)
    expected = {n: b + ref.ties(np.zeros_like(b), [t[n] for t in taus], [1.0, 1.0], [0.3, 0.3]) for n, b in base.items()}
    assert_outputs(tmp_path / "spans-cached", expected, "F32")


def test_budget_counts_the_lora_scratch(tmp_path):
    """A computed source's float32 span buffer and its own scratch are in the plan's working memory."""
    from dataclasses import replace

    from npmerge import api
    from npmerge.budget import job_bytes
    from npmerge.io.sources import ZeroSource
    from npmerge.recipe import Recipe

    base_dir, adapters = big_pair(tmp_path, n_adapters=1)
    plan = api.plan_merge(Recipe.from_cli("ties", str(base_dir), [str(adapters[0])]), max_memory="64MiB", threads=2)
    try:
        job = next(j for j in plan.jobs if j.name == "layer.weight")
        src = job.models[0]
        assert src.work_bytes(job.span) >= 4 * 16 * (job.numel // 200 + 200)  # the rows of B and all of A
        zero = replace(job, models=(ZeroSource(job.name, job.shape, "zero"),))
        assert job_bytes(job, job.span, 2) - job_bytes(zero, job.span, 2) == src.work_bytes(job.span)
    finally:
        plan.close()


def test_resume_fingerprint_covers_the_adapter(tmp_path):
    from npmerge import api
    from npmerge.recipe import Recipe

    adapter = tmp_path / "qv"
    shutil.copytree(QV, adapter)
    recipe = Recipe.from_cli("ties", str(LLAMA_BASE), [str(adapter)])

    def fingerprint():
        plan = api.plan_merge(recipe)
        try:
            return plan.fingerprint()["inputs"]
        finally:
            plan.close()

    before = fingerprint()
    paths = {e["path"] for e in before}
    assert {str((adapter / "adapter_model.safetensors").resolve()), str((adapter / "adapter_config.json").resolve())} <= paths
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 17  # same size, other content: a different merge
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, sort_keys=True, indent=2))
    assert fingerprint() != before


# ------------------------------------------------------------------ notes, info


def test_note_when_the_adapter_names_another_base(tmp_path):
    adapter = tmp_path / "qv"
    shutil.copytree(QV, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    merge("ties", LLAMA_BASE, adapter, "-o", tmp_path / "out")
    notes = json.loads((tmp_path / "out" / "merge_report.json").read_text())["notes"]
    assert any("names 'meta-llama/Llama-3.2-1B' as its base model" in n for n in notes), notes
    merge("ties", LLAMA_BASE, QV, "-o", tmp_path / "same")  # names fixtures/tiny-llama/base: no note
    assert not any("as its base model" in n for n in json.loads((tmp_path / "same" / "merge_report.json").read_text())["notes"])


def test_info_shows_the_adapter():
    res = run("info", RSLORA, "--json")
    assert res.code == 0, res.err
    a = json.loads(res.out)["adapter"]
    assert (a["type"], a["r"], a["lora_alpha"], a["use_rslora"], a["ranks"]) == ("rsLoRA", 8, 16, True, [2, 4, 6, 8])
    assert a["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert a["base_model_name_or_path"] == "fixtures/tiny-llama/base"
    assert 16 / math.sqrt(2) in a["scales"] and 8 / math.sqrt(4) in a["scales"]
    res = run("info", CONV1D)
    assert res.code == 0, res.err
    for phrase in ("PEFT LoRA adapter", "fan_in_fan_out", "modules_to_save", "ln_f", "c_attn", "bias"):
        assert phrase in res.out, phrase  # results go to stdout
    assert "transformer.h.0" not in res.out  # a summary, not the raw tensors


# ------------------------------------------------------------------- refusals


def copy_adapter(tmp_path, src=QV, **config) -> Path:
    d = tmp_path / "adapter"
    shutil.copytree(src, d)
    if config:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("adapter, base_dir, flag, modules", [
    (BF16, LLAMA_BASE, True, "model.layers.0.mlp.down_proj, model.layers.0.mlp.gate_proj, "
                             "model.layers.0.mlp.up_proj, model.layers.0.self_attn.k_proj and 10 more are nn.Linear"),
    (CONV1D, GPT2_BASE, False, "transformer.h.0.attn.c_attn, transformer.h.0.attn.c_proj, transformer.h.0.mlp.c_fc, "
                               "transformer.h.0.mlp.c_proj and 4 more are Conv1D"),
], ids=["linear-with-flag-true", "conv1d-with-flag-false"])
def test_fan_in_fan_out_follows_the_layer_type_like_peft(tmp_path, adapter, base_dir, flag, modules):
    """A flipped fan_in_fan_out changes nothing (the square modules included), with a note."""
    flipped = copy_adapter(tmp_path, adapter, fan_in_fan_out=flag)
    merge("task-arithmetic", base_dir, adapter, "-w", "1", "-o", tmp_path / "as-saved")
    merge("task-arithmetic", base_dir, flipped, "-w", "1", "-o", tmp_path / "flipped")
    name = "model.safetensors"
    assert (tmp_path / "flipped" / name).read_bytes() == (tmp_path / "as-saved" / name).read_bytes()
    notes = json.loads((tmp_path / "flipped" / "merge_report.json").read_text())["notes"]
    assert any(f"adapter_config.json says fan_in_fan_out: {str(flag).lower()}, but {modules} layers: applied as "
               f"{'B @ A' if flag else '(B @ A)^T'}, as PEFT does" in n for n in notes), notes


def edit_tensors(d: Path, edit) -> None:
    tensors = load_model(d / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, str(d / "adapter_model.safetensors"))


def _pickle(t):
    d = copy_adapter(t)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    return ["ties", LLAMA_BASE, d]


def _dora(t):
    return ["ties", LLAMA_BASE, copy_adapter(t, use_dora=True)]


def _bad_shape(t):
    d = copy_adapter(t)
    key = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"

    def edit(ts):
        ts[key] = np.full((48, 8), np.nan, np.float32)  # also NaN: refused for its shape, before any read
    edit_tensors(d, edit)
    return ["ties", LLAMA_BASE, d]


def _missing_target(t):
    d = copy_adapter(t)

    def edit(ts):
        for part in ("lora_A", "lora_B"):
            ts[f"{PREFIX}model.layers.7.self_attn.q_proj.{part}.weight"] = ts.pop(
                f"{PREFIX}model.layers.1.self_attn.q_proj.{part}.weight")
    edit_tensors(d, edit)
    return ["ties", LLAMA_BASE, d]


REFUSALS = {
    "pickle": (_pickle, 3, ("holds adapter_model.bin (pickle)",), "never unpickles"),
    "dora": (_dora, 3, ("is a DoRA adapter",), "merge_and_unload"),
    "shape-mismatch": (_bad_shape, 4, ("module 'model.layers.1.self_attn.q_proj'", "lora_B [48, 8] x lora_A [8, 64]",
                                       "= [48, 64], but the base tensor is [64, 64]"), "another base model"),
    "missing-target": (_missing_target, 4, ("changes 'model.layers.7.self_attn.q_proj.weight'",
                                            "which the base model does not have"), "another base model"),
    "other-base": (lambda t: ["ties", GPT2_BASE, QV], 4, ("changes 'model.layers.0.self_attn.q_proj.weight'",),
                   "adapter_config.json names 'fixtures/tiny-llama/base'"),
    "adapter-with-linear": (lambda t: ["linear", QV, LLAMA / "ft-a"], 2,
                            (f"model 1 '{QV}' is a LoRA adapter, and this merge has no base model",), "MODEL+ADAPTER"),
    "adapter-as-base": (lambda t: ["ties", QV, LLAMA / "ft-a"], 2, (f"base model '{QV}' is a LoRA adapter, not a model",),
                        "MODEL+ADAPTER"),
    "two-pluses": (lambda t: ["ties", LLAMA_BASE, f"{LLAMA_BASE}+{QV}+{RSLORA}"], 2, ("it is not MODEL+ADAPTER",),
                   "MODEL+ADAPTER"),
    "plus-missing-adapter": (lambda t: ["ties", LLAMA_BASE, f"{LLAMA_BASE}+{t}/nope"], 3,
                             ("adapter path '{tmp}/nope'", "does not exist"), "check the path"),
    "plus-adapter-on-adapter": (lambda t: ["ties", LLAMA_BASE, f"{QV}+{RSLORA}"], 2,
                                ("applies an adapter to an adapter",), "MODEL+ADAPTER"),
    "same-adapter-twice": (lambda t: ["ties", LLAMA_BASE, QV, f"{LLAMA_BASE}+{QV}"], 2,
                           ("is the same model as model 1",), "once"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_through_the_cli(tmp_path, case):
    build, code, phrases, hint = REFUSALS[case]
    work = tmp_path / "w"
    work.mkdir()
    args = build(work)
    before = set(os.listdir(work))
    res = run(*args, "-o", work / "out")
    assert_error(res, code, *(p.replace("{tmp}", str(work)) for p in phrases))
    assert hint in res.err.split("\nHint: ", 1)[1], res.err
    assert_clean(work, before)


def test_peak_anonymous_memory_follows_the_budget(tmp_path):
    """Adapters on a 16M-element tensor (float32 tau: 64 MiB per adapter, more per pass
    if it were held) merged in 24 MiB: computed spans, scratch and caches stay in it."""
    import ml_dtypes

    from test_memory import BUDGET, peak_anon

    rows, cols, r = 4096, 4096, 16
    rng = np.random.default_rng(3)
    base = tmp_path / "base"
    base.mkdir()
    save_file({"big.weight": (0.02 * rng.standard_normal((rows, cols), np.float32)).astype(ml_dtypes.bfloat16),
               "small.weight": np.ones((64, 64), ml_dtypes.bfloat16)}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    adapters = []
    for i in range(2):
        d = tmp_path / f"lora{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r}))
        save_file({f"{PREFIX}big.lora_A.weight": rng.standard_normal((r, cols), np.float32),
                   f"{PREFIX}big.lora_B.weight": 1e-3 * rng.standard_normal((rows, r), np.float32)},
                  str(d / "adapter_model.safetensors"))
        adapters.append(d)
    common = ["--density", "0.3", "--max-memory", str(BUDGET), "--quiet"]
    _, tiny = peak_anon(["ties", LLAMA_BASE, QV, "-o", tmp_path / "tiny", *common])
    _, big = peak_anon(["ties", base, *adapters, "-o", tmp_path / "out", *common])
    assert big - tiny <= BUDGET + 8 * 2**20, (big, tiny)
    assert big - tiny < 2 * 4 * rows * cols  # far below two float32 task vectors

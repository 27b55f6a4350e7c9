"""Layer stacks, slices and per-tensor parameter resolution at plan time (docs/recipes.md),
checked on the plan's jobs against tests/reference.py's recipe-value functions; and the
passthrough kernel against reference.passthrough."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from npmerge import layers
from npmerge.arrays import run_arrays
from npmerge.plan import build_plan
from npmerge.plan_params import layer_table
from npmerge.recipe import Recipe
from test_recipe_corpus import deep_models

LLAMA_NAMES = ["model.embed_tokens.weight", *(f"model.layers.{j}.{r}" for j in range(3)
                                              for r in ("self_attn.q_proj.weight", "mlp.up_proj.weight")),
               "model.norm.weight", "lm_head.weight"]


@pytest.mark.parametrize("names,config,want", [
    (LLAMA_NAMES, {"num_hidden_layers": 3}, ("model.layers", 3)),
    (LLAMA_NAMES, None, ("model.layers", 3)),
    (["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight",
      "transformer.ln_f.weight"], {"n_layer": 2}, ("transformer.h", 2)),
    # experts numbered inside a layer stay in it
    (["model.layers.0.mlp.experts.0.w1", "model.layers.0.mlp.experts.7.w1", "model.layers.1.mlp.experts.0.w1"],
     {"num_hidden_layers": 2}, ("model.layers", 2)),
    # a vision tower and a text stack: the declared count (text_config) picks the text stack
    (["vision.blocks.0.w", "vision.blocks.1.w", "vision.blocks.2.w", "vision.blocks.3.w",
      "lm.model.layers.0.w", "lm.model.layers.1.w"], {"text_config": {"num_hidden_layers": 2}},
     ("lm.model.layers", 2)),
    (["a.0.w", "a.1.w", "b.0.w", "b.1.w"], None, None),  # ambiguous
    (["model.layers.0.w", "model.layers.2.w"], None, None),  # not 0..N-1
    (["encoder.weight", "decoder.weight"], None, None),
    (LLAMA_NAMES, {"num_hidden_layers": 4}, None),  # config disagrees with the tensors
])
def test_find_stack(names, config, want):
    stack, why = layers.find_stack(names, config)
    assert (stack and (stack.prefix, stack.count)) == want if want else (stack is None and why)


def test_split_layer():
    assert layers.split_layer("model.layers.12.mlp.up_proj.weight") == ("model.layers", 12, "mlp.up_proj.weight")
    assert layers.split_layer("model.layers.012.w") is None  # not a plain number
    assert layers.split_layer("0.weight") is None and layers.split_layer("lm_head.weight") is None


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    deep_models(root)
    return root / "deep"


def _plan(text: str):
    plan = build_plan(Recipe.from_yaml(text), threads=1)
    plan.close()
    return plan


def test_per_tensor_values_follow_the_reference(deep):
    """Filters on the input name for per-model parameters and on the output name for global
    ones; t per slice; precedence source -> slice -> top -> default."""
    top_density = [{"filter": "layers.4.", "value": 0.11}, {"filter": "mlp", "value": [0.3, 0.6]}]
    slice2 = {"weight": [0.2, 0.4, 0.8]}
    src_a = {"density": [{"filter": "self_attn", "value": [0.9, 0.1]}]}
    lam = [{"filter": "layers.1.", "value": 0.5}, {"value": [1.0, 2.0]}]
    text = f"""
merge_method: ties
base_model: {deep}/base
slices:
  - sources:
      - {{model: {deep}/base, layer_range: [0, 2]}}
      - {{model: {deep}/ft-a, layer_range: [0, 2]}}
      - {{model: {deep}/ft-b, layer_range: [0, 2]}}
  - sources:
      - {{model: {deep}/base, layer_range: [3, 6]}}
      - {{model: {deep}/ft-a, layer_range: [3, 6], parameters: {{density: {src_a['density']}}}}}
      - {{model: {deep}/ft-b, layer_range: [3, 6]}}
    parameters: {{weight: {slice2['weight']}}}
parameters:
  density: {top_density}
  lambda: {lam}
"""
    plan = _plan(text)
    jobs = {j.name: j for j in plan.jobs}
    # output layers 0-1 from input layers 0-1, output layers 2-4 from input layers 3-5
    spans = [(0, 2, 0, None, {}), (2, 3, 3, src_a, slice2)]
    for out0, length, in0, own_a, sl in spans:
        for k in range(length):
            t = ref.layer_t(k, length)
            for rest in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
                out_name, in_name = f"model.layers.{out0 + k}.{rest}", f"model.layers.{in0 + k}.{rest}"
                job = jobs[out_name]
                assert job.layer == out0 + k and job.stream_index == (0, 1) and job.members == (0, 1)
                assert job.params["lambda"] == ref.resolve_parameter([None, lam], out_name, t, 1.0)
                for i, own in enumerate([own_a or {}, {}]):
                    levels = [own.get("density"), sl.get("density"), top_density]
                    assert job.model_params[i]["density"] == ref.resolve_parameter(levels, in_name, t, 1.0)
                    assert job.model_params[i]["weight"] == ref.resolve_parameter(
                        [None, sl.get("weight"), None], in_name, t, 1.0)
                assert job.sources[0].name == in_name and job.models[1].name == in_name
    # outside the layers: t = 0; embeddings from the first slice, norm and head from the last
    assert jobs["model.embed_tokens.weight"].model_params[0]["weight"] == 1.0
    assert jobs["lm_head.weight"].model_params[0]["weight"] == 0.2
    assert jobs["model.norm.weight"].params["lambda"] == 1.0
    assert plan.config_updates == {("num_hidden_layers",): 5,
                                   ("layer_types",): [t for i, t in enumerate(
                                       ["sliding_attention", "full_attention"] * 3) if i != 2]}


def test_whole_model_gradient_t(deep):
    """`models:` recipes: t = j / (L - 1) over the model's layers; other tensors t = 0."""
    plan = _plan(f"merge_method: task_arithmetic\nbase_model: {deep}/base\n"
                 f"models:\n  - model: {deep}/ft-a\n    parameters: {{weight: [0, 1, 0.5]}}\n")
    for job in plan.jobs:
        t = ref.layer_t(job.layer, 6) if job.layer is not None else 0.0
        assert job.model_params[0]["weight"] == ref.gradient_value([0, 1, 0.5], t), job.name
    assert plan.config_updates == {}


def test_plan_table_and_headline(deep):
    plan = _plan(f"merge_method: linear\nmodels:\n  - model: {deep}/ft-a\n    parameters: {{weight: [1, 2]}}\n"
                 f"  - model: {deep}/ft-b\n    parameters: {{weight: 1}}\n")
    rows = layer_table(plan)
    assert [r["tensors"] for r in rows[:-1]] == ["model.embed_tokens.weight", *(f"layer {j}" for j in range(6))]
    assert set(rows[-1]["tensors"].split(", ")) == {"model.norm.weight", "lm_head.weight"}
    assert [r["values"]["weight (ft-a)"] for r in rows] == ["1", "1", "1.2", "1.4", "1.6", "1.8", "2", "1"]
    assert plan.model_params == [{"weight": 1.0}, {"weight": 1.0}]  # the value covering the most elements


@pytest.mark.parametrize("scale", [0.5, -3.0, 1.0, 1e-3])
@pytest.mark.parametrize("dtype,rnd", [("F32", None), ("BF16", None), ("F32", "BF16"), ("F32", "F16")])
def test_passthrough_kernel(scale, dtype, rnd):
    x = np.random.default_rng(3).standard_normal(70001).astype(np.float32) * 10
    raw = ref.from_f32_bf16(x) if dtype == "BF16" else x
    xin = ref.to_f32_bf16(raw) if dtype == "BF16" else x
    if rnd == "BF16":
        xin = ref.to_f32_bf16(ref.from_f32_bf16(xin))
    elif rnd == "F16":
        xin = xin.astype(np.float16).astype(np.float32)
    for out_dtype in ("F32", "BF16"):
        got, _ = run_arrays("passthrough", None, [raw], {}, [{"scale": scale}], dtype=dtype, out_dtype=out_dtype,
                            input_round=rnd, span=32768, block=4096)
        want = ref.passthrough(xin, scale)
        want = want.view(np.uint32) if out_dtype == "F32" else ref.from_f32_bf16(want)
        assert np.array_equal(got.view(want.dtype), want)

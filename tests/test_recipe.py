"""Recipes: mergekit-style YAML in (docs/recipes.md), re-runnable YAML out, errors where
mergekit is silent. The values grammar is checked against tests/reference.py; whole
merges against it are in test_recipe_corpus.py."""

from __future__ import annotations

import codecs

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from helpers import LLAMA, f32, load_model, npmerge
from npmerge import values
from npmerge.errors import SHOWN, RecipeError, shown
from npmerge.recipe import Recipe
from npmerge.recipe_yaml import MAX_DEPTH, MAX_NODES, decode_recipe, load_yaml

YAML = """
merge_method: ties
base_model: /m/base
models:
  - model: /m/base
  - model: /m/a
    parameters: {weight: 0.5, density: 0.2}
  - model: /m/b
    parameters:
      density: 0.4
parameters:
  normalize: false
  lambda: 0.9
dtype: bfloat16
"""


def test_mergekit_layout():
    r = Recipe.from_yaml(YAML)
    assert r.method == "ties" and r.base == "/m/base"
    assert [m.path for m in r.models] == ["/m/a", "/m/b"]  # the listed base is the base (as mergekit)
    assert [e.path for e in r.entries] == ["/m/base", "/m/a", "/m/b"]  # ... and stays in the user's structure
    gp, mp = r.uniform_values()
    assert mp == [{"weight": 0.5, "density": 0.2}, {"weight": 1.0, "density": 0.4}]
    assert gp == {"normalize": False, "lambda": 0.9, "consensus": "sum"}
    assert r.dtype == "BF16" and r.out_dtype == "BF16" and not r.notes


def test_round_trip_is_stable():
    r = Recipe.from_yaml(YAML)
    text = r.to_yaml()
    again = Recipe.from_yaml(text)
    assert again.uniform_values() == r.uniform_values() and again.out_dtype == r.out_dtype
    assert again.to_yaml() == text


def test_written_recipe_keeps_structure_and_references():
    text = """
merge_method: ties
base_model: ../models/base
slices:
  - sources:
      - {model: ../models/base, layer_range: [0, 4]}
      - model: ./ft-a
        layer_range: [0, 4]
        parameters:
          density: [1, 0.5e-1]
          weight:
            - {filter: self_attn, value: [0.1, 0.9]}
            - {value: 2}
    parameters: {lambda: 0.5}
"""
    r = Recipe.from_yaml(text)
    out = r.to_yaml()
    assert "../models/base" in out and "./ft-a" in out  # as written: not made absolute
    again = Recipe.from_yaml(out)
    assert again.slices == r.slices and again.params == {**r.params, "weight": 1.0, "density": 1.0,
                                                         "normalize": True, "lambda": 1.0, "consensus": "sum"}
    assert "density: [1, 0.05]" in out and "layer_range: [0, 4]" in out
    assert again.to_yaml() == out


@pytest.mark.parametrize("text,value", [("5e-1", 0.5), ("1e3", 1000.0), ("-2E-2", -0.02), ("1.5e+1", 15.0),
                                        (".5e1", 5.0), ("1", 1), ("0.25", 0.25)])
def test_yaml_numbers(text, value):
    r = Recipe.from_yaml(f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {text}}}\n")
    assert r.entries[0].params["weight"] == value and type(r.entries[0].params["weight"]) is type(value)
    assert r.uniform_values()[1][0]["weight"] == float(value)


def test_yaml_booleans_zero_one():
    r = Recipe.from_yaml("merge_method: linear\nmodels: [{model: a}, {model: b}]\nparameters: {normalize: 0}\n")
    assert r.uniform_values()[0] == {"normalize": False}
    with pytest.raises(RecipeError, match="must be true or false, got 2"):
        Recipe.from_yaml("merge_method: linear\nmodels: [{model: a}]\nparameters: {normalize: 2}\n")


BASE_LISTED = "merge_method: {m}\nbase_model: ft1\nmodels:\n  - model: ft1\n{p}  - model: ft2\n"


def test_listed_base_rules():
    # methods with a base: the listed base is the base; its parameters are ignored, with a note
    r = Recipe.from_yaml(BASE_LISTED.format(m="ties", p="    parameters: {weight: 0.3}\n"))
    assert r.base == "ft1" and [m.path for m in r.models] == ["ft2"]
    assert any("parameters of the base model 'ft1' are ignored (weight)" in n for n in r.notes)
    # no base: never dropped, merged as a model (the silent-drop regression of issue 12)
    r = Recipe.from_yaml(BASE_LISTED.format(m="linear", p=""))
    assert r.base is None and [m.path for m in r.models] == ["ft1", "ft2"]
    assert any("merged as one of the models" in n for n in r.notes)
    r = Recipe.from_yaml(BASE_LISTED.format(m="linear", p="").replace("base_model: ft1", "base_model: ./ft1/"))
    assert [m.path for m in r.models] == ["ft1", "ft2"]  # ./ft1/ names ft1
    with pytest.raises(RecipeError, match="linear has no base model, but base_model 'b' is given"):
        Recipe.from_yaml("merge_method: linear\nbase_model: b\nmodels: [{model: a}]\n")


def test_silent_drop_regression_through_the_cli(tmp_path):
    """issue 12: `base_model: ft1, models: [ft1, ft2]` with linear merged ft2 alone."""
    ft1, ft2 = LLAMA / "ft-a", LLAMA / "ft-b"
    (tmp_path / "r.yml").write_text(f"merge_method: linear\nbase_model: {ft1}\nmodels:\n  - model: {ft1}\n"
                                    f"  - model: {ft2}\n")
    proc = npmerge("run", tmp_path / "r.yml", "-o", tmp_path / "out")
    assert "merged as one of the models" in " ".join(proc.stderr.split())
    got, a, b = load_model(tmp_path / "out"), load_model(ft1), load_model(ft2)
    for name in a:
        want = ref.from_f32_bf16(ref.linear([f32(a[name]), f32(b[name])], [1.0, 1.0]))
        assert np.array_equal(got[name].view(np.uint16), want), name


def test_notes_for_harmless_habits():
    r = Recipe.from_yaml("merge_method: task_arithmetic\nbase_model: b\nmodels:\n"
                         "  - {model: a, parameters: {weight: 1, density: 0.5}}\n"
                         "parameters: {int8_mask: true, t: 0.5}\nout_dtype: null\n")
    notes = " | ".join(r.notes)
    assert "'density' is not a parameter of task_arithmetic (it is one of ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear): ignored (model 1 'a')" in notes
    assert "'t' is not a parameter of task_arithmetic (it is one of slerp, nearswap): ignored (top level)" in notes
    assert "out_dtype: null means the default output dtype: each tensor's stored dtype" in notes
    assert "int8_mask" not in notes and r.out_dtype is None  # accepted and changes nothing
    assert "density" not in r.to_yaml().split("parameters:")[1].split("\n")[1]  # dropped from the written recipe


@pytest.mark.parametrize("text,phrase", [
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nfoo: 1\n", "unknown key 'foo'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameter: {lambda: 1}\n",
     "unknown key 'parameter' (did you mean 'parameters'?)"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {densty: 0.5}}]\n",
     "unknown parameter 'densty' in parameters of model 1 'a' (did you mean 'density'?)"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, paramters: {density: 0.5}}]\n",
     "unknown key 'models[0].paramters' (did you mean 'parameters'?)"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {lambda: 0.5}}]\n",
     "'lambda' is a global parameter of ties: it cannot be set per model (model 1 'a')"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {normalize: true}}]\n", "'normalize' is a global"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {t: 0.5}}]\n", "'t' is a global parameter"),
    ("merge_method: ties\nmodels: [{model: a}]\n", "needs a base model"),
    ("merge_method: frankenmerge\nmodels: [{model: a}]\n", "unknown merge method"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: .nan}}]\n", "finite"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: yes}}]\n", "must be a number"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: [1, -0.5]}}]\n",
     "'density' of model 1 'a' (gradient value 2) must be >= 0, got -0.5"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: [1, true]}}]\n",
     "a gradient must be a list of numbers (or of booleans)"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: []}}]\n", "an empty list"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: {filter: mlp}}}]\n",
     "filter entry without 'value'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: [{fitler: mlp, value: 1}]}}]\n",
     "unknown key 'fitler' in a filter entry (did you mean 'filter'?)"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: [{filter: 3, value: 1}]}}]\n",
     "filter must be a non-empty string"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: null}}]\n", "has no value"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {embed_slerp: true}\n",
     "embed_slerp was removed from mergekit in 2024"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {int8_mask: 2}\n", "true or false"),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {normalize: 3}\n", "true or false"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nout_dtype: int8\n", "unsupported output dtype"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ndtype: float64\n", "dtype 'float64' is not supported"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nchat_template: chatlm\n", "unknown chat template 'chatlm'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer_source: base\ntokenizer: {source: base}\n",
     "either tokenizer_source or tokenizer"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer: {source: union, tokens: {x: {}}}\n",
     "tokenizer.tokens (per-token embedding choices) is not supported"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer: {source: base, pad_to_multiple_of: 0}\n",
     "tokenizer.pad_to_multiple_of must be a positive integer, got 0"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer: {pad_to_multiple_of: 8.5}\n",
     "must be a positive integer, got 8.5"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer_source: c\n",
     "tokenizer source 'c' is not one of the merged models"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer: {source: [a]}\n",
     "tokenizer.source must be a path string"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n",
     "either 'models' or 'slices'"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [2, 2]}]}]\n",
     "layer_range must be [first, end] with 0 <= first < end"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]}]\n",
     "passthrough merges exactly 1 model(s) per slice; slice 1 has 2"),
    ("merge_method: linear\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]\n",
     "the sources of slice 1 have different lengths"),
    ("merge_method: linear\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: a, layer_range: [2, 4]}]}]\n",
     "slice 1 lists 'a' twice"),
    ("- just a list\n", "mapping"),
    ("merge_method: [\n", "not valid YAML: line 2, column 1"),
])
def test_recipe_errors(text, phrase):
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text)
    assert phrase in str(err.value)


def test_yaml_errors_point_to_line_and_column():
    text = "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0.5\n"
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text, "r.yml")
    assert str(err.value).startswith("r.yml is not valid YAML: line 6, column 1: expected ',' or '}'")
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml("merge_method: ties\nmodels:\n  - model: a\n    model: b\n", "r.yml")
    assert str(err.value) == ("r.yml is not valid YAML: line 4, column 5: key 'model' is given twice "
                              "(first on line 3)")
    assert err.value.hint == "line 4: 'model: b'"


def test_yaml_merge_keys_and_bounds():
    """`<<: *anchor` merges (keys given beside it win), a key twice beside it is still an
    error; depth and alias expansion are bounded (the bounds themselves are accepted)."""
    text = ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: &p {weight: 1, density: 0.5}\n"
            "  - model: c\n    parameters:\n      <<: *p\n      weight: 0.25\n")
    assert load_yaml(text, "r.yml")["models"][1]["parameters"] == {"weight": 0.25, "density": 0.5}
    with pytest.raises(RecipeError, match="line 10, column 7: key 'weight' is given twice"):
        load_yaml(text + "      weight: 0.5\n", "r.yml")
    assert load_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH, "r.yml") is not None
    with pytest.raises(RecipeError, match=f"nesting deeper than {MAX_DEPTH} levels"):
        load_yaml("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "r.yml")
    tens = "[" + ", ".join(["1"] * 9) + "]"  # 10 values with itself
    bomb = lambda levels: f"x: [&a0 {tens}, " + ", ".join(  # noqa: E731
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)) + "]"
    assert len(repr(load_yaml(bomb(4), "r.yml"))) > 10_000  # 3 + 10 + 90 + 900 + 9,000 values: fine
    with pytest.raises(RecipeError, match=f"aliases expand it to more than {MAX_NODES:,} values"):
        load_yaml(bomb(6), "r.yml")  # over 900,000


@pytest.mark.parametrize("value, text", [
    ("x" * 1000, "'" + "x" * 37 + "..." + "x" * 38 + "'"), (list(range(10**6)), "[0, 1, 2, 3, 4, 5, ...]"), (0.5, "0.5"),
    ({"a": {"b": {"c": {"d": 1}}}}, "{'a': {'b': {'c': {...}}}}"),
])
def test_shown_values_are_short(value, text):
    assert shown(value) == text and len(shown(value)) <= SHOWN


@pytest.mark.parametrize("data", [
    codecs.BOM_UTF8 + "merge_method: ties\n".encode(),
    "merge_method: ties\n".encode("utf-16"),
    codecs.BOM_UTF16_BE + "merge_method: ties\n".encode("utf-16-be"),
    b"merge_method: ties\n",
])
def test_decode_recipe(data):
    assert decode_recipe(data, "r.yml") == "merge_method: ties\n"


def test_cli_per_model_values():
    r = Recipe.from_cli("ties", "b", ["x", "y"], per_model={"weight": [0.3], "density": [0.1, 0.2]})
    assert r.uniform_values()[1] == [{"weight": 0.3, "density": 0.1}, {"weight": 0.3, "density": 0.2}]
    with pytest.raises(RecipeError, match="3 --weight values for 2 models"):
        Recipe.from_cli("ties", "b", ["x", "y"], per_model={"weight": [1, 2, 3]})


def test_tokenizer_settings_round_trip():
    """tokenizer_source and tokenizer: {source, pad_to_multiple_of} survive to_yaml; a block
    without source means union (mergekit's default); the CLI's source must be a merged model."""
    r = Recipe.from_yaml("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\n"
                         "tokenizer: {pad_to_multiple_of: 64}\n")
    assert (r.tokenizer_source, r.pad_to_multiple_of) == ("union", 64)
    assert any("source: union (mergekit's default)" in n for n in r.notes)
    again = Recipe.from_yaml(r.to_yaml())
    assert (again.tokenizer_source, again.pad_to_multiple_of) == ("union", 64)
    r = Recipe.from_yaml("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer: {source: ./a}\n")
    assert r.tokenizer_source == "./a" and "tokenizer_source: ./a" in r.to_yaml()
    cli = Recipe.from_cli("ties", "b", ["x", "y"], tokenizer_source="y/")
    assert cli.tokenizer_source == "y/" and Recipe.from_cli("ties", "b", ["x"], tokenizer_source="b").pad_to_multiple_of is None
    with pytest.raises(RecipeError) as err:
        Recipe.from_cli("ties", "b", ["x", "y"], tokenizer_source="z")
    assert str(err.value) == "--tokenizer-source 'z' is not one of the merged models" and "union" in err.value.hint


# ---------------------------------------------------------- values vs reference

NAMES = ["model.layers.1.self_attn.q_proj.weight", "model.layers.10.mlp.up_proj.weight", "model.norm.weight",
         "model.layers.0.input_layernorm.weight", "lm_head.weight", "model.embed_tokens.weight"]
FILTERS = st.sampled_from(["self_attn", "mlp", "layers.1", "layers.1.", "norm", "*", "embed", "nothing"])
NUMBER = st.one_of(st.floats(-2, 2, allow_nan=False, width=64), st.integers(-3, 3))
GRADIENT = st.lists(NUMBER, min_size=1, max_size=6) | st.lists(st.booleans(), min_size=1, max_size=4)
VALUE = NUMBER | GRADIENT
ENTRY = st.builds(lambda f, v, has: {"filter": f, "value": v} if has else {"value": v}, FILTERS, VALUE, st.booleans())
SETTING = VALUE | st.lists(ENTRY, min_size=1, max_size=4) | ENTRY
T = st.sampled_from([0.0, 1.0, 0.5, 1 / 3, 2 / 3, 0.25, 0.2, 0.6, 1 / 7, 0.999])


@settings(max_examples=400, deadline=None)
@given(setting=SETTING, name=st.sampled_from(NAMES), t=T)
def test_evaluate_matches_reference(setting, name, t):
    got = values.evaluate(values.parse_setting(setting, "x", None), name, t)
    want = ref.evaluate_setting(setting, name, t)
    if want is ref.NO_MATCH:
        assert got is values.NO_MATCH
    else:
        assert got == want and type(got) is type(want)


@settings(max_examples=200, deadline=None)
@given(levels=st.lists(st.none() | SETTING, min_size=1, max_size=3), name=st.sampled_from(NAMES), t=T)
def test_resolve_matches_reference(levels, name, t):
    got = values.resolve([None if s is None else values.parse_setting(s, "x", None) for s in levels], name, t)
    want = ref.resolve_parameter(levels, name, t)
    assert (got is values.NO_MATCH) if want is ref.NO_MATCH else got == want

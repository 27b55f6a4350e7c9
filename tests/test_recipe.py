"""Recipes: mergekit-style YAML in, re-runnable YAML out, errors for what is not supported."""

from __future__ import annotations

import pytest

from npmerge.errors import RecipeError
from npmerge.recipe import Recipe

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
    method, gp, mp = r.resolved()
    assert method.name == "ties" and r.base == "/m/base"
    assert [m.path for m in r.models] == ["/m/a", "/m/b"]  # base listed without parameters: base only
    assert mp == [{"weight": 0.5, "density": 0.2}, {"weight": 1.0, "density": 0.4}]
    assert gp == {"normalize": False, "lambda": 0.9, "consensus": "sum"}
    assert r.out_dtype == "BF16" and r.notes


def test_round_trip_is_stable():
    r = Recipe.from_yaml(YAML)
    text = r.to_yaml()
    again = Recipe.from_yaml(text)
    assert again.resolved()[1:] == r.resolved()[1:] and again.out_dtype == r.out_dtype
    assert again.to_yaml() == text


@pytest.mark.parametrize("text,phrase", [
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nfoo: 1\n", "unknown key 'foo'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: [1, 0.5]}}]\n", "per-layer"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {densty: 0.5}}]\n", "unknown parameter(s) densty"),
    ("merge_method: ties\nmodels: [{model: a}]\n", "needs a base model"),
    ("merge_method: frankenmerge\nmodels: [{model: a}]\n", "unknown merge method"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nslices: []\n", "slice"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: .nan}}]\n", "finite"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: yes}}]\n", "must be a number"),
    ("merge_method: linear\nmodels: [{model: a}]\nparameters: {normalize: 3}\n", "true or false"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nout_dtype: int8\n", "unsupported output dtype"),
    ("- just a list\n", "mapping"),
    ("merge_method: [\n", "not valid YAML"),
])
def test_recipe_errors(text, phrase):
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text)
    assert phrase in str(err.value)


def test_cli_per_model_values():
    r = Recipe.from_cli("ties", "b", ["x", "y"], per_model={"weight": [0.3], "density": [0.1, 0.2]})
    assert r.resolved()[2] == [{"weight": 0.3, "density": 0.1}, {"weight": 0.3, "density": 0.2}]
    with pytest.raises(RecipeError, match="3 --weight values for 2 models"):
        Recipe.from_cli("ties", "b", ["x", "y"], per_model={"weight": [1, 2, 3]})

"""The sparsifier family end to end: the CLI and mergekit-layout recipes on the bundled
BF16 fixture against tests/reference.py bit for bit, the seed in the report, card and
re-runnable recipe, byte-identical output for 1 or 2 threads and any --max-memory, and
bad input refused with Error:/Hint:, exit code 2 and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference as ref
from helpers import LLAMA, f32, load_model, npmerge, tree_bytes

BASE = LLAMA / "base"
FTS = [LLAMA / "ft-a", LLAMA / "ft-b", LLAMA / "ft-c"]

# docs/semantics.md §B: method -> (sparsifier, consensus, normalize, rescale)
TABLE = {
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
    "breadcrumbs": ("outliers", None, False, False),
    "breadcrumbs_ties": ("outliers", "sum", False, False),
    "della": ("della", "sum", True, True),
    "della_linear": ("della", None, False, True),
}


def assert_matches_reference(out, method, weights, densities, *, gammas=None, epsilons=None, seed=0, lam=1.0,
                             models=FTS, **override):
    sparsifier, consensus, normalize, rescale = TABLE[method]
    got = load_model(out)
    base = load_model(BASE)
    fts = [load_model(p) for p in models]
    assert set(got) == set(base)
    for name, b in base.items():
        want = ref.task_family(f32(b), [f32(m[name]) for m in fts], weights=weights, densities=densities,
                               sparsifier=sparsifier, consensus=override.get("consensus", consensus),
                               normalize=override.get("normalize", normalize),
                               rescale=override.get("rescale", rescale), lam=lam, gammas=gammas, epsilons=epsilons,
                               seed=seed, name=name)
        assert np.array_equal(got[name].view(np.uint16), ref.from_f32_bf16(want)), name


@pytest.fixture(scope="module")
def dare_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dare") / "merged"
    npmerge("dare-ties", BASE, *FTS, "--density", "0.5", "--seed", "7", "-w", "1", "-w", "0.6", "-w", "0.8",
            "-o", out)
    return out


def test_dare_ties_cli_equals_reference(dare_out):
    assert_matches_reference(dare_out, "dare_ties", [1.0, 0.6, 0.8], [0.5] * 3, seed=7)


def test_seed_is_recorded_and_the_recipe_reproduces_the_merge(dare_out, tmp_path):
    report = json.loads((dare_out / "merge_report.json").read_text())
    assert report["method"] == "dare_ties" and report["parameters"]["seed"] == 7
    assert report["parameters"]["rescale"] is True and report["parameters"]["consensus"] == "sum"
    assert "seed: 7" in (dare_out / "npmerge_recipe.yml").read_text()
    assert "seed: 7" in (dare_out / "README.md").read_text()
    assert "arxiv.org/abs/2311.03099" in (dare_out / "README.md").read_text()
    again = tmp_path / "again"
    npmerge("run", dare_out / "npmerge_recipe.yml", "-o", again)
    assert tree_bytes(again) == tree_bytes(dare_out)


def test_dare_statistics_match_reference(dare_out):
    """kept = the counted kept elements over all tensors; a rescale factor per model."""
    report = json.loads((dare_out / "merge_report.json").read_text())
    base = load_model(BASE)
    fts = [load_model(p) for p in FTS]
    kept, n = np.zeros(3), 0
    for name, b in base.items():
        stats = ref.task_family_stats(f32(b), [f32(m[name]) for m in fts], densities=[0.5] * 3, sparsifier="random",
                                      seed=7, name=name)
        kept += [s["kept"] for s in stats]
        n += b.size
        for i, m in enumerate(report["tensors"][name]["models"]):
            assert m["kept"] == stats[i]["kept"] / b.size and m["rescale"] > 1
    for i, m in enumerate(report["totals"]["models"]):
        assert m["kept"] == pytest.approx(kept[i] / n, rel=1e-12) and 1.9 < m["rescale"] < 2.1
    assert 0 < report["totals"]["sign_conflict"] < 1


RECIPES = {
    "dare_linear": ("parameters: {weight: 0.7, density: 0.4}", "parameters: {weight: 0.5, density: 0.9}",
                    "  normalize: true\n  rescale: inverse\n  seed: 18446744073709551615\n",
                    dict(weights=[0.7, 0.5], densities=[0.4, 0.9], seed=2**64 - 1, normalize=True,
                         rescale="inverse")),
    "breadcrumbs": ("parameters: {weight: 1.0, density: 0.6, gamma: 0.05}",
                    "parameters: {weight: 0.5, density: 0.8}", "  lambda: 0.8\n",
                    dict(weights=[1.0, 0.5], densities=[0.6, 0.8], gammas=[0.05, 0.01], lam=0.8)),
    "breadcrumbs_ties": ("parameters: {weight: 1.0, density: 0.7, gamma: 0.0}",
                         "parameters: {weight: 1.0, density: 0.5, gamma: 0.2}", "  rescale: true\n  normalize: 1\n",
                         dict(weights=[1.0, 1.0], densities=[0.7, 0.5], gammas=[0.0, 0.2], rescale=True,
                              normalize=True)),
    "della": ("parameters: {weight: 0.6, density: 0.5, epsilon: 0.1}", "parameters: {weight: 0.4, density: 0.3}",
              "  seed: 3\n  int8_mask: true\n  consensus: count\n",
              dict(weights=[0.6, 0.4], densities=[0.5, 0.3], epsilons=[0.1, 0.15], seed=3, consensus="count")),
    "della_linear": ("parameters: {weight: 0.6, density: 0.5, epsilon: 0.4}", "parameters: {weight: 0.4, density: 1}",
                     "  rescale: false\n", dict(weights=[0.6, 0.4], densities=[0.5, 1.0], epsilons=[0.4, 0.15],
                                                rescale=False)),
}


@pytest.mark.parametrize("method", list(RECIPES))
def test_recipes_in_mergekit_layout(method, tmp_path):
    first, second, params, expect = RECIPES[method]
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: {method}\nbase_model: {BASE}\nmodels:\n"
                      f"  - model: {FTS[0]}\n    {first}\n  - model: {FTS[1]}\n    {second}\n"
                      f"parameters:\n{params}dtype: bfloat16\n")
    npmerge("run", recipe, "-o", tmp_path / "out")
    assert_matches_reference(tmp_path / "out", method, models=FTS[:2], **expect)


def test_breadcrumbs_and_della_from_the_cli(tmp_path):
    npmerge("breadcrumbs", BASE, *FTS, "-d", "0.5", "--gamma", "0.1", "--gamma", "0", "--gamma", "0.3",
            "-o", tmp_path / "b")
    assert_matches_reference(tmp_path / "b", "breadcrumbs", [1.0] * 3, [0.5] * 3, gammas=[0.1, 0.0, 0.3])
    npmerge("della", BASE, *FTS, "-d", "0.4", "--epsilon", "0.2", "--seed", "11", "--lambda", "1.5",
            "-o", tmp_path / "d")
    assert_matches_reference(tmp_path / "d", "della", [1.0] * 3, [0.4] * 3, epsilons=[0.2] * 3, seed=11, lam=1.5)


@pytest.mark.parametrize("args,budget", [(("dare-ties", "-d", "0.3", "--seed", "5"), "4MiB"),
                                         (("della-linear", "-d", "0.6", "--epsilon", "0.3"), "4MiB"),
                                         (("breadcrumbs-ties", "-d", "0.5", "--gamma", "0.02",
                                           "--rescale", "true"), "9MiB")])
def test_same_bytes_for_threads_and_budgets(args, budget, tmp_path):
    """NUMBA_NUM_THREADS=1 with the default budget and 2 threads with spans smaller than
    the largest tensor (65536 elements) write the same bytes."""
    method, *opts = args
    plan = json.loads(npmerge(method, BASE, *FTS, *opts, "--max-memory", budget, "--threads", "2", "--dry-run",
                              "--json", "-o", tmp_path / "x").stdout)
    assert plan["span_elements"] < 65536
    npmerge(method, BASE, *FTS, *opts, "-o", tmp_path / "one", env={"NUMBA_NUM_THREADS": "1"})
    npmerge(method, BASE, *FTS, *opts, "--max-memory", budget, "-o", tmp_path / "two", env={"NUMBA_NUM_THREADS": "2"})
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_parameter_of_another_method_is_a_warning(tmp_path):
    """docs/recipes.md: `gamma` in dare_ties (breadcrumbs' parameter) is ignored with a note;
    `int8_mask` is accepted and changes nothing."""
    body = f"merge_method: dare_ties\nbase_model: {BASE}\nmodels:\n  - model: {FTS[0]}\n    parameters: " \
           "{{weight: 1, density: 0.5{}}}\nparameters: {{seed: 1{}}}\n"
    (tmp_path / "plain.yml").write_text(body.format("", ""))
    (tmp_path / "extra.yml").write_text(body.format(", gamma: 0.1", ", epsilon: 0.2, int8_mask: true"))
    npmerge("run", tmp_path / "plain.yml", "-o", tmp_path / "plain")
    res = npmerge("run", tmp_path / "extra.yml", "-o", tmp_path / "extra")
    notes = json.loads((tmp_path / "extra" / "merge_report.json").read_text())["notes"]
    assert any("'gamma' is not a parameter of dare_ties" in n and "breadcrumbs" in n for n in notes), notes
    assert any("'epsilon' is not a parameter of dare_ties" in n and "della" in n for n in notes), notes
    assert "gamma" in res.stderr
    got, want = load_model(tmp_path / "extra"), load_model(tmp_path / "plain")
    assert all(np.array_equal(got[k].view(np.uint16), want[k].view(np.uint16)) for k in want)


def _yaml(method, model_params="{weight: 1, density: 0.5}", params=""):
    return f"merge_method: {method}\nbase_model: {BASE}\nmodels:\n  - model: {FTS[0]}\n    parameters: " \
           f"{model_params}\n" + (f"parameters: {params}\n" if params else "")


BAD = [
    (("dare-ties", "-d", "-0.5"), "'density' of model 1", "fraction of each task vector kept"),
    (("dare-linear", "--seed", "18446744073709551616"), "parameter 'seed' must be in [0, 2**64)", "integer"),
    (("della", "--seed", "-1"), "parameter 'seed' must be in [0, 2**64), got -1", "integer"),
    (("breadcrumbs", "--gamma", "1.5"), "'gamma' of model 1", "outliers"),
    (("breadcrumbs-ties", "--gamma", "-0.01"), "must be a number in [0, 1], got -0.01", "outliers"),
    (("della", "-d", "0.1"), "'epsilon' 0.15 of model 1", "choose epsilon < 0.1"),
    (("della-linear", "-d", "0.9", "--epsilon", "0.1"), "density + epsilon < 1", "choose epsilon < 0.1"),
    (("della-linear", "--epsilon", "-0.1"), "'epsilon' of model 1", "spread"),
    (("dare-ties", "--gamma", "0.1"), "No such option: --gamma", "--help"),
    (("breadcrumbs", "--rescale", "inverse"), "Invalid value for '--rescale'", "--help"),
    (_yaml("breadcrumbs", params="{rescale: inverse}"), "parameter 'rescale' 'inverse' needs a keep probability",
     "rescale: true"),
    (_yaml("dare_ties", params="{rescale: maybe}"), "parameter 'rescale' must be one of", "inverse"),
    (_yaml("dare_ties", params="{seed: 1.5}"), "parameter 'seed' must be an integer, got 1.5", "integer"),
    (_yaml("della", params="{seed: 18446744073709551616}"), "must be in [0, 2**64)", "integer"),
    (_yaml("breadcrumbs", "{weight: 1, density: 0.5, gamma: 2}"), "'gamma' of model 1", "outliers"),
    (_yaml("della_linear", "{weight: 1, density: 0.2, epsilon: 0.3}"), "DELLA needs density - epsilon > 0",
     "choose epsilon < 0.2"),
    (_yaml("dare_linear", "{weight: 1, density: 0.5, lambda: 2}"), "'lambda' is a global parameter of dare_linear",
     "top-level"),
    (_yaml("della", "{weight: 1, density: 0.5, seed: 2}"), "'seed' is a global parameter of della", "top-level"),
    (_yaml("breadcrumbs", "{weight: 1, density: 0.5, gama: 0.1}"), "unknown parameter 'gama'", "gamma"),
]


@pytest.mark.parametrize("case", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_refused(case, tmp_path):
    given, phrase, hint = case
    if isinstance(given, str):
        (tmp_path / "r.yml").write_text(given)
        args = ["run", tmp_path / "r.yml"]
    else:
        args = [given[0], BASE, FTS[0], *given[1:]]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = npmerge(*args, "-o", tmp_path / "out", check=False)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("Error: ") and phrase in lines[0], res.stderr
    assert any(line.startswith("Hint: ") and hint in line for line in lines), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"

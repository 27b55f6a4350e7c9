"""`npmerge inspect` (issue 24 §1): its figures against a plain NumPy computation on the
fixtures (tests/reference.py), its refusals, and its plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import reference as ref
from helpers import LLAMA, f32, load_model
from test_cli_habits import cli

MODELS = [LLAMA / "base", LLAMA / "ft-a", LLAMA / "ft-b", LLAMA / "ft-c"]


@pytest.fixture(scope="module")
def inspected():
    proc = cli("inspect", *MODELS, "-d", "0.2", "-d", "0.5", "-d", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def taus():
    base, *models = (load_model(p) for p in MODELS)
    return {name: (f32(b), [f32(m[name]) for m in models]) for name, b in base.items()}


def _gram(taus, names):
    n = 3
    return np.array([[math.fsum(ref.dot(taus[t][1][i] - taus[t][0], taus[t][1][j] - taus[t][0]) for t in names)
                      for j in range(n)] for i in range(n)])


def test_norms_and_cosines_match_numpy_per_tensor_layer_and_model(inspected, taus):
    assert [m.split("/")[-1] for m in inspected["models"]] == ["ft-a", "ft-b", "ft-c"] and inspected["densities"] == [0.2, 0.5, 1.0]
    groups = {"all": list(taus), "0": [t for t in taus if ".layers.0." in t],
              "other": [t for t in taus if ".layers." not in t]}
    for label, names in groups.items():
        got = inspected["total"] if label == "all" else inspected["layers"][label]
        gram = _gram(taus, names)
        numel = sum(taus[t][0].size for t in names)
        assert got["numel"] == numel
        for i in range(3):
            assert got["l2"][i] == pytest.approx(math.sqrt(gram[i, i]), rel=1e-14)
            assert got["rms"][i] == pytest.approx(math.sqrt(gram[i, i] / numel), rel=1e-14)
            for j in range(3):
                want = gram[i, j] / math.sqrt(gram[i, i] * gram[j, j])
                assert got["cosine"][i][j] == pytest.approx(want, rel=1e-12, abs=1e-15), (label, i, j)
        assert got["unchanged"] == [[], [], []]
    name = "model.layers.1.mlp.up_proj.weight"
    gram = _gram(taus, [name])
    assert inspected["tensors"][name]["cosine"][0][2] == pytest.approx(gram[0, 2] / math.sqrt(gram[0, 0] * gram[2, 2]),
                                                                         rel=1e-12)


def test_sign_conflicts_match_the_ties_reference_at_each_density(inspected, taus):
    excluded, kept = np.zeros((3, 3)), np.zeros((3, 3))
    for name, (b, ms) in taus.items():
        got = inspected["tensors"][name]
        for k, d in enumerate(inspected["densities"]):
            want = ref.ties_stats(b, ms, [1.0] * 3, [d] * 3)
            assert got["sign_conflict_by_density"][k] == want["sign_conflict"], (name, d)
            for i in range(3):
                assert got["excluded_by_density"][i][k] == want["models"][i]["excluded"], (name, d, i)
            _, masks, us, s = ref._ties_core(b, ms, [1.0] * 3, [d] * 3, "sum")
            for i in range(3):
                nonzero = masks[i] & (us[i] != 0)
                kept[i, k] += nonzero.sum()
                excluded[i, k] += (nonzero & (np.sign(us[i]) != s)).sum()
    total = inspected["total"]
    np.testing.assert_array_equal(np.array(total["excluded_by_density"]), excluded / kept)
    assert total["sign_conflict"] == total["sign_conflict_by_density"][-1] > 0


def test_an_unchanged_tensor_is_named(tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    for name in ("base", "ft-a", "ft-b"):
        shutil.copytree(LLAMA / name, tmp_path / name)
    shard = sorted((tmp_path / "ft-a").glob("*.safetensors"))[0]
    base_shard = tmp_path / "base" / shard.name
    tensors = load_file(str(shard))
    same = sorted(tensors)[0]
    tensors[same] = load_file(str(base_shard))[same]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    proc = cli("inspect", tmp_path / "base", tmp_path / "ft-a", tmp_path / "ft-b", "-d", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["total"]["unchanged"] == [[same], []]
    proc = cli("inspect", tmp_path / "base", tmp_path / "ft-a", tmp_path / "ft-b", "-d", "1")
    assert proc.returncode == 0 and "unchanged tensors" in proc.stdout and "by layer" in proc.stdout


def test_bad_inputs_get_clear_errors(tmp_path):
    proc = cli("inspect", MODELS[0], MODELS[1])
    assert proc.returncode == 2 and "at least two models, got 1" in proc.stderr
    proc = cli("inspect", MODELS[0], MODELS[1], LLAMA.parent / "tiny-vocab" / "ft-chat")
    assert proc.returncode == 4 and "does not match base" in proc.stderr  # the merge's own refusal
    proc = cli("inspect", *MODELS, "-d", "0")
    assert proc.returncode == 2 and "--density must be in (0, 1]" in proc.stderr
    proc = cli("inspect", *MODELS, "--plot", tmp_path / "x.pdf")
    assert proc.returncode == 2 and "must end in .png or .svg" in proc.stderr


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_plot(tmp_path, suffix, magic):
    out = tmp_path / f"fine-tunes{suffix}"
    proc = cli("inspect", *MODELS[:3], "-d", "0.5", "-d", "1", "--plot", out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(magic)

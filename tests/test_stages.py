"""Multi-stage recipes (npmerge/stages.py, issue 21): several YAML documents run in
dependency order; each stage's output equals `npmerge run` of that document alone, its
stage names replaced by their directories; an existing stage is reused only while its
recipe and inputs are unchanged; cycles, unknown or repeated names are errors that
leave nothing behind; --dry-run plans what it can and creates nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import LLAMA, npmerge, tree_bytes
from safety_helpers import litter, run

B, FA, FB, FC = (LLAMA / n for n in ("base", "ft-a", "ft-b", "ft-c"))


def stage_a(base=B, name="stage-a"):
    return (f"name: {name}\nmerge_method: ties\nbase_model: {base}\nmodels:\n  - model: {FA}\n"
            f"    parameters: {{density: 0.5}}\n  - model: {FB}\n    parameters: {{density: 0.5}}\n")


STAGE_B = f"name: stage-b\nmerge_method: nearswap\nbase_model: {B}\nmodels:\n  - model: {FC}\nparameters: {{t: 0.001}}\n"
FINAL = "merge_method: slerp\nbase_model: stage-b\nmodels:\n  - model: stage-a\nparameters: {t: 0.3}\n"


def write(tmp_path, *docs, name="stages.yml"):
    path = tmp_path / name
    path.write_text("---\n".join(docs))
    return path


def weights(folder):
    return {k: v for k, v in tree_bytes(folder).items() if k.endswith(".safetensors")}


def test_stages_equal_runs_by_hand(tmp_path):
    """The final stage first in the file: the order follows the dependencies."""
    recipe = write(tmp_path, FINAL, stage_a(), STAGE_B)
    out, inter = tmp_path / "out", tmp_path / "inter"
    res = npmerge("run", recipe, "-o", out, "--intermediate-dir", inter, "--json")
    report = json.loads(res.stdout)
    assert report["stages"] == [{"stage": "stage-a", "method": "ties", "reused": False},
                                {"stage": "stage-b", "method": "nearswap", "reused": False}]
    assert "- `stage-a`: ties" in (out / "README.md").read_text()
    by_hand = tmp_path / "by-hand"
    by_hand.mkdir()
    for text, name in [(stage_a(), "stage-a"), (STAGE_B, "stage-b")]:
        single = write(tmp_path, text.split("\n", 1)[1], name=f"{name}.yml")
        npmerge("run", single, "-o", by_hand / name)
        assert tree_bytes(by_hand / name) == tree_bytes(inter / name)
    final = FINAL.replace("stage-b", str(inter / "stage-b")).replace("stage-a", str(inter / "stage-a"))
    npmerge("run", write(tmp_path, final, name="final.yml"), "-o", by_hand / "final")
    assert weights(by_hand / "final") == weights(out)
    assert (by_hand / "final" / "npmerge_recipe.yml").read_text() == (out / "npmerge_recipe.yml").read_text()


def test_reuse_only_while_unchanged(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(B, base)
    recipe = write(tmp_path, stage_a(base), STAGE_B, FINAL)
    out = tmp_path / "out"
    npmerge("run", recipe, "-o", out)  # stages in out.stages beside out
    first = tree_bytes(tmp_path / "out.stages" / "stage-a")
    res = npmerge("run", recipe, "-o", out, "--force")
    assert "stage 'stage-a': " in res.stderr and "reused (same recipe, inputs unchanged)" in res.stderr
    assert json.loads((out / "merge_report.json").read_text())["stages"][0]["reused"] is True
    shard = next(base.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the input changed
    res = npmerge("run", recipe, "-o", out, "--force")
    assert "stage 'stage-a': " in res.stderr and "is out of date (an input changed since): merged again" in res.stderr
    assert "stage 'stage-b': " in res.stderr and "stage-b reused" in res.stderr
    write(tmp_path, stage_a(base).replace("0.5", "0.4"), STAGE_B, FINAL)
    res = npmerge("run", recipe, "-o", out, "--force")
    assert "is out of date (its recipe differs): merged again" in res.stderr
    assert tree_bytes(tmp_path / "out.stages" / "stage-a") != first


@pytest.mark.parametrize("docs,phrase", [
    ((stage_a().replace(f"base_model: {B}", "base_model: stage-b"), STAGE_B.replace(f"base_model: {B}",
                                                                                    "base_model: stage-a"), FINAL),
     "stages 'stage-a', 'stage-b' read each other's outputs (a cycle)"),
    ((stage_a(), STAGE_B, FINAL.replace("stage-a", "stage-c")), "document 3: model 'stage-c' names no stage"),
    ((stage_a(), stage_a(), FINAL), "two stages are named 'stage-a' (documents 1 and 2)"),
    ((stage_a(), STAGE_B.replace("name: stage-b\n", ""), FINAL), "documents 2, 3 have no name"),
    (("name: stage-f\n" + FINAL.replace("stage-b", str(B)), stage_a()),
     "stage 'stage-f' read(s) the final stage 'stage-a', which is written to -o OUT"),
], ids=["cycle", "unknown-name", "same-name", "two-unnamed", "final-read"])
def test_refused(docs, phrase, tmp_path, monkeypatch):
    recipe = write(tmp_path, *docs)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = run("run", recipe, "-o", work / "out")
    assert res.code == 2 and res.first.startswith("Error: ") and phrase in res.first, res.err
    assert os.listdir(work) == [] and litter(work) == []


def test_dry_run_creates_nothing(tmp_path, monkeypatch):
    recipe = write(tmp_path, stage_a(), STAGE_B, FINAL)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = run("run", recipe, "-o", work / "out", "--dry-run")
    assert res.code == 0, res.err
    assert "npmerge plan: ties -> " in res.out and "npmerge plan: nearswap -> " in res.out
    assert "merged after stage-a, stage-b (planned once they exist)" in res.out
    assert os.listdir(work) == []

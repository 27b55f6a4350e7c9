"""`npmerge verify OUT [--recompute]`: a merge's output against its report and a re-run of its
recipe (issue 24 §2): exit 0 when all matches, 6 when a file differs or is missing, 3 when
OUT is not a merge or its report is damaged, 4 when an input changed since the merge."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import LLAMA, f32
from test_cli_habits import cli
from test_hub import C1, C2, C3, add_snapshot, model_files

MERGE = ("ties", "base", "ft-a", "ft-b", "--density", "0.3")


@pytest.fixture
def merged(tmp_path):
    """A TIES merge of copies of the tiny Llama fixtures, run from tmp_path with relative
    paths (as the recipe then names them), into tmp_path/out."""
    for name in ("base", "ft-a", "ft-b"):
        shutil.copytree(LLAMA / name, tmp_path / name)
    proc = cli(*MERGE, "-o", "out", "--shard-size", "200KB", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return tmp_path


def verify(work, *args, **kw):
    return cli("verify", *args, cwd=work, **kw)


def test_an_untouched_merge_verifies_against_its_report_and_its_recipe(merged):
    report = json.loads((merged / "out" / "merge_report.json").read_text())
    assert report["output"] == {"shard_size": 200_000}
    assert [i["name"] for i in report["inputs"]] == ["base", "ft-a", "ft-b"]
    assert all(f["file"].endswith(".safetensors") and len(f["header_sha256"]) == 64
               for i in report["inputs"] for f in i["files"])
    assert "/" not in json.dumps(report["inputs"])  # no path of this machine in a published report
    proc = verify(merged, "out")
    assert proc.returncode == 0, proc.stderr
    n = len(report["files"])
    assert f"verified: {n} files of out match merge_report.json" in proc.stdout
    # the re-run: another budget, one thread, the report's shard size; every byte equal, the report too
    proc = verify(merged, "out", "--recompute", "--max-memory", "4MiB", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["ok"] and verdict["recomputed"] and "merge_report.json" in verdict["matched"]
    assert len(verdict["matched"]) == n + 1 and not verdict["differ"] and not verdict["missing"]
    assert not list(merged.glob(".npmerge-verify-*"))  # the scratch merge is gone


def test_changed_missing_and_added_files_are_named(merged):
    out = merged / "out"
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # same size, one bit of a weight flipped
    shard.write_bytes(bytes(data))
    (out / "tokenizer.json").unlink()
    with open(out / "config.json", "a") as f:
        f.write(" ")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    proc = verify(merged, "out")
    assert proc.returncode == 6
    assert f"  {shard.name}: sha256 differs from the report's" in proc.stderr
    assert "  tokenizer.json: missing" in proc.stderr
    assert "  config.json: " in proc.stderr and "the report says" in proc.stderr
    assert "not part of the merge: .gitattributes" in proc.stdout
    verdict = json.loads(verify(merged, "out", "--json").stdout)  # one JSON document: the verdict
    assert verdict["missing"] == ["tokenizer.json"] and len(verdict["differ"]) == 2
    assert verdict["extra"] == [".gitattributes"] and not verdict["ok"]
    # an added file alone is not a failure
    shutil.rmtree(out)
    assert cli(*MERGE, "-o", "out", "--shard-size", "200KB", "-q", cwd=merged).returncode == 0
    (out / "notes.txt").write_text("mine")
    proc = verify(merged, "out")
    assert proc.returncode == 0 and "not part of the merge: notes.txt" in proc.stdout


def test_recompute_names_a_changed_input_and_catches_changed_data(merged):
    ft = sorted((merged / "ft-a").glob("*.safetensors"))[0]
    tensors = load_file(str(ft))
    # same names, shapes and dtypes (the same header): only a byte-for-byte re-run sees it
    name = sorted(tensors)[0]
    tensors[name] = np.ascontiguousarray(tensors[name][::-1])
    save_file(tensors, str(ft), metadata={"format": "pt"})
    proc = verify(merged, "out", "--recompute")
    assert proc.returncode == 6, proc.stderr
    assert "differs from a re-run of its recipe" in proc.stderr and "model-" in proc.stderr
    # another dtype: the header (and size) the report recorded no longer match: named, not used
    save_file({k: f32(v) for k, v in tensors.items()}, str(ft), metadata={"format": "pt"})
    proc = verify(merged, "out", "--recompute")
    assert proc.returncode == 4
    assert "the inputs changed since the merge:" in proc.stderr and f"ft-a: {ft.name}: size changed" in proc.stderr
    assert not list(merged.glob(".npmerge-verify-*"))


def test_recompute_from_another_directory_says_where_to_run_it(merged, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = verify(elsewhere, merged / "out", "--recompute")
    assert proc.returncode == 3
    assert "Error: model path 'base' does not exist" in proc.stderr
    assert "run verify --recompute from that directory" in proc.stderr


@pytest.mark.parametrize("damage, message", [
    ("not json", "merge_report.json is not valid JSON"),
    (json.dumps({"files": {"../escape": {"size": 1, "sha256": "0" * 64}}}), "bad entry for file '../escape'"),
    (json.dumps({"files": {"config.json": {"size": "668", "sha256": "0" * 64}}}), "bad entry for file 'config.json'"),
    (json.dumps({"method": "ties"}), "is not an npmerge merge report (no 'files' table)"),
])
def test_a_damaged_report_is_refused(merged, damage, message):
    (merged / "out" / "merge_report.json").write_text(damage)
    proc = verify(merged, "out")
    assert proc.returncode == 3 and message in proc.stderr, proc.stderr


def test_what_is_not_a_merge_is_refused(tmp_path):
    proc = verify(tmp_path, LLAMA / "base")
    assert proc.returncode == 3 and "is not an npmerge output: it has no merge_report.json" in proc.stderr
    proc = verify(tmp_path, LLAMA / "base" / "config.json")
    assert proc.returncode == 3 and "is not a merge output directory (a file)" in proc.stderr
    proc = verify(tmp_path, "no/such-merge")
    assert proc.returncode == 3 and "no/such-merge" in proc.stderr
    proc = verify(tmp_path, "./missing")
    assert proc.returncode == 3 and "'./missing' does not exist" in proc.stderr


def test_a_downloaded_merge_verifies_by_hub_id(tmp_path):
    """Inputs and the merge itself from a Hugging Face cache: verify by id, re-run by id."""
    cache = tmp_path / "hf-cache"
    add_snapshot(cache, "meta/base", C1, model_files(LLAMA / "base"), refs=("main",))
    add_snapshot(cache, "team/ft-a", C2, model_files(LLAMA / "ft-a"), refs=("main",))
    add_snapshot(cache, "team/ft-b", C3, model_files(LLAMA / "ft-b"), refs=("main",))
    env = {"HF_HUB_CACHE": str(cache)}
    proc = cli("ties", "meta/base", "team/ft-a", "team/ft-b", "-d", "0.3", "-o", tmp_path / "made", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    files = model_files(tmp_path / "made")
    add_snapshot(cache, "team/merged", "c" * 40, {**files, ".gitattributes": b"*.safetensors filter=lfs\n"},
                 refs=("main",))
    proc = verify(tmp_path, "team/merged", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "not part of the merge: .gitattributes" in proc.stdout
    proc = verify(tmp_path, "team/merged", "--recompute", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "match a re-run of npmerge_recipe.yml" in proc.stdout
    assert not list((cache / "models--team--merged").rglob(".npmerge-verify-*"))  # nothing written into the cache

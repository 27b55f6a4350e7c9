"""Model references (npmerge.io.hub): Hub ids resolved offline from a Hugging Face cache
layout built here (refs/, snapshots/<commit>/ symlinks into blobs/, as huggingface_hub
writes it), local paths and their names, the download path against a fake
huggingface_hub (no network), model-card metadata and `--version` text."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, ROOT

from npmerge.errors import InvalidCheckpoint
from npmerge.io import hub
from npmerge.io.hub import ModelRef, card_metadata, card_yaml, hub_cache_dir, resolve_model

BASE = FIXTURES / "tiny-llama" / "base"
FT_A = FIXTURES / "tiny-llama" / "ft-a"
C1 = hashlib.sha1(b"commit one").hexdigest()
C2 = hashlib.sha1(b"commit two").hexdigest()
C3 = hashlib.sha1(b"commit three").hexdigest()
HUB_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE")


# -- a Hugging Face cache, built the way huggingface_hub lays it out ----------------------
def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> Path:
    """models--org--name/{blobs/<sha256>, snapshots/<commit>/<name> -> ../../blobs/<sha256>, refs/<ref>}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    snapshot.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the bare hash, no newline
    return snapshot


def model_files(src: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file()}


def tensor_names(model_dir: Path) -> set[str]:
    """Tensor names read with the official safetensors library, from the fixture itself."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            names.update(st.keys())
    return names


@pytest.fixture
def cache(tmp_path, monkeypatch):
    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)
    return root


@pytest.fixture
def no_hub(monkeypatch):
    """huggingface_hub not importable (None in sys.modules makes `import` raise ImportError)
    nor installed as far as the fetch command's spelling goes."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.setattr(hub, "_installed_version", lambda dist: None)


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: filters a 'remote' repo's file list
    with fnmatch on allow_patterns (what huggingface_hub's filter_repo_objects does) and
    writes the matches into the cache layout; records every call."""

    def __init__(self, cache: Path, repo_id: str, commit: str, files: dict[str, bytes], branch: str = "main"):
        self.cache, self.repo_id, self.commit, self.files, self.branch = cache, repo_id, commit, files, branch
        self.calls: list[dict] = []
        self.error: Exception | None = None

    def snapshot_download(self, repo_id, *, revision=None, cache_dir=None, allow_patterns=None):
        self.calls.append({"repo_id": repo_id, "revision": revision, "cache_dir": cache_dir,
                           "allow_patterns": list(allow_patterns)})
        if self.error is not None:
            raise self.error
        assert repo_id == self.repo_id and revision in (None, self.branch, self.commit)
        picked = {n: d for n, d in self.files.items() if any(fnmatch.fnmatch(n, p) for p in allow_patterns)}
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / self.commit
        for name, data in picked.items():
            if not (snapshot / name).exists():
                add_snapshot(Path(cache_dir), repo_id, self.commit, {name: data})
        snapshot.mkdir(parents=True, exist_ok=True)
        if revision != self.commit:
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / (revision or "main")).write_text(self.commit)
        return str(snapshot)

    def install(self, monkeypatch):
        module = types.ModuleType("huggingface_hub")
        module.snapshot_download = self.snapshot_download
        monkeypatch.setitem(sys.modules, "huggingface_hub", module)
        return self


# -- cache location -------------------------------------------------------------------
def test_cache_dir_precedence_follows_huggingface_hub_constants(tmp_path, monkeypatch):
    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", "~/hfhome")  # ~ expanded, as huggingface_hub does
    assert hub_cache_dir() == tmp_path / "home" / "hfhome" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub_cache_dir() == tmp_path / "new"


def test_hf_home_is_used_when_no_cache_variable(tmp_path, monkeypatch, no_hub):
    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    snapshot = add_snapshot(tmp_path / "hfhome" / "hub", "org/base", C1, model_files(BASE), refs=("main",))
    ref = resolve_model("org/base", cwd=tmp_path)
    assert ref.path == snapshot and ref.commit == C1


def test_offline_flag_reads_like_huggingface_hub(monkeypatch):
    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    assert not hub.hub_offline()
    for value, expected in (("1", True), ("yes", True), ("On", True), ("TRUE", True), ("0", False), ("no", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.hub_offline() is expected, value
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub.hub_offline()


# -- resolution by id -------------------------------------------------------------------
def test_id_resolves_to_main_snapshot_which_checkpoint_opens(cache, no_hub):
    from npmerge.io.checkpoint import Checkpoint

    snapshot = add_snapshot(cache, "org/base", C1, model_files(BASE), refs=("main",))
    ref = resolve_model("org/base")
    assert ref == ModelRef(path=snapshot, name="org/base", hub_id="org/base", revision=None, commit=C1, notes=())
    assert str(ref) == "org/base"
    assert all(os.path.islink(p) for p in snapshot.iterdir())  # really the blob-symlink layout
    ck = Checkpoint(ref.path)
    try:
        assert set(ck.tensors) == tensor_names(BASE)
        index = json.loads((BASE / "model.safetensors.index.json").read_text())
        assert ck.total_bytes == index["metadata"]["total_size"]
    finally:
        ck.close()


def test_branch_tag_pr_and_commit_revisions(cache, no_hub):
    s1 = add_snapshot(cache, "org/m", C1, model_files(BASE), refs=("v1.0", "dev"))
    s2 = add_snapshot(cache, "org/m", C2, model_files(FT_A), refs=("main", "refs/pr/1"))
    cases = {"org/m": (s2, None, C2), "org/m@main": (s2, "main", C2), "org/m@v1.0": (s1, "v1.0", C1),
             "org/m@dev": (s1, "dev", C1), "org/m@refs/pr/1": (s2, "refs/pr/1", C2),
             f"org/m@{C1}": (s1, C1, C1), f"org/m@{C2.upper()}": (s2, C2.upper(), C2)}
    for text, (path, revision, commit) in cases.items():
        ref = resolve_model(text)
        assert (ref.path, ref.name, ref.hub_id, ref.revision, ref.commit) == (path, text, "org/m", revision, commit)
        assert ref.notes == ()
    assert tensor_names(resolve_model("org/m@v1.0").path) == tensor_names(BASE)


def test_missing_id_names_it_and_hints_the_fetch_command(cache, no_hub):
    with pytest.raises(InvalidCheckpoint) as info:
        resolve_model("org/missing@v2")
    err = info.value
    assert err.exit_code == 3
    assert "org/missing" in err.message and "'v2'" in err.message and str(cache) in err.message
    assert "huggingface_hub is not installed" in err.message
    assert "pip install 'npmerge[hub]'" in err.hint
    command = err.hint.split("fetch it with: ", 1)[1].split(" (pip install", 1)[0]
    words = shlex.split(command)  # the hint is a valid shell command ...
    assert words[:5] == ["hf", "download", "org/missing", "--revision", "v2"]
    includes = words[5:]  # ... for hf >= 1.0: one pattern per --include
    assert includes[0::2] == ["--include"] * len(hub.FETCH_PATTERNS)
    assert tuple(includes[1::2]) == hub.FETCH_PATTERNS
    assert "*.safetensors" in includes and not any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in includes)


def test_fetch_command_follows_installed_cli(monkeypatch):
    versions = {"1.2.0": "hf download o/m --include '*.safetensors' --include '*.json'",
                "0.35.3": "hf download o/m --include '*.safetensors' '*.json'",
                "0.30.1": "huggingface-cli download o/m --include '*.safetensors' '*.json'"}
    monkeypatch.setattr(hub, "FETCH_PATTERNS", ("*.safetensors", "*.json"))
    for version, expected in versions.items():
        monkeypatch.setattr(hub, "_installed_version", lambda dist, v=version: tuple(map(int, v.split(".")))[:2])
        assert hub.fetch_command("o/m") == expected


def test_missing_revision_lists_what_the_cache_holds(cache, no_hub):
    add_snapshot(cache, "org/m", C1, model_files(BASE), refs=("main", "v1.0"))
    with pytest.raises(InvalidCheckpoint) as info:
        resolve_model("org/m@v9")
    assert "main, v1.0" in info.value.message and "'v9'" in info.value.message
    assert "--revision v9" in info.value.hint


def test_ref_pointing_to_a_missing_snapshot_is_not_in_the_cache(cache, no_hub):
    add_snapshot(cache, "org/m", C1, model_files(BASE), refs=("v1.0",))
    repo = cache / "models--org--m"
    (repo / "refs" / "main").write_text(C2)  # snapshot C2 was never written
    with pytest.raises(InvalidCheckpoint, match="not in the Hugging Face cache"):
        resolve_model("org/m")


def test_corrupt_ref_file_is_a_clear_error(cache, no_hub):
    add_snapshot(cache, "org/m", C1, model_files(BASE))
    (cache / "models--org--m" / "refs").mkdir()
    (cache / "models--org--m" / "refs" / "main").write_text("../../etc")
    with pytest.raises(InvalidCheckpoint, match="does not hold a commit hash"):
        resolve_model("org/m")


# -- snapshots that are not models ---------------------------------------------------------
def test_snapshot_with_only_config_is_refused(cache, no_hub):
    snapshot = add_snapshot(cache, "org/cfg", C1, {"config.json": (BASE / "config.json").read_bytes()},
                            refs=("main",))
    with pytest.raises(InvalidCheckpoint) as info:
        resolve_model("org/cfg")
    msg = info.value.message
    assert "without its weights" in msg and "config.json" in msg and str(snapshot) in msg
    assert "hf download org/cfg" in info.value.hint


def test_snapshot_missing_a_shard_or_a_blob_is_refused(cache, no_hub):
    files = model_files(BASE)
    del files["model-00002-of-00002.safetensors"]
    add_snapshot(cache, "org/half", C1, files, refs=("main",))
    with pytest.raises(InvalidCheckpoint, match=r"1 of 2 weight shards are missing \(model-00002-of-00002"):
        resolve_model("org/half")
    snapshot = add_snapshot(cache, "org/lost", C1, model_files(BASE), refs=("main",))
    os.unlink(os.path.realpath(snapshot / "model-00001-of-00002.safetensors"))  # blob gone, link dangles
    with pytest.raises(InvalidCheckpoint, match="1 of 2 weight shards are missing"):
        resolve_model("org/lost")
    single = add_snapshot(cache, "org/single", C1, {"model.safetensors": b"x", "config.json": b"{}"}, refs=("main",))
    os.unlink(os.path.realpath(single / "model.safetensors"))
    with pytest.raises(InvalidCheckpoint, match="broken links"):
        resolve_model("org/single")


def test_snapshot_with_pickles_only_says_so(cache, no_hub):
    add_snapshot(cache, "org/pkl", C1, {"config.json": b"{}", "pytorch_model.bin": b"\x80\x02"}, refs=("main",))
    with pytest.raises(InvalidCheckpoint, match=r"pickle weights only \(pytorch_model.bin\)"):
        resolve_model("org/pkl")


# -- downloading (fake huggingface_hub, no network) --------------------------------------------
def remote_repo() -> dict[str, bytes]:
    """A Hub repo with safetensors shards plus what must never be fetched."""
    files = model_files(BASE)
    files.update({"pytorch_model.bin": b"pickle", "consolidated.safetensors": b"duplicate",
                  "original/consolidated.00.pth": b"pickle", "model.pt": b"pickle", "weights.ckpt": b"pickle",
                  "README.md": b"# card"})
    return files


def test_missing_id_is_downloaded_safetensors_and_companions_only(cache, monkeypatch):
    fake = FakeHub(cache, "org/remote", C3, remote_repo()).install(monkeypatch)
    ref = resolve_model("org/remote")
    assert (ref.hub_id, ref.name, ref.revision, ref.commit) == ("org/remote", "org/remote", None, C3)
    assert ref.path == cache / "models--org--remote" / "snapshots" / C3
    assert any("downloaded org/remote" in n and C3 in n for n in ref.notes)
    got = sorted(p.name for p in ref.path.iterdir())
    assert got == sorted(model_files(BASE))  # weights, index, config, tokenizer: nothing else
    assert [c["revision"] for c in fake.calls] == [None, C3]  # the shard call is pinned to the commit
    assert all(c["cache_dir"] == str(cache) for c in fake.calls)
    assert sorted(fake.calls[1]["allow_patterns"]) == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
    assert tensor_names(ref.path) == tensor_names(BASE)
    again = resolve_model("org/remote")  # now offline from the cache
    assert len(fake.calls) == 2 and again.commit == C3 and again.notes == ()


def test_download_patterns_never_match_pickles_and_cover_companion_files():
    from npmerge.io.companions import COPIED_FILES

    pickles = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "x.pth", "m.ckpt",
               "original/consolidated.00.pth", "training_args.bin", "optimizer.pt"]
    patterns = [hub.SINGLE_NAME, *hub.COMPANION_PATTERNS, *hub.FETCH_PATTERNS]
    assert not [(n, p) for n in pickles for p in patterns if fnmatch.fnmatch(n, p)]
    examples = [n if "*" not in n else n.replace("*", "modeling_custom") for n in COPIED_FILES]
    assert [n for n in examples if not any(fnmatch.fnmatch(n, p) for p in hub.COMPANION_PATTERNS)] == []
    assert (hub.SINGLE_NAME, hub.INDEX_NAME, hub.PICKLE_SUFFIXES) == _checkpoint_names()


def _checkpoint_names():
    from npmerge.io import checkpoint

    return checkpoint.SINGLE_NAME, checkpoint.INDEX_NAME, checkpoint.PICKLE_SUFFIXES


def test_snapshot_with_only_config_is_completed_by_download(cache, monkeypatch):
    add_snapshot(cache, "org/remote", C3, {"config.json": (BASE / "config.json").read_bytes()}, refs=("main",))
    fake = FakeHub(cache, "org/remote", C3, remote_repo()).install(monkeypatch)
    ref = resolve_model("org/remote")
    assert len(fake.calls) == 2 and ref.commit == C3
    assert tensor_names(ref.path) == tensor_names(BASE)


def test_download_with_revision_records_it(cache, monkeypatch):
    fake = FakeHub(cache, "org/remote", C3, remote_repo(), branch="v2").install(monkeypatch)
    ref = resolve_model("org/remote@v2")
    assert (ref.name, ref.revision, ref.commit) == ("org/remote@v2", "v2", C3)
    assert fake.calls[0]["revision"] == "v2"
    assert (cache / "models--org--remote" / "refs" / "v2").read_text() == C3


def test_no_download_when_offline_or_disabled(cache, monkeypatch):
    fake = FakeHub(cache, "org/remote", C3, remote_repo()).install(monkeypatch)
    with pytest.raises(InvalidCheckpoint) as info:
        resolve_model("org/remote", allow_download=False)
    assert "downloads are off" in info.value.message and "pip install" not in info.value.hint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidCheckpoint, match="HF_HUB_OFFLINE is set") as info:
        resolve_model("org/remote", allow_download=True)
    assert "hf download org/remote" in info.value.hint
    assert fake.calls == []


def test_failed_download_names_the_id(cache, monkeypatch):
    fake = FakeHub(cache, "org/gated", C3, remote_repo()).install(monkeypatch)
    fake.error = type("GatedRepoError", (Exception,), {})("401 Client Error.\nAccess to model org/gated is restricted")
    with pytest.raises(InvalidCheckpoint) as info:
        resolve_model("org/gated")
    assert info.value.message == "cannot download Hub model 'org/gated': GatedRepoError: 401 Client Error."
    assert "hf download org/gated" in info.value.hint


def test_downloaded_repo_without_safetensors_is_refused(cache, monkeypatch):
    FakeHub(cache, "org/old", C3, {"config.json": b"{}", "pytorch_model.bin": b"pickle"}).install(monkeypatch)
    with pytest.raises(InvalidCheckpoint, match=r"org/old' \(commit [0-9a-f]{40}\) has no safetensors weights"):
        resolve_model("org/old")


# -- local paths --------------------------------------------------------------------------
def test_local_directory_shadows_a_cached_id_with_a_note(cache, tmp_path, no_hub):
    add_snapshot(cache, "org/base", C1, model_files(BASE), refs=("main",))
    shutil.copytree(FT_A, tmp_path / "org" / "base")
    ref = resolve_model("org/base")
    assert (ref.path, ref.name, ref.hub_id, ref.commit) == (tmp_path / "org" / "base", "org/base", None, None)
    assert len(ref.notes) == 1 and "local path" in ref.notes[0] and "'org/base@main'" in ref.notes[0]
    assert tensor_names(ref.path) == tensor_names(FT_A)
    assert resolve_model("org/base@main").path == cache / "models--org--base" / "snapshots" / C1
    shutil.copytree(FT_A, tmp_path / "org" / "other")
    assert resolve_model("org/other").notes == ()  # no such id in the cache: nothing to say


def test_local_names_are_relative_to_the_working_directory(cache, tmp_path, monkeypatch, no_hub):
    work = tmp_path / "work"
    shutil.copytree(BASE, work / "models" / "base")
    outside = tmp_path / "elsewhere" / "ft"
    shutil.copytree(FT_A, outside)
    for given in ("models/base", "./models/base/", str(work / "models" / "base"), "models/../models/base"):
        ref = resolve_model(given, cwd=work)
        assert (ref.name, ref.path.resolve(), ref.hub_id) == ("models/base", (work / "models/base").resolve(), None)
    assert resolve_model(str(outside), cwd=work).name == str(outside)
    assert resolve_model("../elsewhere/ft", cwd=work).name == "../elsewhere/ft"
    assert resolve_model(".", cwd=work / "models" / "base").name == "."
    monkeypatch.chdir(work)  # default cwd: the process working directory
    assert resolve_model(str(work / "models" / "base")).name == "models/base"
    file_ref = resolve_model(str(work / "models" / "base" / "model-00001-of-00002.safetensors"))
    assert file_ref.name == "models/base/model-00001-of-00002.safetensors"


def test_snapshot_path_is_named_by_id_and_commit(cache, no_hub):
    snapshot = add_snapshot(cache, "org/m", C1, model_files(BASE), refs=("main",))
    ref = resolve_model(str(snapshot))
    assert (ref.name, ref.hub_id, ref.revision, ref.commit, ref.path) == (f"org/m@{C1}", "org/m", C1, C1, snapshot)
    assert C1 in ref.notes[0] and ref.card_name == "org/m"
    assert resolve_model(ref.name).path == snapshot  # the recorded name resolves to the same model


@pytest.mark.parametrize("text, id_like", [
    ("org/na--me", True), ("org/..x", True), ("org/x..y", True), ("org/name.git", True), ("-org/name", True),
    ("org/name-", True), ("org/.name", True), ("org/", True), ("org/na me", True), ("café/x", True),
    ("org/" + "x" * 97, True), ("x" * 97 + "/name", True), ("org/name@", True), ("org/name@../../x", True), ("org/name@a b", True),
    ("org/name@/x", True), ("org/name@x/", True), ("org/name@x//y", True), ("org/name@.hidden", True),
    ("a/b/c", False), ("/does/not/exist", False), ("./org/name", False), ("../org/name", False), ("name", False),
])
def test_strings_that_are_neither_path_nor_id(cache, no_hub, text, id_like):
    with pytest.raises(InvalidCheckpoint) as info:
        resolve_model(text)
    assert info.value.message.startswith(f"model path '{text}' does not exist")
    assert ("is not a Hub model id either" in info.value.message) is id_like
    assert "org/name@revision" in info.value.hint


@pytest.mark.parametrize("text", ["o/" + "x" * 96, "x" * 96 + "/o", "a/b", "A_b/C.d-e", "org/name@refs/pr/12", "1/2@v1.0.0"])
def test_valid_ids_go_to_the_cache(cache, no_hub, text):
    with pytest.raises(InvalidCheckpoint, match="not in the Hugging Face cache"):
        resolve_model(text)


def test_empty_reference_is_refused(cache):
    for text in ("", "  "):
        with pytest.raises(InvalidCheckpoint, match="empty model reference"):
            resolve_model(text)


# -- model card -------------------------------------------------------------------------------
def _front_matter(text: str) -> dict:
    assert text.startswith("---\n") and text.endswith("\n---\n")
    inner = text[len("---\n"):-len("---\n")]
    assert "\n---\n" not in "\n" + inner  # one document, nothing that ends the front matter early
    return yaml.safe_load(inner)


def test_card_of_a_merge_of_hub_ids(cache, tmp_path, no_hub):
    add_snapshot(cache, "meta/base", C1, model_files(BASE), refs=("main",))
    add_snapshot(cache, "team/ft-a", C2, model_files(FT_A), refs=("v1",))
    add_snapshot(cache, "team/ft-b", C3, model_files(FT_A), refs=("main",))
    shutil.copytree(FT_A, tmp_path / "local-ft")
    base = resolve_model("meta/base")
    models = [resolve_model("team/ft-a@v1"), resolve_model("team/ft-b"), resolve_model(str(tmp_path / "local-ft")),
              resolve_model("team/ft-b")]
    meta = card_metadata(base, models, "task_arithmetic")
    text = card_yaml(meta)
    assert _front_matter(text) == {"base_model": ["meta/base", "team/ft-a", "team/ft-b"],
                                   "base_model_relation": "merge", "library_name": "transformers",
                                   "tags": ["merge", "npmerge", "task-arithmetic"]}
    assert str(tmp_path) not in text and "local-ft" not in text  # never a path, never a non-id
    assert [m.card_name for m in models] == ["team/ft-a", "team/ft-b", "local-ft", "team/ft-b"]


def test_card_of_local_models_has_no_base_model(tmp_path):
    base = ModelRef(path=tmp_path / "models" / "base", name="models/base")
    ft = ModelRef(path=tmp_path / "ft.safetensors", name=str(tmp_path / "ft.safetensors"))
    meta = _front_matter(card_yaml(card_metadata(base, [ft], "TIES", library_name=None)))
    assert meta == {"tags": ["merge", "npmerge", "ties"]}  # a relation without base_model means nothing
    assert (base.card_name, ft.card_name) == ("base", "ft.safetensors")
    linear = card_metadata(None, [ModelRef(path=tmp_path, name="a", hub_id="o/a")], "linear")
    assert linear["base_model"] == ["o/a"] and linear["base_model_relation"] == "merge"
    with pytest.raises(ValueError):
        card_metadata(None, [], " ")


@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "null", "Null", "~", "", "true", "False", "123", "-7",
                                   "1e3", "1E-3", "+.5", "0o17", "0x1F", ".inf", "-.Inf", ".NaN", "2001-12-14",
                                   "a: b", "#tag", "- item", "---", "--- x", "...", "@at", "`tick", "!tag", "&anchor",
                                   "*alias", "[x]", "{x}", "x # y", "'q'", '"dq"', "multi\nline", "tab\there",
                                   "ünïcode", "org/name", "merge"])
def test_card_yaml_quotes_what_needs_quoting(value):
    text = card_yaml({"base_model": [value], "tags": [value]})
    assert _front_matter(text) == {"base_model": [value], "tags": [value]}
    if hub._YAML12_NON_STRING.match(value):  # YAML 1.2 would read these as numbers, null or bool
        assert f"- '{value}'" in text


def test_card_yaml_keeps_plain_ids_plain():
    assert card_yaml({"base_model": ["org/name"], "base_model_relation": "merge"}) == \
        "---\nbase_model:\n- org/name\nbase_model_relation: merge\n---\n"


def test_model_ref_record_has_no_path(tmp_path):
    ref = ModelRef(path=tmp_path / "x", name="org/x@v1", hub_id="org/x", revision="v1", commit=C1)
    assert ref.as_record() == {"name": "org/x@v1", "hub_id": "org/x", "revision": "v1", "commit": C1}


# -- cheap imports and --version ------------------------------------------------------------------
def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout


def test_hub_module_imports_cheaply():
    out = _run("import sys, npmerge.io.hub\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] in "
               "{'numpy', 'numba', 'yaml', 'huggingface_hub', 'safetensors', 'typer', 'rich'}))")
    assert out.strip() == "[]"


def test_describe_versions_without_importing_numba():
    import numba
    import numpy
    import safetensors

    import npmerge

    out = _run("import sys\nfrom npmerge.versions import describe_versions\nprint(describe_versions())\n"
               "print('heavy:', sorted(m for m in ('numba', 'numpy', 'safetensors') if m in sys.modules))")
    lines = out.splitlines()
    assert lines[-1] == "heavy: []"
    assert lines[0] == f"npmerge {npmerge.__version__}"
    assert lines[1].startswith(f"python {platform.python_version()} (")
    assert f"numpy {numpy.__version__}" in lines
    assert f"numba {numba.__version__}" in lines
    assert f"safetensors {safetensors.__version__}" in lines
    hub_line = [line for line in lines if line.startswith("huggingface_hub ")]
    assert len(hub_line) == 1

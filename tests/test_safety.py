"""Issue 5, end to end: interruption, resume, disk full, locks, changed inputs,
read-only inputs and --force, through the real CLI (docs/format-and-safety.md §3).

Three tests run a real, slowed `python -m npmerge` subprocess (NPMERGE_TEST_SLOW
sleeps before each data write) and signal it; everything else runs in-process with
the write path or the engine hooked. Every merge here is TIES on the BF16 tiny-llama
fixture with `--shard-size 100kB`, which gives a 4-shard output.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from collections import namedtuple
from pathlib import Path

import pytest

from helpers import LLAMA, tree_bytes
from npmerge.io import staging as stg
from npmerge.io.writer import OutputWriter
from npmerge.units import human_bytes
from safety_helpers import litter, manifest_lines, run, snapshot, start, wait_for

MODELS = ("base", "ft-a", "ft-b")
SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
BOOKKEEPING = {"README.txt", "plan.json", "manifest.jsonl"}
PROC_TIMEOUT = 120


def merge_args(out: Path, root: Path = LLAMA, *extra) -> list:
    return ["ties", *(root / m for m in MODELS), "-o", out, "--shard-size", "100kB", "-d", "0.5", "-q", *extra]


def merge(out: Path, root: Path = LLAMA, *extra):
    return run(*merge_args(out, root, *extra))


def staging_of(out: Path) -> Path:
    return out.parent / f".{out.name}.npmerge-partial"


def copy_models(dst: Path) -> Path:
    for m in MODELS:
        shutil.copytree(LLAMA / m, dst / m)
    return dst


def manifest(staging: Path) -> list[dict]:
    return [json.loads(line) for line in (staging / "manifest.jsonl").read_text().splitlines()]


def inputs_of(root: Path = LLAMA) -> list[Path]:
    return [root / m for m in MODELS]


def assert_error_line(err: str, code_phrase: str) -> None:
    assert err.startswith(f"Error: {code_phrase}"), err
    assert "Traceback" not in err, err


def assert_parked(staging: Path) -> list[str]:
    """A staging dir left for --resume: exactly its finished shards + bookkeeping, no lock, no tmp."""
    done = [r["file"] for r in manifest(staging)]
    assert done and set(done) <= set(SHARDS), done
    assert set(os.listdir(staging)) == BOOKKEEPING | set(done)
    for rec in manifest(staging):
        assert stg.sha256_file(staging / rec["file"]) == rec["sha256"]
        assert (staging / rec["file"]).stat().st_size == rec["size"]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """Every file of an uninterrupted run (also warms up imports and kernels for the in-process runs)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    res = merge(out)
    assert res.code == 0, res.err
    files = tree_bytes(out)
    assert sorted(n for n in files if n.endswith(".safetensors")) == SHARDS
    return files


def interrupt_after(out: Path, shards: int, root: Path = LLAMA, *extra):
    """An in-process run interrupted (KeyboardInterrupt) right after its `shards`-th shard was finished."""
    original = OutputWriter.finish_shard

    def finish_then_stop(self, i, stats=None):
        original(self, i, stats)
        if len(self._done) == shards:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OutputWriter, "finish_shard", finish_then_stop)
        res = merge(out, root, *extra)
    assert res.code == 130, res.err
    assert_error_line(res.err, "interrupted; no output was written")
    assert "--resume" in res.err
    return res


# ---------------------------------------------------------------- real signals (subprocesses)


def test_lock_refuses_second_run_then_sigterm_leaves_nothing(tmp_path, reference):
    before = snapshot(*inputs_of())
    out = tmp_path / "out"
    staging = staging_of(out)
    proc = start(*merge_args(out), slow=60)  # the first data write sleeps: no shard can finish
    try:
        opened = BOOKKEEPING | {"npmerge.lock"} | {f"{s}.tmp" for s in SHARDS}  # writer open, engine waiting
        wait_for(lambda: set(os.listdir(staging) if staging.is_dir() else ()) == opened, proc, PROC_TIMEOUT)
        lock = json.loads((staging / "npmerge.lock").read_text())
        assert lock["pid"] == proc.pid
        listing = sorted(os.listdir(staging))
        for extra in ((), ("--resume",)):  # a second run, even --resume, may not take a live lock
            res = merge(out, LLAMA, *extra)
            assert res.code == 5, res.err
            assert_error_line(res.err, f"output {out} is locked by pid {proc.pid} on host ")
            assert "Hint: another npmerge run is writing it" in res.err
        assert proc.poll() is None and sorted(os.listdir(staging)) == listing and not out.exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=PROC_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert_error_line(err, "terminated; no output was written")
    assert "--resume" not in err  # nothing was finished, so nothing is kept
    assert os.listdir(tmp_path) == []  # no output, no staging, no lock
    assert snapshot(*inputs_of()) == before


def test_sighup_leaves_nothing(tmp_path):
    """A closed terminal (SIGHUP) ends the merge like SIGTERM: exit 129, cleanup run."""
    out = tmp_path / "out"
    staging = staging_of(out)
    proc = start(*merge_args(out), slow=60)  # the first data write sleeps: no shard can finish
    try:
        wait_for(lambda: (staging / "npmerge.lock").is_file(), proc, PROC_TIMEOUT)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=PROC_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 129, err
    assert_error_line(err, "hung up; no output was written")
    assert os.listdir(tmp_path) == []


def test_sigint_keeps_finished_shards_and_resume_is_byte_identical(tmp_path, reference):
    before = snapshot(*inputs_of())
    out = tmp_path / "out"
    staging = staging_of(out)
    proc = start(*merge_args(out), slow=0.25)
    try:
        wait_for(lambda: manifest_lines(staging) >= 1, proc, PROC_TIMEOUT)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=PROC_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert_error_line(err, "interrupted; no output was written")
    assert re.search(r"Hint: \d of 4 shard\(s\) are finished and kept in .*--resume", err), err
    assert os.listdir(tmp_path) == [staging.name] and not out.exists()
    done = assert_parked(staging)
    inodes = {f: (staging / f).stat().st_ino for f in done}

    res = merge(out, LLAMA, "--resume")
    assert res.code == 0, res.err
    assert tree_bytes(out) == reference  # shards, index, config, tokenizer, report, card, recipe
    assert {f: (out / f).stat().st_ino for f in done} == inodes  # the finished shards were kept, not redone
    assert os.listdir(tmp_path) == ["out"] and litter(tmp_path) == []
    assert snapshot(*inputs_of()) == before


def test_sigkill_leaves_stale_lock_that_only_resume_takes_over(tmp_path, reference):
    out = tmp_path / "out"
    staging = staging_of(out)
    proc = start(*merge_args(out), slow=0.25)
    try:
        wait_for(lambda: manifest_lines(staging) >= 1, proc, PROC_TIMEOUT)
        proc.kill()  # no cleanup at all: lock, .tmp shards and all stay
        proc.communicate(timeout=PROC_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads((staging / "npmerge.lock").read_text())["pid"] == proc.pid
    assert any(n.endswith(".tmp") for n in os.listdir(staging))
    assert not stg.pid_alive(proc.pid)
    left = tree_bytes(staging)

    res = merge(out)  # a plain run does not touch it: it is an interrupted run's, not a live one's
    assert res.code == 5, res.err
    assert_error_line(res.err, f"{staging} exists: it is the incomplete output of an interrupted npmerge run")
    assert "Hint: run the same command again with --resume" in res.err
    assert tree_bytes(staging) == left and not out.exists()

    res = merge(out, LLAMA, "--resume")
    assert res.code == 0, res.err
    assert tree_bytes(out) == reference
    assert os.listdir(tmp_path) == ["out"] and litter(tmp_path) == []


# ---------------------------------------------------------------- resume (in-process interruptions)


@pytest.mark.parametrize("shards", [1, 4])  # 4: every shard done, stopped before the companions and commit
def test_inprocess_interrupt_parks_exactly_the_finished_shards(tmp_path, reference, shards):
    out = tmp_path / "out"
    interrupt_after(out, shards)
    assert assert_parked(staging_of(out)) == SHARDS[:shards]
    assert os.listdir(tmp_path) == [staging_of(out).name]
    res = merge(out, LLAMA, "--resume")
    assert res.code == 0, res.err
    assert tree_bytes(out) == reference


def test_interrupt_right_after_the_manifest_line_keeps_that_shard(tmp_path, reference, monkeypatch):
    """The line is the completion marker: an interruption landing just after it is written (in its
    fsync, say) must not throw the shard away (the SIGINT test hits this window now and then)."""
    real_record = stg.Staging.record

    def record_then_stop(self, rec):
        real_record(self, rec)
        raise KeyboardInterrupt

    monkeypatch.setattr(stg.Staging, "record", record_then_stop)
    out = tmp_path / "out"
    res = merge(out)
    assert res.code == 130 and "Hint: 1 of 4 shard(s) are finished and kept in" in res.err, res.err
    assert assert_parked(staging_of(out)) == SHARDS[:1]
    monkeypatch.undo()
    assert merge(out, LLAMA, "--resume").code == 0
    assert tree_bytes(out) == reference


@pytest.mark.parametrize("extra, phrase", [
    (("-d", "0.7"), "the recipe (method, models, parameters or dtypes) differs from the interrupted run's: "
                    "models[1].parameters.density was 0.5, now 0.7"),
    (("--out-dtype", "float32"), "the recipe (method, models, parameters or dtypes) differs from the interrupted "
                                 "run's: out_dtype was absent, now 'float32'"),
    (("--shard-size", "200kB"), "the output layout (--shard-size or output dtypes) differs from the interrupted "
                                "run's: 3 shard(s), the interrupted run wrote 4"),
])
def test_resume_with_other_recipe_refused_and_staging_intact(tmp_path, reference, extra, phrase):
    out = tmp_path / "out"
    interrupt_after(out, 2)
    left = tree_bytes(staging_of(out))
    res = merge(out, LLAMA, "--resume", *extra)  # later flags override merge_args' ones
    assert res.code == 2, res.err
    assert_error_line(res.err, f"cannot resume into {out}: {phrase}")
    assert "Hint: run exactly the interrupted command again with --resume" in res.err
    assert tree_bytes(staging_of(out)) == left  # untouched, no lock left behind
    assert os.listdir(tmp_path) == [staging_of(out).name]
    res = merge(out, LLAMA, "--resume")  # the right command still finishes it
    assert res.code == 0, res.err
    assert tree_bytes(out) == reference


def test_plan_differences_name_each_changed_key():
    """The detail behind a refused --resume, from the records plan.json keeps (hand-built)."""
    recipe = {"merge_method": "ties", "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 1.0}}],
              "parameters": {"lambda": 1.0}}
    other = {"merge_method": "dare_ties", "models": [{"model": "a"}, {"model": "c", "parameters": {}}],
             "parameters": {"lambda": 1.0, "rescale": True}}
    layout = {"shards": 2, "dtypes": {f"t{i}": "BF16" for i in range(5)}}
    old = {"npmerge_version": "1", "recipe_sha256": "x", "recipe": recipe, "layout_sha256": "x", "layout": layout}
    new = {"npmerge_version": "2", "recipe_sha256": "y", "recipe": other, "layout_sha256": "y",
           "layout": {"shards": 2, "dtypes": dict(layout["dtypes"], t0="F32", t3="F16", t4="F32")}}
    assert stg.plan_differences(old, new) == [
        "the npmerge version differs from the interrupted run's: version was '1', now '2'",
        "the recipe (method, models, parameters or dtypes) differs from the interrupted run's: merge_method was "
        "'ties', now 'dare_ties'; models[1].model was 'b', now 'c'; models[1].parameters.weight was 1.0, now absent; "
        "parameters.rescale was absent, now True",
        "the output layout (--shard-size or output dtypes) differs from the interrupted run's: output dtype of "
        "t0 was 'BF16', now 'F32'; t3 was 'BF16', now 'F16' (and 1 more)",
    ]
    del old["recipe"], old["layout"]  # a plan.json of an npmerge that kept only the hashes
    assert stg.plan_differences(old, new)[1:] == [
        "the recipe (method, models, parameters or dtypes) differs from the interrupted run's",
        "the output layout (--shard-size or output dtypes) differs from the interrupted run's"]


@pytest.mark.parametrize("change, field", [
    ("mtime", "mtime_ns"),  # touched
    ("data-byte", "mtime_ns"),  # a tensor byte rewritten (the write moves mtime)
    ("header-byte", "header_sha256"),  # header edited, mtime put back: the header hash still sees it
])
def test_resume_after_input_changed_refused(tmp_path, change, field):
    root = copy_models(tmp_path / "models")
    out = tmp_path / "out"
    interrupt_after(out, 1, root)
    left = tree_bytes(staging_of(out))
    victim = root / "ft-b" / "model-00002-of-00002.safetensors"
    st = victim.stat()
    if change != "mtime":
        data = bytearray(victim.read_bytes())
        if change == "data-byte":
            data[-1] ^= 0x01
        else:
            assert data[8:40].startswith(b'{"__metadata__":{"format":"pt"}')
            data[36] = ord("u")  # "pt" -> "pu": still a valid file, same size
        victim.write_bytes(bytes(data))
    bump = 0 if change == "header-byte" else 10**9  # coarse clocks: make the mtime move for sure
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + bump))
    assert victim.stat().st_size == st.st_size
    res = merge(out, root, "--resume")
    assert res.code == 2, res.err
    assert_error_line(res.err, f"cannot resume into {out}: input file {victim} changed since the interrupted run "
                               f"({field})")
    assert "Hint: run exactly the interrupted command again with --resume" in res.err
    assert tree_bytes(staging_of(out)) == left
    assert sorted(os.listdir(tmp_path)) == sorted(["models", staging_of(out).name])


def test_resume_recomputes_a_corrupted_finished_shard(tmp_path, reference):
    out = tmp_path / "out"
    interrupt_after(out, 2)
    staging = staging_of(out)
    keep_ino = (staging / SHARDS[0]).stat().st_ino
    bad = staging / SHARDS[1]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size: only the recorded sha256 can tell
    bad.write_bytes(bytes(data))
    before = snapshot(*inputs_of())
    res = merge(out, LLAMA, "--resume")
    assert res.code == 0, res.err
    assert tree_bytes(out) == reference
    assert (out / SHARDS[0]).stat().st_ino == keep_ino  # the intact shard was kept
    assert os.listdir(tmp_path) == ["out"] and litter(tmp_path) == []
    assert snapshot(*inputs_of()) == before


def test_plain_rerun_refused_while_staging_exists(tmp_path, reference):
    out = tmp_path / "out"
    interrupt_after(out, 1)
    left = tree_bytes(staging_of(out))
    for extra in ((), ("--force",)):
        res = merge(out, LLAMA, *extra)
        assert res.code == 5, res.err
        assert_error_line(res.err, f"{staging_of(out)} exists: it is the incomplete output of an interrupted")
        assert "Hint: run the same command again with --resume to continue it, or delete it" in res.err
        assert tree_bytes(staging_of(out)) == left and not out.exists()


def test_resume_without_staging_is_a_plain_run(tmp_path, reference):
    res = merge(tmp_path / "out", LLAMA, "--resume")
    assert res.code == 0, res.err
    assert tree_bytes(tmp_path / "out") == reference


# ---------------------------------------------------------------- disk full


def enospc_after(monkeypatch, shards: int) -> list:
    """os.pwrite raises ENOSPC on the first tensor-data write after `shards` shards were finished."""
    real_pwrite, original, finished, hits = os.pwrite, OutputWriter.finish_shard, [0], []

    def finish(self, i, stats=None):
        original(self, i, stats)
        finished[0] += 1

    def pwrite(fd, buf, pos):
        if finished[0] >= shards and pos > 0:
            hits.append(os.readlink(f"/proc/self/fd/{fd}"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, buf, pos)

    monkeypatch.setattr(OutputWriter, "finish_shard", finish)
    monkeypatch.setattr(os, "pwrite", pwrite)
    return hits


def test_enospc_before_any_shard_removes_everything(tmp_path, monkeypatch, reference):
    hits = enospc_after(monkeypatch, 0)
    out = tmp_path / "out"
    res = merge(out)
    assert res.code == 5, res.err
    path = re.escape(str(staging_of(out) / f"{SHARDS[0]}.tmp"))
    assert re.match(rf"Error: disk full writing {path} \(\d+\.\d\d kB still to write, [\d.]+ (?:[kMG]B|bytes) free\)$",
                    res.first), res.err
    assert "Hint: free some space or choose another output location with -o" in res.err
    assert "--resume" not in res.err
    assert hits and hits[0].endswith(".tmp")
    assert os.listdir(tmp_path) == []


def test_enospc_after_a_shard_keeps_it_for_resume(tmp_path, monkeypatch, reference):
    """Documented in OutputWriter's docstring and the CLI hint: an output error with finished
    shards parks them like an interruption, so freeing space and --resume finishes the job."""
    assert "interruption or output error" in OutputWriter.__doc__
    enospc_after(monkeypatch, 1)
    out = tmp_path / "out"
    res = merge(out)
    assert res.code == 5, res.err
    assert res.first.startswith(f"Error: disk full writing {staging_of(out) / SHARDS[1]}.tmp ("), res.err
    assert "Hint: 1 of 4 shard(s) are finished and kept in" in res.err and "--resume" in res.err
    assert assert_parked(staging_of(out)) == SHARDS[:1]
    monkeypatch.undo()
    before = snapshot(*inputs_of())
    res = merge(out, LLAMA, "--resume")
    assert res.code == 0, res.err
    assert tree_bytes(out) == reference
    assert os.listdir(tmp_path) == ["out"] and litter(tmp_path) == []
    assert snapshot(*inputs_of()) == before


def test_free_space_preflight_refuses_with_figures(tmp_path, monkeypatch, reference):
    usage = namedtuple("usage", "total used free")
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return usage(10**12, 10**12 - 123_456, 123_456)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    out = tmp_path / "out"
    res = merge(out)
    need = sum(len(reference[s]) for s in SHARDS) + stg.SPACE_MARGIN
    assert res.code == 5, res.err
    assert_error_line(res.err, f"not enough disk space for {out}: needs {human_bytes(need)} ({need} bytes), "
                               "123.46 kB (123456 bytes) free")
    assert "Hint: free some space" in res.err
    assert tmp_path in asked
    assert os.listdir(tmp_path) == []


def test_output_is_written_with_pwrite_never_through_a_mapping(tmp_path, monkeypatch, reference):
    """While shards are being finished, no file of the staging dir is memory-mapped at all and every
    input mapping is read-only; every byte of every shard went through os.pwrite."""
    out = tmp_path / "out"
    staging = str(staging_of(out))
    inputs = [str(p) for p in inputs_of()]
    real_pwrite, original = os.pwrite, OutputWriter.finish_shard
    covered: dict[str, list] = {}
    input_maps = []

    def pwrite(fd, buf, pos):
        k = real_pwrite(fd, buf, pos)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(staging) and path.endswith(".safetensors.tmp"):
            covered.setdefault(Path(path).name[:-4], []).append((pos, pos + k))
        return k

    def finish(self, i, stats=None):
        with open("/proc/self/maps") as f:
            maps = [line.split(None, 5) for line in f]
        mapped = [(m[1], m[5].strip()) for m in maps if len(m) == 6]
        assert not [p for _, p in mapped if p.startswith(staging)], mapped
        mine = [(perms, p) for perms, p in mapped if p.startswith(tuple(inputs))]
        assert all("w" not in perms for perms, _ in mine), mine
        input_maps.extend(mine)
        original(self, i, stats)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(OutputWriter, "finish_shard", finish)
    res = merge(out)
    assert res.code == 0, res.err
    assert input_maps  # the check above saw the inputs' (read-only) mappings
    assert sorted(covered) == SHARDS
    for name, spans in covered.items():
        end = 0
        for a, b in sorted(spans):
            assert a <= end, (name, a, end)  # no gap
            end = max(end, b)
        assert end == len(reference[name])
    assert tree_bytes(out) == reference


# ---------------------------------------------------------------- inputs changing during a merge


@pytest.mark.parametrize("change", ["size", "mtime"])
def test_input_changed_during_merge_aborts_at_commit(tmp_path, monkeypatch, change):
    from npmerge.engine import Engine

    root = copy_models(tmp_path / "models")
    victim = root / "ft-a" / "model-00001-of-00002.safetensors"
    run_engine = Engine.run

    def run_then_change(self, plan):
        stats = run_engine(self, plan)
        st = victim.stat()
        if change == "size":  # one byte appended, the mtime put back: only the size tells
            with open(victim, "ab") as f:
                f.write(b"\0")
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + (change == "mtime") * 10**9))
        return stats

    monkeypatch.setattr(Engine, "run", run_then_change)
    out = tmp_path / "out"
    res = merge(out, root)
    assert res.code == 3, res.err
    what = "size" if change == "size" else "modification time"
    assert_error_line(res.err, f"input changed during the merge: {victim}: {what} changed")
    assert "Hint: nothing was written" in res.err
    assert os.listdir(tmp_path) == ["models"] and litter(tmp_path) == []


# ---------------------------------------------------------------- --force


def test_force_replaces_existing_output_atomically(tmp_path, reference):
    out = tmp_path / "out"
    assert merge(out, LLAMA, "-d", "0.7").code == 0
    (out / "notes.txt").write_text("an older merge")
    old = tree_bytes(out)
    before = snapshot(*inputs_of())
    res = merge(out)
    assert res.code == 2 and "--force" in res.err  # refused without --force
    assert tree_bytes(out) == old
    res = merge(out, LLAMA, "--force")
    assert res.code == 0, res.err
    assert tree_bytes(out) == reference  # the old files (notes.txt too) are gone
    assert os.listdir(tmp_path) == ["out"] and litter(tmp_path) == []  # no .npmerge-old, no staging
    assert snapshot(*inputs_of()) == before


def test_force_keeps_old_output_when_the_commit_rename_fails(tmp_path, monkeypatch, reference):
    out = tmp_path / "out"
    assert merge(out, LLAMA, "-d", "0.7").code == 0
    old = tree_bytes(out)
    real_rename, seen = os.rename, []

    def rename(src, dst, *a, **k):
        seen.append((os.fspath(src), os.fspath(dst)))
        if os.fspath(src) == str(staging_of(out)) and os.fspath(dst) == str(out):
            assert not os.path.lexists(out)  # the old output is already set aside
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    res = merge(out, LLAMA, "--force")
    assert res.code == 5, res.err
    assert_error_line(res.err, f"cannot write {out}: Input/output error")
    assert (str(out), str(out.parent / ".out.npmerge-old")) in seen
    assert tree_bytes(out) == old  # put back
    assert os.listdir(tmp_path) == ["out"] and litter(tmp_path) == []

"""io/writer.py and io/companions.py: byte identity with the official writer,
sharding and index, atomic commit, refusals, disk-full handling, companion files."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from npmerge.errors import InvalidCheckpoint, OutputError, RecipeError
from npmerge.io import companions as comp
from npmerge.io import shards as shards_mod
from npmerge.io import writer as wmod
from npmerge.io.shards import OutputTensor, ShardLayout, plan_shards
from npmerge.io.writer import OutputWriter

NP_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "U16": np.uint16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "C64": np.complex64,
}


def make_arrays(specs, seed=0):
    """name -> array of random content (BOOL as 0/1) for (name, dtype, shape) specs."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, dtype, shape in specs:
        dt = np.dtype(NP_DTYPES[dtype])
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        raw = rng.integers(0, 2 if dtype == "BOOL" else 256, n, dtype=np.uint8)
        arrays[name] = raw.view(dt).reshape(shape)
    return arrays


def tensors_of(arrays, dtypes):
    return [OutputTensor(n, dtypes[n], a.shape) for n, a in arrays.items()]


def write_all(out, layout, arrays, *, seed=0, commit=True, **kw):
    """Write every tensor in random-sized chunks, in random order, as mixed buffer types."""
    rnd = random.Random(seed)
    pieces = []
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        pos = 0
        while pos < raw.size:
            step = rnd.randint(1, max(1, raw.size // 2))
            pieces.append((name, pos, raw[pos : pos + step]))
            pos += step
    rnd.shuffle(pieces)
    with OutputWriter(out, layout, **kw) as w:
        w.open()
        for i, (name, pos, chunk) in enumerate(pieces):
            data = (chunk, chunk.tobytes(), memoryview(chunk))[i % 3]
            w.write(name, pos, data)
        if commit:
            return w.commit()
    return None


def check_against_oracle(out: Path, layout: ShardLayout, arrays, tmp: Path):
    for shard in layout.shards:
        ref = tmp / ("ref-" + shard.filename)
        save_file({n: arrays[n] for n in shard.tensors}, str(ref), metadata={"format": "pt"})
        assert (out / shard.filename).read_bytes() == ref.read_bytes(), shard.filename
        with safe_open(str(out / shard.filename), "numpy") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == set(shard.tensors)
            for n in shard.tensors:
                sl = f.get_slice(n)
                assert list(sl.get_shape()) == list(arrays[n].shape)
                if sl.get_dtype().startswith("F8"):  # safetensors.numpy cannot load FP8 (§2.1)
                    continue
                got = f.get_tensor(n)
                assert got.shape == arrays[n].shape
                assert got.tobytes() == arrays[n].tobytes()


def listing(path: Path):
    return sorted(os.listdir(path))


# ---------------------------------------------------------------- byte identity

NAME_CHARS = "abAB._-0é\"\\/ 中"
spec_strategy = st.lists(
    st.tuples(
        st.text(NAME_CHARS, min_size=1, max_size=6),
        st.sampled_from(sorted(NP_DTYPES)),
        st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    ),
    min_size=0,
    max_size=10,
    unique_by=lambda t: t[0],
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=spec_strategy, shard_bytes=st.sampled_from([1, 24, 100, 10**12]), seed=st.integers(0, 2**16))
def test_bytes_equal_official_writer(specs, shard_bytes, seed):
    specs = [s for s in specs if s[0] != "__metadata__"]
    arrays = make_arrays(specs, seed)
    layout = plan_shards(tensors_of(arrays, {n: d for n, d, _ in specs}), shard_bytes)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out = write_all(tmp / "out", layout, arrays, seed=seed)
        assert out == tmp / "out"
        check_against_oracle(out, layout, arrays, tmp)
        expected = {s.filename for s in layout.shards}
        if len(layout.shards) > 1:
            expected.add("model.safetensors.index.json")
        assert set(listing(out)) == expected
        assert listing(tmp) == ["out"] + sorted(f"ref-{s.filename}" for s in layout.shards)


def test_fixed_mix_scalar_zero_size_and_name_order(tmp_path):
    specs = [
        ("z.weight", "F32", (3, 2)),
        ("a.bias", "BF16", (5,)),
        ("scalar", "F16", ()),
        ("empty", "I64", (0, 7)),
        ("B.flag", "BOOL", (4,)),
        ("m.u8", "U8", (2, 0, 3)),
        ("ids", "I64", (3,)),
    ]
    arrays = make_arrays(specs)
    layout = plan_shards(tensors_of(arrays, {n: d for n, d, _ in specs}))
    assert [s.filename for s in layout.shards] == ["model.safetensors"]
    assert layout.index_json() is None
    # dtype descending in enum order, then name
    assert layout.shards[0].tensors == ("empty", "ids", "z.weight", "a.bias", "scalar", "m.u8", "B.flag")
    out = write_all(tmp_path / "out", layout, arrays)
    check_against_oracle(out, layout, arrays, tmp_path)
    assert listing(out) == ["model.safetensors"]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real = os.pwrite
    monkeypatch.setattr(wmod.os, "pwrite", lambda fd, buf, pos: real(fd, bytes(buf)[:3], pos))
    specs = [("w", "F32", (10, 3)), ("b", "BF16", (7,))]
    arrays = make_arrays(specs)
    layout = plan_shards(tensors_of(arrays, {"w": "F32", "b": "BF16"}))
    out = write_all(tmp_path / "out", layout, arrays)
    monkeypatch.undo()
    check_against_oracle(out, layout, arrays, tmp_path)


# ---------------------------------------------------------------- sharding

SHARD_SPECS = [("t1", "F32", (10,)), ("t2", "F32", (10,)), ("t3", "F32", (10,)), ("big", "F32", (25,)),
               ("t5", "U8", (10,)), ("nil", "F16", (0,))]
SHARD_DTYPES = {n: d for n, d, _ in SHARD_SPECS}


@pytest.mark.parametrize(
    "limit, groups",
    [
        (1, [["t1"], ["t2"], ["t3"], ["big"], ["t5"], ["nil"]]),
        (80, [["t1", "t2"], ["t3"], ["big"], ["t5", "nil"]]),
        (10**12, [["t1", "t2", "t3", "big", "t5", "nil"]]),
    ],
)
def test_sharding_and_index(tmp_path, limit, groups):
    arrays = make_arrays(SHARD_SPECS)
    layout = plan_shards(tensors_of(arrays, SHARD_DTYPES), limit)
    assert [sorted(s.tensors) for s in layout.shards] == [sorted(g) for g in groups]
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert [s.filename for s in layout.shards] == names
    assert layout.total_size == sum(a.nbytes for a in arrays.values())
    out = write_all(tmp_path / "out", layout, arrays)
    check_against_oracle(out, layout, arrays, tmp_path)
    index_path = out / "model.safetensors.index.json"
    if n == 1:
        assert not index_path.exists()
        return
    text = index_path.read_text()
    assert text.endswith("}\n") and text == layout.index_json().decode()
    index = json.loads(text)
    assert list(index) == ["metadata", "weight_map"]
    assert index["metadata"] == {"total_size": layout.total_size}
    assert list(index["weight_map"]) == [n for n, _, _ in SHARD_SPECS]  # insertion order
    # transformers-style loading: shard list from the index, every tensor in exactly its shard
    shard_files = sorted(set(index["weight_map"].values()))
    assert shard_files == names
    seen = {}
    for fname in shard_files:
        assert (out / fname).is_file()
        with safe_open(str(out / fname), "numpy") as f:
            for key in f.keys():
                assert key not in seen
                seen[key] = fname
    assert seen == index["weight_map"]
    for name, (i, off) in ((t, layout.location(t)) for t in arrays):
        assert layout.shards[i].filename == index["weight_map"][name]
        assert (out / layout.shards[i].filename).read_bytes()[off : off + arrays[name].nbytes] == arrays[name].tobytes()


@pytest.mark.parametrize(
    "tensors, match",
    [
        ([OutputTensor("__metadata__", "F32", (1,))], "__metadata__"),
        ([OutputTensor("", "F32", (1,))], "empty"),
        ([OutputTensor("a\nb", "F32", (1,))], "control"),
        ([OutputTensor("a\x00", "F32", (1,))], "control"),
        ([OutputTensor("a\x7f", "F32", (1,))], "control"),
        ([OutputTensor("a\ud800", "F32", (1,))], "surrogate"),
        ([OutputTensor("a", "F32", (1,)), OutputTensor("a", "F16", (2,))], "duplicate"),
        ([OutputTensor("a", "f32", (1,))], "unknown dtype"),
        ([OutputTensor("a", "F32", (-1,))], "invalid shape"),
        ([OutputTensor("a", "F32", (True,))], "invalid shape"),
        ([OutputTensor("a", "F4", (3,))], "whole bytes"),
    ],
)
def test_plan_refusals(tensors, match):
    with pytest.raises(RecipeError, match=match):
        plan_shards(tensors)


def test_plan_refuses_huge_header_and_bad_limit(monkeypatch):
    with pytest.raises(RecipeError, match="shard size"):
        plan_shards([], 0)
    monkeypatch.setattr(shards_mod, "MAX_HEADER_BYTES", 200)
    plan_shards([OutputTensor("a", "F32", (1,))])
    with pytest.raises(RecipeError, match="header"):
        plan_shards([OutputTensor(f"tensor.{i}", "F32", (1,)) for i in range(10)])


def test_empty_layout_matches_official(tmp_path):
    layout = plan_shards([])
    out = write_all(tmp_path / "out", layout, {})
    save_file({}, str(tmp_path / "ref"), metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref").read_bytes()


# ---------------------------------------------------------------- atomicity


def small_layout():
    arrays = make_arrays([("w", "F32", (8,)), ("b", "BF16", (4,))])
    return plan_shards(tensors_of(arrays, {"w": "F32", "b": "BF16"}), 20), arrays


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interruption_leaves_nothing(tmp_path, exc):
    layout, arrays = small_layout()
    before = listing(tmp_path)
    with pytest.raises(exc):
        with OutputWriter(tmp_path / "out", layout) as w:
            w.open()
            assert w.staging_dir.is_dir()
            assert (w.staging_dir / "npmerge.lock").is_file() and (w.staging_dir / "README.txt").is_file()
            w.write("w", 0, arrays["w"][:4])
            w.add_bytes("config.json", b"{}\n")
            raise exc("boom")
    assert listing(tmp_path) == before


def test_leaving_without_commit_and_incomplete_tensor(tmp_path):
    layout, arrays = small_layout()
    with OutputWriter(tmp_path / "out", layout) as w:
        w.open()
        w.write("w", 0, arrays["w"])
    assert listing(tmp_path) == []
    with pytest.raises(RuntimeError, match="incomplete"):
        with OutputWriter(tmp_path / "out", layout) as w:
            w.open()
            w.write("w", 0, arrays["w"])
            w.commit()
    assert listing(tmp_path) == []


def test_output_appearing_during_the_run_is_not_replaced(tmp_path):
    layout, arrays = small_layout()
    with pytest.raises(OutputError, match="appeared"):
        with OutputWriter(tmp_path / "out", layout) as w:
            w.open()
            for n, a in arrays.items():
                w.write(n, 0, a)
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "theirs.txt").write_text("keep")
            w.commit()
    assert listing(tmp_path) == ["out"] and listing(tmp_path / "out") == ["theirs.txt"]


def test_write_bounds_and_state(tmp_path):
    layout, arrays = small_layout()
    w = OutputWriter(tmp_path / "out", layout)
    with pytest.raises(RuntimeError):
        w.write("w", 0, b"x")
    with w:
        w.open()
        with pytest.raises(ValueError):
            w.write("w", 30, b"abc")  # 32-byte tensor
        with pytest.raises(ValueError):
            w.write("w", 0, np.zeros((4, 4), np.float32)[:, 0])  # not contiguous
        with pytest.raises(KeyError):
            w.write("nope", 0, b"")
        with pytest.raises(ValueError):
            w.add_bytes("../escape", b"")
        with pytest.raises(ValueError):
            w.add_bytes("model-00001-of-00002.safetensors", b"")
    assert listing(tmp_path) == []


def test_finish_shards_then_report_then_commit(tmp_path):
    """The api.py flow: shards made final in staging and hashed before the report is added."""
    layout, arrays = small_layout()
    with OutputWriter(tmp_path / "out", layout) as w:
        assert w.open() is w.open()  # idempotent
        for n, a in arrays.items():
            w.write(n, 0, a)
        w.add_bytes("README.md", b"card")
        w.finish_shards()
        w.finish_shards()
        with pytest.raises(RuntimeError, match="finish_shards"):
            w.write("w", 0, b"")
        files = sorted(p.name for p in w.staging_dir.iterdir() if p.is_file() and p.name not in w.private_files)
        assert files == ["README.md", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                         "model.safetensors.index.json"]
        w.add_bytes("merge_report.json", b"{}")
        out = w.commit()
    assert listing(out) == sorted(files + ["merge_report.json"])
    check_against_oracle(out, layout, arrays, tmp_path)
    with pytest.raises(RuntimeError):
        w.open()


# ---------------------------------------------------------------- refusals


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "models" / "base"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    return d


@pytest.mark.parametrize(
    "out_rel, match",
    [
        ("models/base", "is the input"),
        ("models/base/merged", "inside the input"),
        ("models", "contains the input"),
        ("link", "is the input"),
        ("link/merged", "inside the input"),
        ("models/base/model.safetensors", "inside the input"),
    ],
)
def test_refuses_output_overlapping_inputs(tmp_path, model_dir, out_rel, match):
    (tmp_path / "link").symlink_to(model_dir)
    layout, _ = small_layout()
    before = listing(model_dir)
    with pytest.raises(RecipeError, match=match) as info:
        OutputWriter(tmp_path / out_rel, layout, inputs=[model_dir], force=True).open()
    assert info.value.hint
    assert listing(model_dir) == before
    assert not any(p.name.endswith(".npmerge-partial") for p in tmp_path.rglob("*"))


def test_refuses_output_containing_input_file(tmp_path, model_dir):
    layout, _ = small_layout()
    with pytest.raises(RecipeError, match="contains the input"):
        OutputWriter(tmp_path / "models", layout, inputs=[model_dir / "model.safetensors"], force=True).open()
    with pytest.raises(RecipeError, match="is the input"):
        OutputWriter(model_dir / "model.safetensors", layout, inputs=[model_dir / "model.safetensors"]).open()
    OutputWriter(model_dir / "merged", layout, inputs=[model_dir / "model.safetensors"]).open().abort()
    assert listing(model_dir) == ["model.safetensors"]


def test_existing_output_dir(tmp_path):
    layout, arrays = small_layout()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_bytes(b"old")
    with pytest.raises(RecipeError, match="output directory exists") as info:
        OutputWriter(out, layout).open()
    assert "--force" in info.value.hint
    assert listing(out) == ["old.bin"] and listing(tmp_path) == ["out"]
    write_all(out, layout, arrays, force=True)
    assert listing(out) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                            "model.safetensors.index.json"]
    assert listing(tmp_path) == ["out"]  # no .npmerge-old, no staging


def test_relative_output_path_with_trailing_slash(tmp_path, monkeypatch):
    layout, arrays = small_layout()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    out = write_all("../out/", layout, arrays)
    assert out == tmp_path.resolve() / "out" and listing(tmp_path) == ["out", "sub"]
    with pytest.raises(RecipeError, match="invalid output"):
        OutputWriter("/", layout).open()


def test_empty_existing_output_dir_is_used(tmp_path):
    layout, arrays = small_layout()
    (tmp_path / "out").mkdir()
    write_all(tmp_path / "out", layout, arrays)
    assert len(listing(tmp_path / "out")) == 3 and listing(tmp_path) == ["out"]


def test_output_is_a_file(tmp_path):
    layout, _ = small_layout()
    (tmp_path / "out").write_bytes(b"file")
    for force in (False, True):
        with pytest.raises(RecipeError, match="not a directory"):
            OutputWriter(tmp_path / "out", layout, force=force).open()
    assert (tmp_path / "out").read_bytes() == b"file"


def test_missing_parent(tmp_path):
    layout, _ = small_layout()
    with pytest.raises(RecipeError, match="parent"):
        OutputWriter(tmp_path / "nope" / "out", layout).open()
    assert listing(tmp_path) == []


def test_leftover_staging_refused(tmp_path):
    layout, _ = small_layout()
    staging = tmp_path / ".out.npmerge-partial"
    staging.mkdir()
    (staging / "model.safetensors.tmp").write_bytes(b"partial")
    with pytest.raises(OutputError, match="interrupted") as info:
        OutputWriter(tmp_path / "out", layout).open()
    assert "delete" in info.value.hint
    assert listing(staging) == ["model.safetensors.tmp"]  # never ours to remove


def test_dead_lock_is_a_leftover(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging = tmp_path / ".out.npmerge-partial"
    staging.mkdir()
    (staging / "npmerge.lock").write_text(proc.stdout.strip())
    with pytest.raises(OutputError, match="interrupted"):
        OutputWriter(tmp_path / "out", small_layout()[0]).open()


def test_live_lock_refused(tmp_path):
    layout, _ = small_layout()
    staging = tmp_path / ".out.npmerge-partial"
    staging.mkdir()
    (staging / "npmerge.lock").write_text(f"{os.getpid()}\n")
    with pytest.raises(OutputError, match=f"locked by pid {os.getpid()}"):
        OutputWriter(tmp_path / "out", layout).open()
    # the lock we write ourselves is recognised as live too
    with OutputWriter(tmp_path / "out2", layout) as w:
        w.open()
        lock = json.loads((w.staging_dir / "npmerge.lock").read_text())
        assert lock["pid"] == os.getpid() and lock["host"] and lock["started"]
        with pytest.raises(OutputError, match="locked by pid"):
            OutputWriter(tmp_path / "out2", layout).open()
        assert w.staging_dir.is_dir()  # the refused writer did not remove our staging
    assert listing(tmp_path) == [".out.npmerge-partial"]


# ---------------------------------------------------------------- disk errors


def test_enospc_on_write(tmp_path, monkeypatch):
    layout, arrays = small_layout()

    def full(fd, buf, pos):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="disk full writing") as info:
        with OutputWriter(tmp_path / "out", layout) as w:
            w.open()
            monkeypatch.setattr(wmod.os, "pwrite", full)
            w.write("w", 0, arrays["w"])
    assert info.value.exit_code == 5
    monkeypatch.undo()
    assert listing(tmp_path) == []


@pytest.mark.parametrize("code, ok", [(errno.ENOSPC, False), (errno.EDQUOT, False), (errno.EINVAL, True),
                                      (errno.EOPNOTSUPP, True)])
def test_fallocate_errors(tmp_path, monkeypatch, code, ok):
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate")

    def fail(fd, off, size):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(wmod.os, "posix_fallocate", fail)
    layout, arrays = small_layout()
    if ok:
        out = write_all(tmp_path / "out", layout, arrays)
        check_against_oracle(out, layout, arrays, tmp_path)
    else:
        with pytest.raises(OutputError, match="disk full"):
            write_all(tmp_path / "out", layout, arrays)
        assert listing(tmp_path) == []


def test_unwritable_parent(tmp_path, monkeypatch):
    def denied(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(wmod.os, "mkdir", denied)
    with pytest.raises(OutputError, match="not writable"):
        OutputWriter(tmp_path / "out", small_layout()[0]).open()
    monkeypatch.undo()
    assert listing(tmp_path) == []


def test_free_space_check(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 12345, 12345))
    layout, arrays = small_layout()
    need = sum(s.size for s in layout.shards) + wmod.SPACE_MARGIN
    with pytest.raises(OutputError, match="needs") as info:
        OutputWriter(tmp_path / "out", layout).open()
    assert str(need) in str(info.value) and "12345 bytes" in str(info.value)
    assert listing(tmp_path) == []
    write_all(tmp_path / "out", layout, arrays, check_space=False)
    assert listing(tmp_path) == ["out"]


# ---------------------------------------------------------------- companions


def commit_with_companions(tmp_path, source, out_dtype="BF16"):
    layout, arrays = small_layout()
    with OutputWriter(tmp_path / "out", layout) as w:
        w.open()
        names = comp.write_companions(w, source, out_dtype)
        for n, a in arrays.items():
            w.write(n, 0, a)
        out = w.commit()
    return out, names


@pytest.mark.parametrize(
    "config",
    [
        {"a": 1, "torch_dtype": "float32", "z": 2},
        {"dtype": "float32", "a": 1},
        {"torch_dtype": "float32", "b": [1], "dtype": "bfloat16"},
        {"model_type": "llama", "hidden_size": 8},
    ],
    ids=["torch_dtype", "dtype", "both", "neither"],
)
def test_config_dtype_update(tmp_path, config):
    src = tmp_path / "base"
    src.mkdir()
    config = dict(config, text_config={"torch_dtype": "float32", "x": None})
    neither = "torch_dtype" not in config and "dtype" not in config
    expected_keys = list(config) + (["torch_dtype"] if neither else [])
    (src / "config.json").write_text(json.dumps(config))
    out, names = commit_with_companions(tmp_path, src, "F16")
    assert names == ["config.json"]
    text = (out / "config.json").read_text()
    got = json.loads(text)
    assert text == json.dumps(got, indent=2) + "\n"
    assert list(got) == expected_keys
    for key in ("torch_dtype", "dtype"):
        if key in got:
            assert got[key] == "float16"
    assert got["text_config"] == {"torch_dtype": "float16", "x": None}
    assert {k: v for k, v in got.items() if k not in ("torch_dtype", "dtype", "text_config")} == {
        k: v for k, v in config.items() if k not in ("torch_dtype", "dtype", "text_config")}


def test_companion_files_copied_byte_identical(tmp_path):
    src = tmp_path / "base"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    copied = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "merges.txt", "modeling_foo.py",
              "configuration_foo.py"]
    for name in copied:
        (src / name).write_bytes(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
    for name in ["model.safetensors", "optimizer.pt", "README.md", "sub/tokenizer.json", "training_args.bin"]:
        (src / name).write_bytes(b"not copied")
    (src / "vocab.txt").symlink_to(src / "merges.txt")
    (src / "config.json").write_text('{"torch_dtype": "float32"}')
    out, names = commit_with_companions(tmp_path, src)
    assert names == ["config.json"] + sorted(copied + ["vocab.txt"])
    for name in copied + ["vocab.txt"]:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "vocab.txt").is_symlink()
    assert set(listing(out)) == set(names) | {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                              "model.safetensors.index.json"}


def test_no_source_dir_and_no_config(tmp_path):
    out, names = commit_with_companions(tmp_path, None)
    assert names == []
    src = tmp_path / "base"
    src.mkdir()
    (src / "vocab.json").write_text("{}")
    shutil.rmtree(out)
    out, names = commit_with_companions(tmp_path, src)
    assert names == ["vocab.json"] and not (out / "config.json").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "", '{"a": 1} x', b"\xff\xfe{}"])
def test_bad_config_json(tmp_path, text):
    src = tmp_path / "base"
    src.mkdir()
    path = src / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = listing(tmp_path)
    with pytest.raises(InvalidCheckpoint, match="config.json") as info:
        commit_with_companions(tmp_path, src)
    assert str(path) in str(info.value)
    assert listing(tmp_path) == before

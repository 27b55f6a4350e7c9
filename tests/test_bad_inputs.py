"""The bad-input catalogue through the real CLI: docs/format-and-safety.md §5 (42 cases) and
the list in issue 5 ("A bad-input catalogue as tests").

Every refused case runs `npmerge ...` in-process (safety_helpers.run) and checks:
  - the exit code: 2 recipe/usage, 3 invalid input file, 4 incompatible models,
    5 output/I-O (errors.py), 130/143 for SIGINT/SIGTERM;
  - the first stderr line is `Error: ...` and names the file, tensor or model (the phrases);
  - a `Hint:` line where one helps (`hint=False`: the message says it all; a string: the
    hint must contain it); no traceback;
  - nothing created, removed or modified in the test's directory: no output directory, no
    `.<out>.npmerge-partial` staging, no `.tmp` file, every input byte- and mtime-identical;
    and the bundled fixtures untouched (module fixture).
Cases whose right behaviour is acceptance (ACCEPTED) check success, the note in
merge_report.json, and the same cleanliness.

Every id starts with the §5 case number (`s27-...` is case 27); `i5-...` are the cases
issue 5 adds (unknown method, recipe YAML errors, budget), `i21-...` issue 21's (the
methods of step 3: model counts, parameter values, inputs they cannot merge), `i24-...` issue
24's (one-file outputs; verify's and inspect's refusals are in test_verify.py and
test_inspect.py), `i26-...` issue 26's (hostile
recipe YAML, tokenizer ids and padding, fan_in_fan_out; the --resume detail is in
test_safety.py, the fuzzing in test_fuzz_inputs.py). Where each §5 case is tested:

  §1-20  header validation: test_hostile_header_through_cli runs every file of the hostile
         corpus of test_safetensors_format.py through the CLI, tagged with its § number by
         `section()`; plus REFUSED s05-corrupt-shard-header, s15-truncated-shard (in a sharded
         model), s07-f4-unsupported, s18-empty-name, s18-tensor-named-metadata
  §21-26 paths, directories, index: REFUSED s21-* .. s26-*; ACCEPTED s22-hf-cache-symlinks
  §27-32 models: REFUSED s27-* .. s32-*; ACCEPTED s29-tied-lm-head (tied, untied and a dead head copy),
         s30-mixed-dtypes, s31-integer-tensors-copied, s32-allow-nonfinite
  §33-34 parameters, same model twice: REFUSED s33-*, s34-*; ACCEPTED s33-negative-weight,
         s34-base-listed-in-models
  §35-38 output location, free space: REFUSED s35-* .. s38-*; ACCEPTED s36-force
  §39    interrupts: test_interrupted (SIGINT, SIGTERM; finished shards kept for --resume)
  §40-42 input changed, overflow, concurrent run: REFUSED s40-*, s41-*, s42-*
test_catalogue_covers_every_case checks all 42 numbers appear; test_json_errors repeats
a sample with --json.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import FIXTURES, LLAMA, LLAMA_F32, load_model
from npmerge.io import writer as writer_mod
from npmerge.io.writer import OutputWriter
from safety_helpers import assert_error, ent, litter, make_model, manifest_lines, mk, run
from test_safetensors_format import BAD as HOSTILE

BASE, FA, FB = LLAMA_F32 / "base", LLAMA_F32 / "ft-a", LLAMA_F32 / "ft-b"  # F32, single file
SA, SB = LLAMA / "ft-a", LLAMA / "ft-b"  # BF16, two shards and an index
INT = FIXTURES / "tiny-int"
VOCAB = FIXTURES / "tiny-vocab"
LORA_QV = FIXTURES / "tiny-lora" / "tiny-llama" / "qv-f32"
TIES = ["ties", BASE, FA, FB]
INDEX, S1, S2 = "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
D4 = b"\x00\x00\x80\x3f"


# --------------------------------------------------------------------------- helpers

def tree(root: Path, mtimes: bool = True) -> dict:
    """Every entry under root: type, and for files sha256, size (and mtime). Never opens a FIFO."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                out[rel] = (digest, st.st_size) + ((st.st_mtime_ns,) if mtimes else ())
            else:
                out[rel] = (stat.S_IFMT(st.st_mode),)
    return out


@pytest.fixture(scope="module", autouse=True)
def fixtures_untouched():
    before = tree(FIXTURES)
    yield
    assert tree(FIXTURES) == before and litter(FIXTURES) == []


def put(t: Path, name: str, data: bytes) -> Path:
    (t / name).write_bytes(data)
    return t / name


def edited(t: Path, edit: Callable[[dict], None], name: str = "m", src: Path = FA, config: dict | None = None) -> Path:
    """A single-file copy of `src` with its tensors changed by `edit` (in place)."""
    tensors = load_model(src)
    edit(tensors)
    return make_model(t / name, tensors, config, src)


def setitem(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    return lambda ts: ts.__setitem__(name, make(ts[name]))


def poke(name: str, value: float, at=(0, 0)) -> Callable[[dict], None]:
    def edit(ts):
        ts[name][at] = value
    return edit


def sharded(t: Path, name: str = "sh") -> Path:
    return Path(shutil.copytree(SA, t / name))


def reindex(edit: Callable[[dict], None] | None = None, text: Callable[[dict], str] | None = None):
    """A case builder: a copy of the sharded BF16 fixture with its index edited, merged with ft-b."""
    def build(t, mp):
        d = sharded(t)
        data = json.loads((d / INDEX).read_text())
        if edit:
            edit(data)
        (d / INDEX).write_text(text(data) if text else json.dumps(data, indent=2))
        return ["linear", SB, d]
    return build


def map_to(tensor: str, shard) -> Callable[[dict], None]:
    return lambda data: data["weight_map"].__setitem__(tensor, shard)


def cli(*args) -> Callable:
    """A case builder for a fixed command line."""
    return lambda t, mp: list(args)


def recipe(text: str) -> Callable:
    def build(t, mp):
        (t / "recipe.yml").write_text(text)
        return ["run", t / "recipe.yml"]
    return build


def ties_yaml(model_params: str = "", extra: str = "", base: bool = True) -> str:
    return ("merge_method: ties\n" + (f"base_model: {BASE}\n" if base else "")
            + f"models:\n  - model: {FA}\n" + (f"    parameters: {model_params}\n" if model_params else "")
            + f"  - model: {FB}\n" + extra)


class _Unpickle:
    """Unpickling this creates a file: proof that a .bin/.pt was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def evil_pickle(t: Path) -> bytes:
    return pickle.dumps({"weight": _Unpickle(t / "UNPICKLED")})


def no_space(free: int):
    def patch(mp):
        usage = SimpleNamespace(total=10**12, used=10**12 - free, free=free)
        mp.setattr(writer_mod.shutil, "disk_usage", lambda path: usage)
    return patch


# --------------------------------------------------------------------------- refused cases

@dataclass(frozen=True)
class Case:
    id: str  # "sNN-...": docs/format-and-safety.md §5, case NN; "i5-...": issue 5's list
    build: Callable  # (work dir, monkeypatch) -> CLI args; "-o <work>/out" is added unless given
    code: int
    phrases: tuple = ()  # in the first line; "{tmp}" is the work dir, "{pid}"/"{host}" this process
    hint: bool | str = True
    touches_inputs: bool = False  # the case itself changes an input's mtime (§40)


def _fifo(t, mp):
    os.mkfifo(t / "pipe.safetensors")
    return ["linear", FA, t / "pipe.safetensors"]


def _permission_denied(t, mp):
    target = shutil.copy(FA / "model.safetensors", t / "locked.safetensors")
    real_open = os.open

    def fake_open(path, flags, *a, **k):  # root ignores chmod, so EACCES is injected at open(2)
        if os.fspath(path) == str(target):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *a, **k)

    mp.setattr(os, "open", fake_open)
    return ["linear", FA, target]


def _symlinked_weights(target_of: Callable[[Path], Path]):
    def build(t, mp):
        d = t / "m"
        d.mkdir()
        shutil.copy(FA / "config.json", d)
        (d / "model.safetensors").symlink_to(target_of(d))
        return ["linear", FA, d]
    return build


def _shard_outside(t, mp):
    d = sharded(t)
    (t / "elsewhere").mkdir()
    shutil.move(d / S1, t / "elsewhere" / S1)
    (d / S1).symlink_to(t / "elsewhere" / S1)
    return ["linear", SB, d]


def _missing_shard(t, mp):
    d = sharded(t)
    os.unlink(d / S2)
    return ["linear", SB, d]


def _in_two_shards(t, mp):
    d = sharded(t)
    s3 = "model-00003-of-00003.safetensors"
    shutil.copy(d / S1, d / s3)  # a copy of shard 1: every tensor of it is in two shards
    data = json.loads((d / INDEX).read_text())
    data["weight_map"]["model.embed_tokens.weight"] = s3
    (d / INDEX).write_text(json.dumps(data))
    return ["linear", SB, d]


def _truncated_shard(t, mp):
    d = sharded(t)
    with open(d / S2, "r+b") as f:  # an interrupted download
        f.truncate((d / S2).stat().st_size - 1000)
    return ["linear", SB, d]


def _corrupt_shard_header(t, mp):
    d = sharded(t)
    data = bytearray((d / S1).read_bytes())
    data[8] = ord("[")  # the header's opening brace
    (d / S1).write_bytes(bytes(data))
    return ["linear", SB, d]


def _ambiguous(t, mp):
    d = sharded(t)
    shutil.copy(FA / "model.safetensors", d / "model.safetensors")
    return ["linear", SB, d]


def _pickle_dir(t, mp):
    d = t / "torch"
    d.mkdir()
    shutil.copy(FA / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(evil_pickle(t))
    return ["linear", FA, d]


def _lora(t, mp):
    d = t / "lora"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    shutil.copy(FA / "model.safetensors", d / "adapter_model.safetensors")
    return ["linear", FA, d]


def _zero_tensor_models(t, mp):
    """Two models whose `model.norm.weight` is all zeros (a Karcher mean has no direction)."""
    paths = []
    for name in ("z1", "z2"):
        tensors = load_model(FA)
        tensors["model.norm.weight"][:] = 0.0
        (t / name).mkdir()
        save_file(tensors, str(t / name / "model.safetensors"), metadata={"format": "pt"})
        paths.append(t / name)
    return ["karcher", *paths]


def _two_files(data_a: bytes, data_b: bytes):
    def build(t, mp):
        return ["linear", put(t, "a.safetensors", data_a), put(t, "b.safetensors", data_b)]
    return build


def _vocab_rows(t, mp):
    def grow(ts):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            ts[name] = np.concatenate([ts[name], np.zeros((44, 64), np.float32)])
    return ["linear", FA, edited(t, grow, config={"vocab_size": 300})]


def _tied_lm_head(t):
    """A tied model (no lm_head, tie_word_embeddings) and its tied twin with a dead lm_head copy, after an
    untied one: the output is untied, the tied models' embeddings are their heads."""
    tied = edited(t, lambda ts: ts.pop("lm_head.weight"), "tied", config={"tie_word_embeddings": True})
    dead = edited(t, setitem("lm_head.weight", np.zeros_like), "dead", src=FB, config={"tie_word_embeddings": True})
    return ["linear", tied, FA, dead]


def _tied_heads_merged(t, out):
    """lm_head = the linear mean of the tied models' embeddings and FA's own head (the reference)."""
    import reference as ref

    got, fa, fb = load_model(out), load_model(FA), load_model(FB)
    tied = load_model(t / "tied")
    want = ref.linear([tied["model.embed_tokens.weight"], fa["lm_head.weight"], fb["model.embed_tokens.weight"]],
                      [1.0, 1.0, 1.0])
    assert np.array_equal(got["lm_head.weight"].view(np.uint32), want.view(np.uint32))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def _input_changed(t, mp):
    m = Path(shutil.copytree(FB, t / "m"))
    real_write = OutputWriter.write
    touched = []

    def write(self, name, offset, data):
        if not touched:  # another process rewrites an input while the merge runs
            st = os.stat(m / "model.safetensors")
            os.utime(m / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            touched.append(True)
        return real_write(self, name, offset, data)

    mp.setattr(OutputWriter, "write", write)
    return ["linear", FA, m]


def _enospc_mid_write(t, mp):
    real = os.pwrite
    calls = []

    def pwrite(fd, data, pos):
        calls.append(pos)
        if len(calls) > 3:  # headers and the first pieces go through, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, pos)

    no_space(10**9)(mp)  # the preflight passes
    mp.setattr(os, "pwrite", pwrite)
    return ["linear", FA, FB]


def _unwritable(t, mp):
    # Root ignores chmod, so use a location no one may create directories in: sysfs (EPERM;
    # EACCES for a normal user). It also reports 0 bytes free: the error must still say
    # "not writable", not "disk full".
    return ["linear", FA, FB, "-o", "/sys/npmerge-test-unwritable-out"]


def _staging(t: Path, lock: dict | None) -> None:
    staging = t / ".out.npmerge-partial"
    staging.mkdir()
    (staging / "plan.json").write_text("{}")
    if lock is not None:
        (staging / "npmerge.lock").write_text(json.dumps(lock))


def _locked(t, mp):
    _staging(t, {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"})
    return ["linear", FA, FB]


def _leftover(t, mp):
    _staging(t, None)
    return ["linear", FA, FB]


def _with_copy(args_of: Callable[[Path, Path], list]):
    """A builder with a copy of ft-b at <work>/m (an input the case may aim the output at)."""
    def build(t, mp):
        m = Path(shutil.copytree(FB, t / "m"))
        return args_of(t, m)
    return build


def _contains_input(t, mp):
    a = Path(shutil.copytree(FB, t / "models" / "b"))
    return ["linear", FA, a, "-o", t / "models"]


def _symlink_to_input(inside: bool):
    def build(t, mp):
        m = Path(shutil.copytree(FB, t / "m"))
        (t / "alias").symlink_to(m, target_is_directory=True)
        return ["linear", FA, m, "-o", t / "alias" / "merged" if inside else t / "alias"]
    return build


def _same_via_symlink(t, mp):
    (t / "alias").symlink_to(FA, target_is_directory=True)
    return ["linear", FA, t / "alias"]


def _hard_link(t, mp):
    a = Path(shutil.copytree(FA, t / "a"))
    (t / "hl").mkdir()
    os.link(a / "model.safetensors", t / "hl" / "model.safetensors")
    return ["linear", a, t / "hl"]


def _out_not_empty(t, mp):
    (t / "out").mkdir()
    (t / "out" / "keep.txt").write_text("an earlier merge")
    return ["linear", FA, FB]


def _out_is_file(t, mp):
    (t / "out").write_text("not a directory")
    return ["linear", FA, FB]


def _parent_is_file(t, mp):
    (t / "file").write_text("a regular file")
    return ["linear", FA, FB, "-o", t / "file" / "out"]


def _chat_tokenizer(edit: Callable[[list], None], source: str | None = None) -> Callable:
    """tiny-vocab's ft-chat copied to <tmp>/chat with `edit` applied to tokenizer.json's
    added_tokens (and tokenizer_config.json's decoder made to agree); merged with the base,
    `source` (default: the copy) the tokenizer source."""
    def build(t, mp):
        shutil.copytree(VOCAB / "ft-chat", t / "chat")
        tj = t / "chat" / "tokenizer.json"
        data = json.loads(tj.read_text())
        edit(data["added_tokens"])
        tj.write_text(json.dumps(data))
        tc = t / "chat" / "tokenizer_config.json"
        config = json.loads(tc.read_text())
        config["added_tokens_decoder"] = {str(a["id"]): a for a in data["added_tokens"]}
        tc.write_text(json.dumps(config))
        return ["linear", VOCAB / "base", t / "chat", "--tokenizer-source", source or t / "chat"]
    return build


def _set_last_id(value: int) -> Callable[[list], None]:
    def edit(added):
        added[-1]["id"] = value
    return edit


def _f8(w: bytes) -> bytes:
    return mk({"w": ent("F8_E4M3", [4], (0, 4)), "w_scale_inv": ent("F32", [1], (4, 8))}, w + D4)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


REFUSED = [
    # §1-20 beyond the corpus: a shard of a sharded model, and what the parser accepts but npmerge cannot use
    Case("s07-f4-unsupported", _two_files(mk({"w": ent("F4", [4], (0, 2))}, b"\x12\x34"),
                                           mk({"w": ent("F4", [4], (0, 2))}, b"\x56\x78")),
         4, ("tensor 'w' cannot be merged: dtypes model 1 F4, model 2 F4",), "BF16, F16, F32, F64 and FP8"),
    Case("s18-empty-name", lambda t, mp: ["linear", FA, put(t, "e.safetensors", mk({"": ent()}, D4))],
         3, ("invalid tensor name '' (empty) in {tmp}/e.safetensors",)),
    Case("s18-tensor-named-metadata", lambda t, mp: ["linear", FA, put(t, "x.safetensors", mk({"__metadata__": ent()}, D4))],
         3, ("__metadata__ value for key 'shape' must be a string", "{tmp}/x.safetensors")),

    Case("s05-corrupt-shard-header", _corrupt_shard_header,
         3, ("header JSON must be an object, but it starts with '['", "({tmp}/sh/" + S1 + ")"), "corrupt"),
    Case("s15-truncated-shard", _truncated_shard,
         3, ("file is 1000 bytes short of what the header declares (incomplete download?) ({tmp}/sh/" + S2 + ")",),
         "re-download"),

    # §21 input paths
    Case("s21-missing-path", lambda t, mp: ["linear", FA, t / "nope"], 3, ("model path '{tmp}/nope' does not exist",)),
    Case("s21-dir-without-weights", lambda t, mp: ["linear", FA, (t / "empty").mkdir() or t / "empty"],
         3, ("no model.safetensors or model.safetensors.index.json in '{tmp}/empty'",)),
    Case("s21-not-a-checkpoint", lambda t, mp: ["linear", FA, put(t, "notes.txt", b"hello, this is not a model\n")],
         3, ("header length", "exceeds", "{tmp}/notes.txt"), "not a safetensors file"),
    Case("s21-lora-adapter", _lora, 2, ("model 2 '{tmp}/lora' is a LoRA adapter, and this merge has no base model",),
         "MODEL+ADAPTER"),
    Case("s21-lora-adapter-not-peft", lambda t, mp: ["task-arithmetic", FA, _lora(t, mp)[2]],
         3, ("adapter '{tmp}/lora': tensor 'lm_head.weight' is not a PEFT LoRA key",), "save_pretrained"),
    Case("s21-dev-null", cli("linear", FA, "/dev/null"), 3, ("model path '/dev/null' is a device",)),
    Case("s21-fifo", _fifo, 3, ("model path '{tmp}/pipe.safetensors' is a FIFO",)),
    Case("s21-permission-denied", _permission_denied, 3, ("cannot open file: Permission denied", "{tmp}/locked.safetensors")),

    # §22 symlinks
    Case("s22-broken-symlink", _symlinked_weights(lambda d: d.parent / "gone.safetensors"),
         3, ("'{tmp}/m/model.safetensors' is a broken symlink (to '{tmp}/gone.safetensors')",)),
    Case("s22-symlink-loop", _symlinked_weights(lambda d: d / "model.safetensors"),
         3, ("'{tmp}/m/model.safetensors' is a symlink loop",)),
    Case("s22-shard-outside-model-dir", _shard_outside,
         3, ("shard path '{tmp}/sh/" + S1 + "' resolves outside the model directory",)),

    # §23 index JSON
    Case("s23-index-not-json", reindex(text=lambda d: "{"), 3, ("index '{tmp}/sh/" + INDEX + "' is not valid JSON",)),
    Case("s23-no-weight-map", reindex(lambda d: d.pop("weight_map")), 3, ("has no 'weight_map' object",)),
    Case("s23-weight-map-not-dict", reindex(lambda d: d.__setitem__("weight_map", list(d["weight_map"]))),
         3, ("has no 'weight_map' object",)),
    Case("s23-non-string-shard", reindex(map_to(Q, 1)), 3, (f"shard of tensor '{Q}' is not a file name",),
         "fetch the model again"),
    Case("s23-duplicate-entry",
         reindex(text=lambda d: '{"weight_map": {"%s": "%s", %s}' % (Q, S2, json.dumps(d["weight_map"])[1:])),
         3, (f"lists '{Q}' twice",)),

    # §24 unsafe shard paths in the index
    *[Case(f"s24-{kind}", reindex(map_to(Q, shard)), 3, (f"unsafe shard path '{shard}'",))
      for kind, shard in [("absolute", "/etc/" + S1), ("dotdot", "../ft-b/" + S1), ("drive", "C:" + S1),
                          ("backslash", "sub\\" + S1), ("not-safetensors", "model-00001-of-00002.bin")]],

    # §25 index vs shards
    Case("s25-missing-shard", _missing_shard,
         3, ("shard '{tmp}/sh/" + S2 + "' listed in the index cannot be opened: No such file or directory",)),
    Case("s25-tensor-not-in-named-shard", reindex(map_to(Q, S2)),
         3, (f"puts tensor '{Q}' in '{S2}', which does not contain it",)),
    Case("s25-tensor-in-two-shards", _in_two_shards,
         3, ("is in both 'model-00003-of-00003.safetensors' and '" + S1 + "' of index '{tmp}/sh/" + INDEX,)),
    Case("s25-shard-tensor-not-in-index", reindex(lambda d: d["weight_map"].pop(Q)),
         3, (f"tensor '{Q}' of shard '{S1}' is missing from index",)),

    # §26 ambiguous or non-safetensors weights (never unpickled: the tree check would see UNPICKLED)
    Case("s26-single-file-and-index", _ambiguous, 3, ("ambiguous weights in '{tmp}/sh'",)),
    Case("s26-pickle-only-dir", _pickle_dir,
         3, ("'{tmp}/torch' holds pickle weights (.bin/.pt), not safetensors",), "never unpickles"),
    Case("s26-pt-file", lambda t, mp: ["linear", FA, put(t, "model.pt", evil_pickle(t))],
         3, ("'{tmp}/model.pt' is a pickle checkpoint (.pt)",), "never unpickles"),
    Case("s26-gguf-file", lambda t, mp: ["linear", FA, put(t, "model.gguf", b"GGUF\x03\x00\x00\x00" + bytes(64))],
         3, ("'{tmp}/model.gguf' is a GGUF file, not safetensors",)),

    # §27-29 models that do not fit together
    Case("s27-shape-mismatch", lambda t, mp: ["linear", FA, edited(t, setitem(UP, lambda a: a.T.copy()))],
         4, (f"shape mismatch for '{UP}'", f"model 1 '{FA}' [192, 64] vs model 2 '{{tmp}}/m' [64, 192]"), "same base"),
    Case("s28-vocab-rows", _vocab_rows, 4, ("the vocabulary sizes differ", "has 256 tokens", "has 300"), "tokenizer"),
    Case("s28-vocab-config", lambda t, mp: ["linear", FA, make_model(t / "m", config={"vocab_size": 320})],
         4, ("vocabulary sizes differ in config.json", "has 256 tokens", "'{tmp}/m' has 320"), "tokenizer"),
    Case("s29-missing-tensor", lambda t, mp: ["linear", FA, edited(t, lambda ts: ts.pop(UP))],
         4, (f"model 2 '{{tmp}}/m' does not match model 1 '{FA}'", f"missing 1 tensor(s): {UP}"), "same tensors"),
    Case("s29-different-architectures", cli("ties", BASE, INT / "ft-a"),
         4, ("different architectures (LlamaForCausalLM vs TinyIntModel)",), "one architecture"),

    # §30-32 dtypes and values
    Case("s30-fp8-with-scales", _two_files(_f8(b"\x38\x38\x38\x38"), _f8(b"\x3c\x3c\x3c\x3c")),
         4, ("model 1 '{tmp}/a.safetensors' is an FP8-quantised checkpoint (e.g. 'w_scale_inv')",), "dequantise"),
    Case("s30-float-vs-integer",
         lambda t, mp: ["linear", FA, edited(t, setitem("model.norm.weight", lambda a: a.astype(np.int32)))],
         4, ("tensor 'model.norm.weight' cannot be merged: dtypes model 1 F32, model 2 I32",), "integer tensor in another"),
    Case("s31-integer-tensors-differ",
         lambda t, mp: ["ties", INT / "base", edited(t, setitem("buffers.position_ids", lambda a: a + 1), src=INT / "ft-a")],
         4, ("integer tensor 'buffers.position_ids' differs between base and model 1 '{tmp}/m'",), "copied, never averaged"),
    Case("s32-nan-in-model", lambda t, mp: [*TIES[:3], edited(t, poke(Q, np.nan), src=FB), "-d", "0.5"],
         4, (f"model 2 '{{tmp}}/m' tensor '{Q}' has 1 NaN/Inf value(s)",), "--allow-nonfinite"),
    Case("s32-inf-in-base", lambda t, mp: ["ties", edited(t, poke(Q, np.inf, (1, 1)), "b", BASE), FA, FB],
         4, (f"base '{{tmp}}/b' tensor '{Q}' has 1 NaN/Inf value(s)",), "--allow-nonfinite"),

    # §33 parameters (CLI flags and recipe YAML), naming the field and the model
    Case("s33-density-negative", cli(*TIES, "-d", "-0.5"), 2, (f"'density' of model 1 '{FA}' must be >= 0, got -0.5",)),
    Case("s33-density-negative-second", cli(*TIES, "-d", "0.5", "-d", "-1"),
         2, (f"'density' of model 2 '{FB}' must be >= 0, got -1.0",)),
    Case("s33-density-nan", cli(*TIES, "-d", "nan"), 2, ("'density' of model 1", "must be finite, got nan"), False),
    Case("s33-density-not-a-number", cli(*TIES, "-d", "half"), 2, ("Invalid value for '--density'",), "npmerge ties --help"),
    Case("s33-density-wrong-type-yaml", recipe(ties_yaml("{density: abc}")),
         2, (f"'density' of model 1 '{FA}' must be a number, got 'abc'",), False),
    Case("s33-weight-nan", cli(*TIES, "-w", "1", "-w", "nan"), 2, (f"'weight' of model 2 '{FB}' must be finite",), False),
    Case("s33-weight-nan-yaml", recipe(ties_yaml("{weight: .nan}")), 2, (f"'weight' of model 1 '{FA}' must be finite",), False),
    Case("s33-weight-inf", cli(*TIES, "-w", "inf"), 2, ("'weight' of model 1", "must be finite, got inf"), False),
    Case("s33-all-weights-zero", cli("linear", FA, FB, "-w", "0"), 2, ("every model weight is 0",), "non-zero weight"),
    Case("s33-weights-sum-to-zero", cli("linear", FA, FB, "-w", "1", "-w", "-1"), 2, ("the model weights sum to 0",)),
    Case("s33-lambda-nan", cli(*TIES, "--lambda", "nan"), 2, ("parameter 'lambda' must be finite, got nan",), False),
    Case("s33-lambda-inf-yaml", recipe(ties_yaml(extra="parameters: {lambda: .inf}\n")),
         2, ("parameter 'lambda' must be finite, got inf",), False),
    Case("s33-wrong-number-of-values", cli(*TIES, "-d", "0.1", "-d", "0.2", "-d", "0.3"),
         2, ("got 3 --density values for 2 models",), "one per model"),

    # issue 5: unknown method, recipe YAML errors, missing base, bad option values
    Case("i5-unknown-method-cli", cli("dare", BASE, FA), 2, ("No such command 'dare'",), "npmerge --help"),
    Case("i5-unknown-method-yaml", recipe(ties_yaml().replace("ties", "fusion")), 2, ("unknown merge method 'fusion'",), "ties"),
    Case("i5-yaml-unknown-key", recipe(ties_yaml(extra="foo: 1\n")), 2, ("recipe.yml: unknown key 'foo'",), "known keys"),
    Case("i5-yaml-unknown-model-key", recipe(ties_yaml().replace(f"  - model: {FB}\n", f"  - model: {FB}\n    wieght: 1\n")),
         2, ("unknown key 'models[1].wieght'",), "parameters"),
    Case("i5-yaml-unknown-parameter", recipe(ties_yaml("{densty: 0.5}")),
         2, (f"unknown parameter 'densty' in parameters of model 1 '{FA}' (did you mean 'density'?)",), "weight, density"),
    Case("i5-yaml-unsupported-key", recipe(ties_yaml(extra="modules: {}\n")), 2, ("per-module recipes", "(key 'modules')"), False),
    Case("i5-yaml-models-wrong-type", recipe(f"merge_method: linear\nmodels: {FA}\n"),
         2, ("'models' must be a non-empty list",), "path/to/model"),
    Case("i5-yaml-model-path-wrong-type", recipe("merge_method: linear\nmodels: [{model: 5}]\n"),
         2, ("models[0].model must be a path string, got 5",), "Hub id"),
    Case("i5-yaml-normalize-wrong-type", recipe(ties_yaml(extra="parameters: {normalize: 'yes'}\n")),
         2, ("parameter 'normalize' must be true or false, got 'yes'",), False),
    Case("i5-yaml-not-a-mapping", recipe("- ties\n"), 2, ("must be a mapping",), False),
    Case("i5-yaml-invalid", recipe("merge_method: [\n"), 2, ("recipe.yml is not valid YAML",), False),
    Case("i5-yaml-missing-file", lambda t, mp: ["run", t / "nope.yml"],
         2, ("cannot read recipe '{tmp}/nope.yml': No such file or directory",), False),
    Case("i5-ties-without-base-yaml", recipe(ties_yaml(base=False)), 2, ("ties needs a base model",), "base_model"),
    Case("i5-ties-without-models-cli", cli("ties", BASE), 2, ("Missing argument 'MODEL",), "--help"),
    Case("i5-budget-too-small", cli(*TIES, "-d", "0.5", "--max-memory", "1KiB"),
         2, ("--max-memory 1.00 KiB is too small to merge tensor", "of 2 model(s)"), "allow at least"),
    Case("i5-bad-size", cli(*TIES, "--max-memory", "lots"), 2, ("invalid size 'lots'",), "512MiB"),
    Case("i5-bad-out-dtype", cli(*TIES, "--out-dtype", "int8"), 2, ("unsupported output dtype 'int8'",), "bfloat16"),
    Case("i5-zero-threads", cli(*TIES, "--threads", "0"), 2, ("--threads must be >= 1, got 0",), False),

    # issue 21: the methods of step 3, wrong model counts and parameter values
    Case("i21-nearswap-two-models", cli("nearswap", BASE, FA, FB, "--t", "0.1"),
         2, ("nearswap merges exactly 1 model(s) besides the base, got 2",)),
    Case("i21-arcee-fusion-two-models", cli("arcee-fusion", BASE, FA, FB),
         2, ("arcee_fusion merges exactly 1 model(s) besides the base, got 2",)),
    Case("i21-nearswap-no-t", cli("nearswap", BASE, FA), 2, ("missing parameter 't'",), "sameness threshold"),
    Case("i21-nearswap-t-zero", cli("nearswap", BASE, FA, "--t", "0"), 2, ("parameter 't' must be > 0, got 0.0",), False),
    Case("i21-ram-epsilon-negative", cli("ram", BASE, FA, "--epsilon", "-1e-5"),
         2, ("parameter 'epsilon' must be >= 0, got -1e-05",), "e.g. 1e-5"),
    Case("i21-ramplus-epsilon-negative-yaml",
         recipe(f"merge_method: ramplus_tl\nbase_model: {BASE}\nmodels: [{{model: {FA}}}, {{model: {FB}}}]\n"
                "parameters: {epsilon: -1}\n"), 2, ("parameter 'epsilon' must be >= 0, got -1.0",)),
    Case("i21-karcher-max-iter-zero", cli("karcher", FA, FB, "--max-iter", "0"),
         2, ("parameter 'max_iter' must be an integer >= 1, got 0",), "e.g. 10"),
    Case("i21-karcher-max-iter-fraction-yaml",
         recipe(f"merge_method: karcher\nmodels: [{{model: {FA}}}, {{model: {FB}}}]\nparameters: {{max_iter: 2.5}}\n"),
         2, ("parameter 'max_iter' must be an integer >= 1, got 2.5",)),
    Case("i21-karcher-one-model", cli("karcher", FA), 2, ("karcher needs at least 2 model(s)",)),
    Case("i21-karcher-all-zero", _zero_tensor_models, 4,
         ("karcher cannot merge tensor 'model.norm.weight': every input has norm <= tol = 1e-05 (norms 0, 0)",)),
    Case("i21-multislerp-weights-cancel", cli("multislerp", FA, FB, "-w", "1", "-w", "-1"),
         2, ("multislerp: the weights sum to 0 (1.0, -1.0)",), "--no-normalize-weights"),
    Case("i21-multislerp-weights-cancel-in-one-tensor-yaml",
         recipe(f"merge_method: multislerp\nmodels:\n  - model: {FA}\n    parameters: {{weight: 1}}\n"
                f"  - model: {FB}\n    parameters:\n      weight:\n        - filter: mlp.up_proj\n"
                "          value: -1\n        - value: 1\n"),
         2, ("tensor 'model.layers.0.mlp.up_proj.weight': multislerp: the weights sum to 0",)),

    # issue 26: hostile recipes get a short, clean error at load time
    Case("i26-added-token-id-1e20", _chat_tokenizer(_set_last_id(10**20)),
         3, ("{tmp}/chat/tokenizer.json: token '<|im_end|>' has id 100,000,000,000,000,000,000, far beyond",),
         "fetch it again"),
    Case("i26-added-token-id-1e9", _chat_tokenizer(_set_last_id(10**9)),
         3, ("token '<|im_end|>' has id 1,000,000,000, far beyond the other 81 tokens: the output vocabulary would "
             "have 1,000,000,001 rows",)),
    Case("i26-pad-to-multiple-huge", recipe(f"merge_method: linear\nmodels: [{{model: {VOCAB}/base}}, {{model: {VOCAB}/ft-chat}}]\n"
                                            "tokenizer: {source: union, pad_to_multiple_of: 1000000000000}\n"),
         2, ("tokenizer.pad_to_multiple_of 1,000,000,000,000 would pad 82 token rows to 1,000,000,000,000",), "64 or 128"),
    Case("i26-added-token-at-two-ids", _chat_tokenizer(lambda added: added.append(dict(added[-1], id=79)), "union"),
         3, ("{tmp}/chat/tokenizer.json: added token '<|im_end|>' is listed at two ids, 81 and 79",), "one entry per token"),
    Case("i24-one-file-output-is-a-directory", lambda t, mp: [*TIES, "-o", _mkdir(t / "merged.safetensors")],
         2, ("the output path {tmp}/merged.safetensors is an existing directory; an -o ending in .safetensors "
             "writes one file",), "a file path"),
    Case("i24-one-file-over-its-limit", lambda t, mp: [*TIES, "-o", t / "merged.safetensors", "--shard-size", "1KB"],
         2, ("a one-file output would hold", "above the limit of 1,000"), "--shard-size"),
    Case("i26-yaml-deep-flow", recipe("merge_method: linear\nmodels: " + "[" * 50_000 + "]" * 50_000 + "\n"),
         2, ("recipe.yml is not valid YAML: line 2", "nesting deeper than 64 levels")),
    Case("i26-yaml-deep-block", recipe("".join("  " * i + f"k{i}:\n" for i in range(3_000))),
         2, ("recipe.yml is not valid YAML: line 64", "nesting deeper than 64 levels")),
    Case("i26-yaml-alias-bomb", recipe(ties_yaml("{density: [&a0 [1,1,1,1,1,1,1,1,1,1], "
                                                 + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8))
                                                 + "]}")),
         2, ("recipe.yml is not valid YAML", "aliases expand it to more than 100,000 values")),
    Case("i26-huge-value-quoted-short", recipe(ties_yaml("{density: [" + ", ".join(["abc"] * 90_000) + "]}")),
         2, ("a gradient must be a list of numbers (or of booleans), got ['abc', 'abc',",), "[0.2, 0.5, 0.8]"),
    Case("i26-huge-unknown-key", recipe(ties_yaml(extra="? " + "x" * 200_000 + "\n: 1\n")),
         2, ("recipe.yml: unknown key 'xxxxxxxx", "more characters)"), "known keys"),

    # §34 the same model twice
    Case("s34-same-path-twice", cli("linear", FA, FA),
         2, (f"model 2 '{FA}' is the same model as model 1 '{FA}'",), "weight it instead"),
    Case("s34-same-via-symlink", _same_via_symlink, 2, ("model 2 '{tmp}/alias' is the same model as model 1",)),
    Case("s34-same-inode", _hard_link, 2, ("model 2 '{tmp}/hl' is the same model as model 1 '{tmp}/a'",)),
    Case("s34-base-as-merge-model", cli("ties", BASE, FA, BASE),
         2, (f"model 2 '{BASE}' is the same model as base '{BASE}'",)),

    # §35-37 output location, refused before anything is written
    Case("s35-out-is-input", _with_copy(lambda t, m: ["linear", FA, m, "-o", m]),
         2, ("the output directory {tmp}/m is the input {tmp}/m",), "outside every input"),
    Case("s35-out-inside-input", _with_copy(lambda t, m: ["linear", FA, m, "-o", m / "merged"]),
         2, ("the output directory {tmp}/m/merged is inside the input {tmp}/m",)),
    Case("s35-out-contains-input", _contains_input, 2, ("the output directory {tmp}/models contains the input",)),
    Case("s35-out-symlink-to-input", _symlink_to_input(inside=False), 2, ("the output directory {tmp}/alias is the input",)),
    Case("s35-out-inside-input-via-symlink", _symlink_to_input(inside=True),
         2, ("the output directory {tmp}/m/merged is inside the input",)),
    Case("s36-out-not-empty", _out_not_empty, 2, ("output directory exists and is not empty: {tmp}/out",), "--force"),
    Case("s36-out-is-a-file", _out_is_file, 2, ("the output path {tmp}/out exists and is not a directory",), False),
    Case("s37-parent-is-a-file", _parent_is_file, 2, ("the output's parent {tmp}/file is not a directory",)),
    Case("s37-unwritable-location", _unwritable, 5, ("output location not writable: /sys/.npmerge-test-unwritable-out",)),

    # §38 disk space
    Case("s38-not-enough-space", lambda t, mp: no_space(1000)(mp) or ["linear", FA, FB],
         5, ("not enough disk space for {tmp}/out: needs", "(1000 bytes) free"), "free some space"),
    Case("s38-enospc-mid-write", _enospc_mid_write, 5, ("disk full writing {tmp}/.out.npmerge-partial/",), "free some space"),

    # §40-42
    Case("s40-input-changed", _input_changed,
         3, ("input changed during the merge: {tmp}/m/model.safetensors: modification time",),
         "nothing was written", touches_inputs=True),
    Case("s41-overflow-f16", lambda t, mp: ["linear", FA, edited(t, poke(Q, 1e5), src=FB), "-w", "1", "-w", "1",
                                            "--no-normalize", "--out-dtype", "float16"],
         4, (f"merged tensor '{Q}' has 1 value(s) beyond the range of F16",), "wider --out-dtype"),
    Case("s42-locked-by-another-run", _locked,
         5, ("output {tmp}/out is locked by pid {pid} on host {host}",), "another npmerge run"),
    Case("s42-leftover-staging", _leftover, 5, ("{tmp}/.out.npmerge-partial exists: it is the incomplete output",), "--resume"),
]

_CASES = {c.id: c for c in REFUSED}
assert len(_CASES) == len(REFUSED), "duplicate case id"


def _run_case(case: Case, tmp_path: Path, monkeypatch, *extra: str):
    work = tmp_path / "w"
    work.mkdir()
    (tmp_path / "cwd").mkdir()  # a working directory holding no input: models are named by the paths given
    monkeypatch.chdir(tmp_path / "cwd")
    args = [str(a) for a in case.build(work, monkeypatch)]
    if "-o" not in args:
        args += ["-o", str(work / "out")]
    out = Path(args[args.index("-o") + 1])
    staging = out.parent / f".{out.name}.npmerge-partial"
    had = os.path.lexists(out), os.path.lexists(staging)
    before = tree(work, mtimes=not case.touches_inputs)
    res = run(*args, *extra)
    monkeypatch.undo()
    # nothing created, removed or changed: no output, staging, temporary file; inputs untouched
    assert tree(work, mtimes=not case.touches_inputs) == before
    assert (os.path.lexists(out), os.path.lexists(staging)) == had
    phrases = [p.replace("{tmp}", str(work)).replace("{pid}", str(os.getpid())).replace("{host}", socket.gethostname())
               for p in case.phrases]
    return res, phrases


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
@pytest.mark.timeout(60)  # a FIFO must never block
def test_refused(case, tmp_path, monkeypatch):
    res, phrases = _run_case(case, tmp_path, monkeypatch)
    assert_error(res, case.code, *phrases, hint=bool(case.hint))
    assert max(map(len, res.err.splitlines())) <= 1100, "a message line quotes too much of the input"
    if isinstance(case.hint, str):
        hints = [line for line in res.err.splitlines() if line.startswith("Hint: ")]
        assert any(case.hint in h for h in hints), res.err


@pytest.mark.parametrize("case_id", ["s21-missing-path", "s27-shape-mismatch", "s33-density-negative", "i5-unknown-method-cli",
                                     "s38-not-enough-space", "s42-locked-by-another-run"])
def test_json_errors(case_id, tmp_path, monkeypatch):
    """--json: same exit code, and the error as JSON on stdout."""
    case = _CASES[case_id]
    res, phrases = _run_case(case, tmp_path, monkeypatch, "--json")
    assert res.code == case.code and res.err.startswith("Error: ")
    error = json.loads(res.out)["error"]
    assert error["exit_code"] == case.code and error["code"] and all(p in error["message"] for p in phrases)
    assert bool(error["hint"]) == bool(case.hint)


# --------------------------------------------------------------------------- §1-20 hostile headers

def section(kind: str, phrase: str) -> int:
    """The §5 case (1-20) a hostile-corpus entry of test_safetensors_format.py exercises."""
    simple = {"HeaderTooSmall": 1, "HeaderTooLarge": 2, "InvalidHeaderLength": 3, "InvalidHeader": 4,
              "ValidationOverflow": 9, "TensorInvalidInfo": 10, "MisalignedSlice": 20,
              "Divergence:duplicate-name": 16, "Divergence:duplicate-metadata-key": 16,
              "Divergence:name-control-char": 18, "Divergence:dtype-map-form": 7, "Divergence:array-entry": 6,
              "Divergence:numpy-shape": 9}
    if kind in simple:
        return simple[kind]
    if kind == "InvalidOffset":
        return 11 if "gap" in phrase else 13 if "end before begin" in phrase else 12
    if kind == "MetadataIncompleteBuffer":
        return 14 if "unexpected bytes" in phrase else 15
    assert kind == "InvalidHeaderDeserialization", kind
    for words, number in [(("byte-order mark",), 4), (("nesting",), 19), (("duplicate '__metadata__'",), 16),
                          (("__metadata__",), 17), (("dtype",), 7), (("shape of", "data_offsets of", "NaN"), 8),
                          (("entry must be", "is missing", "must be an object", "duplicate '"), 6)]:
        if any(w in phrase for w in words):
            return number
    return 5  # other JSON errors


@pytest.mark.parametrize("name, data, kind, phrase", HOSTILE,
                         ids=[f"s{section(c[2], c[3]):02d}-{c[0]}" for c in HOSTILE])
def test_hostile_header_through_cli(tmp_path, name, data, kind, phrase):
    """Every hostile file of the format corpus, given to a merge: exit 3, one Error line naming
    the file and the problem, a hint, nothing written."""
    work = tmp_path / "w"
    work.mkdir()
    bad = put(work, f"{name}.safetensors", data)
    before = tree(work)
    res = run("linear", FA, bad, "-o", work / "out")
    assert_error(res, 3, str(bad), phrase)
    assert tree(work) == before


# --------------------------------------------------------------------------- accepted cases

@dataclass(frozen=True)
class Accepted:
    id: str
    build: Callable  # (work dir) -> CLI args; "-o <work>/out" is added
    note: str | None  # in merge_report.json's notes
    check: Callable | None = None  # (work dir, out dir) -> None


def _hf_cache(t):
    """A Hugging Face hub cache: snapshot files are symlinks into ../../blobs (allowed)."""
    repo = t / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in sorted(SA.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    return ["linear", SB, snap]


def _ints_copied(t, out):
    got, base = load_model(out), load_model(INT / "base")
    for name in ("buffers.position_ids", "buffers.mask"):
        assert got[name].dtype == base[name].dtype and np.array_equal(got[name], base[name])


def _old_output_replaced(t, out):
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def _force(t):
    (t / "out").mkdir()
    (t / "out" / "keep.txt").write_text("an earlier merge")
    return ["linear", FA, FB, "--force"]


def _f16_copy(t):
    return ["ties", BASE, edited(t, lambda ts: ts.update({k: v.astype(np.float16) for k, v in ts.items()})), FB, "-d", "0.5"]


def _base_in_models(t):
    """mergekit's habit: the base listed among the models (here with a weight): it is the base."""
    (t / "r.yml").write_text(f"merge_method: ties\nbase_model: {BASE}\nmodels:\n  - model: {BASE}\n"
                             f"    parameters: {{weight: 1.0}}\n  - model: {FA}\n    parameters: {{density: 0.5}}\n")
    return ["run", t / "r.yml"]


def _merge_keys(t):
    """YAML merge keys (`<<: *defaults`), as published recipes use them."""
    (t / "r.yml").write_text(f"merge_method: ties\nbase_model: {BASE}\nmodels:\n  - model: {FA}\n"
                             f"    parameters: &p {{density: 0.5, weight: 1.0}}\n  - model: {FB}\n"
                             f"    parameters:\n      <<: *p\n      weight: 0.5\n")
    return ["run", t / "r.yml"]


def _same_as_spelled_out(t, out):
    (t / "plain.yml").write_text(f"merge_method: ties\nbase_model: {BASE}\nmodels:\n  - model: {FA}\n"
                                 f"    parameters: {{density: 0.5, weight: 1.0}}\n  - model: {FB}\n"
                                 f"    parameters: {{density: 0.5, weight: 0.5}}\n")
    assert run("run", t / "plain.yml", "-o", t / "plain", "-q").code == 0
    assert (out / "model.safetensors").read_bytes() == (t / "plain" / "model.safetensors").read_bytes()
    shutil.rmtree(t / "plain")
    (t / "plain.yml").unlink()


def _linear_adapter_with_fan_in_fan_out(t):
    """A Llama adapter saved with fan_in_fan_out: true (PEFT ignores it for nn.Linear)."""
    shutil.copytree(LORA_QV, t / "adapter")
    cfg = json.loads((t / "adapter" / "adapter_config.json").read_text())
    (t / "adapter" / "adapter_config.json").write_text(json.dumps(dict(cfg, fan_in_fan_out=True)))
    return ["task-arithmetic", LLAMA_F32 / "base", t / "adapter", "-w", "1"]


ACCEPTED = [
    Accepted("s22-hf-cache-symlinks", _hf_cache, None),
    Accepted("s30-mixed-dtypes", _f16_copy, "have different dtypes across models; all are decoded to float32"),
    Accepted("s31-integer-tensors-copied", lambda t: ["ties", INT / "base", INT / "ft-a", "-d", "0.5"],
             "2 integer/bool tensor(s) copied from base", _ints_copied),
    Accepted("s32-allow-nonfinite", lambda t: [*TIES[:3], edited(t, poke(Q, np.nan), src=FB), "--allow-nonfinite"],
             f"tensor '{Q}' has NaN/Inf input values (model 2 1); merged anyway (--allow-nonfinite)"),
    Accepted("s33-negative-weight", lambda t: ["task-arithmetic", BASE, FA, FB, "-w", "1", "-w", "-0.5"],
             "model 2 has a negative weight (-0.5): its task vector is subtracted"),
    Accepted("s34-base-listed-in-models", _base_in_models,
             f"parameters of the base model '{BASE}' are ignored (weight): the base contributes no task vector"),
    Accepted("s36-force", _force, None, _old_output_replaced),
    Accepted("i26-yaml-merge-keys", _merge_keys, None, _same_as_spelled_out),
    Accepted("i26-fan-in-fan-out-on-linear", _linear_adapter_with_fan_in_fan_out,
             "adapter_config.json says fan_in_fan_out: true, but model.layers.0.self_attn.q_proj, "
             "model.layers.0.self_attn.v_proj, model.layers.1.self_attn.q_proj, model.layers.1.self_attn.v_proj "
             "are nn.Linear layers: applied as B @ A, as PEFT does"),
    Accepted("s29-tied-lm-head", _tied_lm_head, "'lm_head.weight' is merged, with the embeddings "
             "'model.embed_tokens.weight' as the head of tied, dead; config.json gets "
             "tie_word_embeddings: false", _tied_heads_merged),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_accepted(case, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    args = [*map(str, case.build(work)), "-o", str(work / "out")]
    inputs = lambda: {k: v for k, v in tree(work).items() if k != "out" and not k.startswith("out/")}  # noqa: E731
    before = inputs()
    res = run(*args, "-q")
    assert res.code == 0 and "Error" not in res.err, res.err
    report = json.loads((work / "out" / "merge_report.json").read_text())
    if case.note:
        assert any(case.note in n for n in report["notes"]), report["notes"]
    if case.check:
        case.check(work, work / "out")
    assert inputs() == before and litter(work) == []


# --------------------------------------------------------------------------- §39 interrupts

@pytest.mark.parametrize("sig, code, after_shards", [
    (signal.SIGINT, 130, 0), (signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 1),
], ids=["s39-sigint-before-any-shard", "s39-sigint-after-a-shard", "s39-sigterm-after-a-shard"])
def test_interrupted(tmp_path, monkeypatch, sig, code, after_shards):
    """A real signal to this process mid-merge: exit 130/143, no output; finished shards stay in
    staging (no lock, no .tmp) and --resume completes the merge; with none finished, nothing stays."""
    out = tmp_path / "out"
    args = ["linear", FA, FB, "-o", out, "--shard-size", "200KB", "-q"]
    real_finish, real_write = OutputWriter.finish_shard, OutputWriter.write
    sent = []

    def kill_once():
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), sig)  # the CLI's handler (SIGTERM) or Python's (SIGINT) raises

    def finish_shard(self, i, stats=None):
        real_finish(self, i, stats)
        if after_shards and i + 1 == after_shards:
            kill_once()

    def write(self, name, offset, data):
        if not after_shards:
            kill_once()
        return real_write(self, name, offset, data)

    monkeypatch.setattr(OutputWriter, "finish_shard", finish_shard)
    monkeypatch.setattr(OutputWriter, "write", write)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        res = run(*args)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert_error(res, code, "no output was written", hint=bool(after_shards))
    assert not out.exists()
    staging = tmp_path / ".out.npmerge-partial"
    if not after_shards:
        assert litter(tmp_path) == [] and sorted(os.listdir(tmp_path)) == []
        return
    assert "--resume" in res.err and manifest_lines(staging) == after_shards
    assert not (staging / "npmerge.lock").exists() and not list(staging.glob("*.tmp"))
    done = run(*args, "--resume")
    assert done.code == 0, done.err
    assert litter(tmp_path) == [] and (out / "merge_report.json").is_file()


# --------------------------------------------------------------------------- coverage

def test_catalogue_covers_every_case():
    """All 42 cases of §5 appear in some test id (the count the closing note gives)."""
    ids = [c.id for c in REFUSED] + [c.id for c in ACCEPTED] + ["s39-interrupted"]
    numbers = {int(i[1:3]) for i in ids if i.startswith("s")}
    numbers |= {section(kind, phrase) for _, _, kind, phrase in HOSTILE}
    assert numbers == set(range(1, 43)), sorted(set(range(1, 43)) - numbers)

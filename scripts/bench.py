#!/usr/bin/env python
"""npmerge benchmark: merge time against the machine's I/O and memory floors.

    python scripts/bench.py --params 1B                 # 1B set, all methods, 3 runs each
    python scripts/bench.py --params 100M --reference   # + the plain-NumPy reference TIES
    python scripts/bench.py --params 1B --methods ties,task-arithmetic --busy 0 --busy 1   # quiet and busy
    python scripts/bench.py --params 3B --methods ties  # inputs larger than RAM: cold, from disk
    python scripts/bench.py --params 1B --methods ties --max-memory 512MiB --max-memory 4GiB \\
        --threads 1 --threads 2 --json /tmp/bench.json

What it does, in one run and on the same files:

1. Generates (or reuses) a seeded set of Llama-shaped BF16 checkpoints, a base and
   ``--finetunes`` fine-tunes, under ``--cache`` (default ``~/.cache/npmerge-bench``) in
   ``<size>-<n>ft/``. Files are written tensor by tensor, a few M elements at a time (no
   model is ever held in RAM), sharded at 2 GB with ``model.safetensors.index.json``,
   plus a minimal ``config.json``. A marker file written last makes a half-generated set
   be regenerated. Shapes (all with tied embeddings, as the Llama-3.2 checkpoints):

   =====  ======  ======  =====  ======  =====  ===  ===========  ==========
   size   vocab   hidden  inter  layers  heads  kv   parameters   BF16/model
   =====  ======  ======  =====  ======  =====  ===  ===========  ==========
   tiny     8192     256    704       4      4    2       5.05 M     10 MB
   100M    32000     768   2048      12     12    4     100.1 M     200 MB
   1B     128256    2048   8192      16     32    8     1.236 B    2.47 GB
   3B     128256    3072   8192      28     24    8     3.213 B    6.43 GB
   =====  ======  ======  =====  ======  =====  ===  ===========  ==========

   1B and 3B are exactly Llama-3.2-1B / -3B (which tie lm_head to the embeddings, so
   there is no lm_head tensor). Values: base ~ N(0, 0.02) (RMSNorm weights 1 + N(0, 0.02)),
   fine-tune = base + Laplace(0, 1e-3) deltas, each rounded to BF16 (round to nearest
   even). Every slice of 4 Mi elements has its own seeded stream, so the bytes depend
   only on (size, fine-tunes, seed).

2. Measures, with the inputs warm in the page cache (all input files are read once before
   the floors and before every merge run; the resident fraction is checked with mincore):

   * the I/O floor: (a) reading every input byte once from the page cache (``readinto``
     into a reused buffer) plus (b) writing and fsyncing as many bytes as npmerge writes
     (in 16 MiB pieces, next to the merge outputs, then deleted);
   * a memory-bandwidth floor: ``np.add.reduce`` streaming over as many bytes as the input;
   * ``npmerge ties --density 0.2``, ``task-arithmetic`` and ``linear`` (or ``--methods``:
     any of METHOD_ARGS, e.g. dare-ties, slerp, model-stock) over base + fine-tunes, as
     whole processes (start-up included): wall, CPU (user+sys from ``wait4``), peak RSS
     (``ru_maxrss``) and peak anonymous memory (``RssAnon`` polled every 5 ms), median of
     ``--repeat`` runs, for each ``--max-memory`` x ``--threads`` x ``--busy``. Without
     ``--threads`` the first method (and every method under ``--busy``) also runs with one
     thread: the table shows each run against the 1-thread run (scaling; and on a busy
     machine, whether the default is ever slower than one thread);
   * ``--busy N``: N CPU-bound competitor processes spin during each merge (a machine that
     is not idle); ``--cold``: the inputs are evicted from the page cache before the read
     floor and every merge (POSIX_FADV_DONTNEED), so reading from disk is measured; implied
     when the inputs do not fit in RAM (e.g. ``--params 3B`` on a 24 GiB machine);
   * start-up: ``npmerge --help`` and ``python -c pass`` (median of 5), ``npmerge warmup``
     with an empty kernel cache (cold JIT) and again with it filled (warm);
   * with ``--reference`` (tiny and 100M only): ``tests/reference.py``'s plain-NumPy TIES
     over the same set, in its own process, with a bit-for-bit comparison to npmerge's.

Prints tables (absolute figures and ratios: merge wall / I/O floor, input GB merged per
second, peak anonymous memory / memory budget) and, with ``--json PATH``, writes every
figure as JSON. Needs only what ``pip install -e '.[test]'`` installs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = 1
MARKER = ".npmerge-bench-complete.json"
SLICE = 1 << 22  # elements generated at a time (part of the data's definition: seeds per slice)
SHARD_BYTES = 2_000_000_000  # like transformers' max_shard_size="2GB"
BASE_STD = 0.02
DELTA_SCALE = 1e-3
READ_BUFFER = 8 << 20
WRITE_PIECE = 16 << 20
MEMBW_BUFFER = 256 << 20
POLL_SECONDS = 0.005
GB = 1e9
MiB = 1 << 20

SIZES = {
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "100M": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4),
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),  # = Llama-3.2-1B
    "3B": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8),  # = Llama-3.2-3B
}
REFERENCE_SIZES = ("tiny", "100M")
# How each benchmarked method is called: (takes the base?, how many fine-tunes (None: all), extra arguments).
# Methods missing from the installed npmerge are skipped with a note.
METHOD_ARGS = {
    "ties": (True, None, ["--density", "{density}"]),
    "task-arithmetic": (True, None, []),
    "linear": (True, None, []),  # base + fine-tunes averaged
    "dare-ties": (True, None, ["--density", "{density}", "--seed", "1"]),
    "breadcrumbs": (True, None, ["--density", "{density}"]),
    "della": (True, None, ["--density", "{density}"]),
    "slerp": (True, 1, ["--t", "0.4"]),
    "model-stock": (True, None, []),
    "sce": (True, None, ["--select-topk", "0.5"]),
    "multislerp": (False, None, []),  # the fine-tunes themselves (no --base)
    "karcher": (False, None, []),
    "arcee-fusion": (True, 1, []),
    "nearswap": (True, 1, ["--t", "0.0001"]),
    "ram": (True, None, []),
    "ramplus-tl": (True, None, []),
}
METHODS = ("ties", "task-arithmetic", "linear")  # the default set


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ====================================================================== the data set
def tensor_layout(dims: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_norm) in transformers' state-dict order (tied embeddings)."""
    h, inter = dims["hidden_size"], dims["intermediate_size"]
    hd = h // dims["num_attention_heads"]
    q, kv = dims["num_attention_heads"] * hd, dims["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (dims["vocab_size"], h), False)]
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (q, h), False),
            (p + "self_attn.k_proj.weight", (kv, h), False),
            (p + "self_attn.v_proj.weight", (kv, h), False),
            (p + "self_attn.o_proj.weight", (h, q), False),
            (p + "mlp.gate_proj.weight", (inter, h), False),
            (p + "mlp.up_proj.weight", (inter, h), False),
            (p + "mlp.down_proj.weight", (h, inter), False),
            (p + "input_layernorm.weight", (h,), True),
            (p + "post_attention_layernorm.weight", (h,), True),
        ]
    out.append(("model.norm.weight", (h,), True))
    return out


def llama_config(dims: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": dims["hidden_size"] // dims["num_attention_heads"],
        "hidden_act": "silu",
        "hidden_size": dims["hidden_size"],
        "initializer_range": BASE_STD,
        "intermediate_size": dims["intermediate_size"],
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": dims["num_attention_heads"],
        "num_hidden_layers": dims["num_hidden_layers"],
        "num_key_value_heads": dims["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.2",
        "use_cache": True,
        "vocab_size": dims["vocab_size"],
    }


def shard_plan(layout) -> list[dict]:
    """Tensors (indices into layout) per shard, cut at SHARD_BYTES in state-dict order;
    inside a file tensors are laid out sorted by name, as the safetensors writer does."""
    shards, cur, size = [], [], 0
    for i, (_, shape, _) in enumerate(layout):
        nbytes = math.prod(shape) * 2
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += nbytes
    shards.append(cur)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    return [{"file": f, "tensors": sorted(s, key=lambda i: layout[i][0])} for f, s in zip(names, shards)]


def safetensors_header(entries) -> bytes:
    """8-byte length + compact JSON header (BF16 tensors, contiguous offsets), space-padded to 8."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def round_bf16(x: np.ndarray, tmp: np.ndarray, out: np.ndarray) -> None:
    """float32 -> BF16 bits, round to nearest even: (b + 0x7FFF + ((b >> 16) & 1)) >> 16."""
    b = x.view(np.uint32)
    np.right_shift(b, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, b, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    out[...] = tmp  # values < 2**16: exact narrowing


_scratch = threading.local()


def make_slice(seed: int, n_ft: int, t_idx: int, s_idx: int, count: int, is_norm: bool) -> list[np.ndarray]:
    """One slice of one tensor for every model (BF16 bit patterns): [base, ft-1, ...]."""
    s = getattr(_scratch, "bufs", None)
    if s is None:
        s = _scratch.bufs = {k: np.empty(SLICE, dt) for k, dt in
                             (("x", np.float32), ("tmp", np.uint32), ("base", np.uint32), ("sign", np.uint32))}
    x, tmp, base_bits, sign = (s[k][:count] for k in ("x", "tmp", "base", "sign"))
    out = [np.empty(count, np.uint16) for _ in range(n_ft + 1)]
    np.random.default_rng([seed, t_idx, s_idx, 0]).standard_normal(dtype=np.float32, out=x)
    x *= np.float32(BASE_STD)
    if is_norm:
        x += np.float32(1.0)
    round_bf16(x, tmp, out[0])
    base_bits[...] = out[0]
    base_bits <<= 16
    base = base_bits.view(np.float32)  # the BF16 base, exactly, as float32
    for j in range(1, n_ft + 1):
        rng = np.random.default_rng([seed, t_idx, s_idx, j])
        rng.standard_exponential(dtype=np.float32, out=x)  # Laplace = exponential x random sign
        bits = np.unpackbits(rng.bit_generator.random_raw((count + 63) // 64).view(np.uint8))[:count]
        np.left_shift(bits, np.uint32(31), out=sign)
        np.bitwise_or(x.view(np.uint32), sign, out=x.view(np.uint32))
        x *= np.float32(DELTA_SCALE)
        x += base
        round_bf16(x, tmp, out[j])
    return out


def model_names(n_ft: int) -> list[str]:
    return ["base"] + [f"ft-{i}" for i in range(1, n_ft + 1)]


def set_files(set_dir: Path, n_ft: int) -> dict[str, list[Path]]:
    """Safetensors files of each model of a set, in shard order."""
    out = {}
    for m in model_names(n_ft):
        d = set_dir / m
        index = d / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        out[m] = [d / f for f in files]
    return out


def marker_ok(set_dir: Path, size: str, n_ft: int, seed: int) -> bool:
    try:
        marker = json.loads((set_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    want = {"generator": GENERATOR_VERSION, "params": size, "finetunes": n_ft, "seed": seed}
    if any(marker.get(k) != v for k, v in want.items()):
        return False
    try:
        return all((set_dir / rel).stat().st_size == n for rel, n in marker["files"].items())
    except (OSError, KeyError, AttributeError):
        return False


def generate(set_dir: Path, size: str, n_ft: int, seed: int, workers: int) -> float:
    """Write the set tensor by tensor (bounded memory), fsync, then the completion marker."""
    dims = SIZES[size]
    layout = tensor_layout(dims)
    shards = shard_plan(layout)
    models = model_names(n_ft)
    model_bytes = sum(math.prod(s) * 2 for _, s, _ in layout)
    need = model_bytes * (len(models) + 2)
    if set_dir.exists():
        shutil.rmtree(set_dir)
    set_dir.mkdir(parents=True)
    free = shutil.disk_usage(set_dir).free
    if free < need:
        raise SystemExit(f"bench: {set_dir} has {free / GB:.1f} GB free; the set and the merge outputs "
                         f"need about {need / GB:.1f} GB")
    log(f"generating {size} x {len(models)} models ({model_bytes * len(models) / GB:.2f} GB) in {set_dir} ...")
    started = last_report = time.perf_counter()
    config = json.dumps(llama_config(dims), indent=2) + "\n"
    for m in models:
        (set_dir / m).mkdir()
        (set_dir / m / "config.json").write_text(config)
    done, total = 0, model_bytes * len(models)
    window = 2 * workers + 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for shard in shards:
            header = safetensors_header([(layout[i][0], layout[i][1]) for i in shard["tensors"]])
            files = [open(set_dir / m / shard["file"], "wb") for m in models]
            try:
                for f in files:
                    f.write(header)
                pending: deque = deque()

                def drain_one():
                    nonlocal done
                    for f, part in zip(files, pending.popleft().result()):
                        f.write(memoryview(part))
                        done += part.nbytes

                for t_idx in shard["tensors"]:
                    _, shape, is_norm = layout[t_idx]
                    n = math.prod(shape)
                    for s_idx, start in enumerate(range(0, n, SLICE)):
                        pending.append(pool.submit(make_slice, seed, n_ft, t_idx, s_idx,
                                                   min(SLICE, n - start), is_norm))
                        if len(pending) >= window:
                            drain_one()
                        now = time.perf_counter()
                        if now - last_report > 10:
                            last_report = now
                            log(f"  {done / total:5.1%}  {now - started:6.1f} s")
                while pending:
                    drain_one()
                for f in files:
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                for f in files:
                    f.close()
    if len(shards) > 1:
        weight_map = {layout[i][0]: s["file"] for s in shards for i in s["tensors"]}
        index = {"metadata": {"total_size": model_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        for m in models:
            (set_dir / m / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    files = {str(p.relative_to(set_dir)): p.stat().st_size for p in sorted(set_dir.rglob("*")) if p.is_file()}
    marker = {"generator": GENERATOR_VERSION, "params": size, "finetunes": n_ft, "seed": seed, "files": files}
    with open(set_dir / MARKER, "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    log(f"  generated in {seconds:.1f} s ({total / GB / seconds:.2f} GB/s)")
    return seconds


# ====================================================================== floors
def read_all(files: list[Path], buf: bytearray) -> tuple[int, float]:
    """Read every byte of files once into a reused buffer; (bytes, seconds)."""
    mv = memoryview(buf)
    total = 0
    started = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - started


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages go at once): the next read
    comes from disk. Needs no privileges, unlike /proc/sys/vm/drop_caches."""
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Competitors:
    """`n` CPU-bound processes running while the block runs: a machine that is not idle."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        spin = "import time\nwhile True:\n    sum(i * i for i in range(100000))\n"
        self.procs = [subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(self.n)]
        if self.procs:
            time.sleep(0.5)  # let them start spinning
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        return False


def write_fsync(directory: Path, nbytes: int, piece: np.ndarray) -> float:
    """Write nbytes (in WRITE_PIECE pieces) to a new file in directory, fsync, close; seconds."""
    path = directory / ".bench-write-floor.tmp"
    mv = memoryview(piece)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, mv[:min(len(mv), left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def memory_bandwidth(nbytes: int) -> tuple[int, float]:
    """np.add.reduce over a reused 256 MiB buffer, repeated to cover nbytes; (bytes, seconds)."""
    buf = np.ones(MEMBW_BUFFER // 8, np.uint64)
    np.add.reduce(buf)
    reps = max(1, -(-nbytes // buf.nbytes))
    started = time.perf_counter()
    for _ in range(reps):
        np.add.reduce(buf)
    return reps * buf.nbytes, time.perf_counter() - started


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore); None where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = os.sysconf("SC_PAGE_SIZE")
        resident = pages = 0
        for p in files:
            size = p.stat().st_size
            if not size:
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                try:
                    n = -(-size // page)
                    vec = np.zeros(n, np.uint8)
                    if libc.mincore(addr, size, vec.ctypes.data) != 0:
                        return None
                    resident += int(np.count_nonzero(vec & 1))
                    pages += n
                finally:
                    libc.munmap(addr, size)
            finally:
                os.close(fd)
        return resident / pages if pages else 1.0
    except (OSError, AttributeError):
        return None


# ====================================================================== child processes
def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall, CPU (user+sys), peak RSS (wait4) and peak RssAnon/RssFile (polled)."""
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, env=env)
        peak = {"anon": 0, "file": 0}
        stop = threading.Event()

        def poll():
            status = f"/proc/{proc.pid}/status"
            while True:
                try:
                    with open(status, "rb") as f:
                        text = f.read()
                except OSError:
                    return
                for line in text.split(b"\n"):
                    if line.startswith(b"RssAnon:"):
                        peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
                    elif line.startswith(b"RssFile:"):
                        peak["file"] = max(peak["file"], int(line.split()[1]) * 1024)
                if stop.wait(POLL_SECONDS):
                    return

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        stop.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err_f.seek(0)
        stderr = err_f.read().decode(errors="replace")
        out_f.seek(0)
        stdout = out_f.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} exited {proc.returncode}:\n{stderr}{stdout}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "user": ru.ru_utime, "sys": ru.ru_stime,
            "max_rss": ru.ru_maxrss * 1024, "peak_anon": peak["anon"], "peak_file": peak["file"],
            "stdout": stdout}


NPMERGE = [sys.executable, "-m", "npmerge"]


def summarize(runs: list[dict]) -> dict:
    keys = ("wall", "cpu", "user", "sys", "max_rss", "peak_anon", "peak_file")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["wall_min"] = min(r["wall"] for r in runs)
    out["wall_max"] = max(r["wall"] for r in runs)
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def kernel_cache_state(extra: Path | None = None) -> dict[str, int]:
    """mtime of every Numba cache file where npmerge may cache kernels: a run that changes it
    compiled a kernel (e.g. because npmerge's source changed) and did not measure the merge."""
    dirs = {extra} if extra else set()
    if os.environ.get("NUMBA_CACHE_DIR"):
        dirs.add(Path(os.environ["NUMBA_CACHE_DIR"]))
    try:
        from npmerge.kernels import cache_dir_candidates  # does not import numba

        dirs.update(cache_dir_candidates())
    except ImportError:
        pass
    state = {}
    for d in dirs:
        if d.is_dir():
            for p in d.rglob("*.nb[ic]"):
                try:
                    state[str(p)] = p.stat().st_mtime_ns
                except OSError:
                    pass
    return state


def run_without_jit(cmd: list[str], env: dict | None = None, retries: int = 2,
                    cache_dir: Path | None = None, before=None) -> dict:
    """run_measured, repeated (up to `retries` times) while the run compiled kernels."""
    discarded = 0
    while True:
        if before:
            before()
        state = kernel_cache_state(cache_dir)
        run = run_measured(cmd, env)
        run["jit_compiled"] = kernel_cache_state(cache_dir) != state
        if not run["jit_compiled"] or discarded >= retries:
            run["discarded_jit_runs"] = discarded
            return run
        discarded += 1
        log(f"  (that run compiled kernels -- npmerge's source changed? -- {run['wall']:.2f} s discarded)")


# ====================================================================== reference TIES
def read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def model_tensors(model_dir: Path) -> dict[str, tuple[Path, int, dict]]:
    """name -> (file, data start, header entry) over every shard of a model dir."""
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out = {}
    for name in files:
        start, header = read_header(model_dir / name)
        for t, entry in header.items():
            out[t] = (model_dir / name, start, entry)
    return out


def reference_worker(argv: list[str]) -> None:
    """Hidden mode: OUT_FILE TIMINGS_JSON DENSITY BASE FT... -- tests/reference.py's TIES."""
    out_file, timings_file, density, base_dir, *ft_dirs = argv
    sys.path.insert(0, str(REPO / "tests"))
    import ml_dtypes  # noqa: F401  (lets the safetensors library hand out BF16 numpy arrays)
    import reference
    from safetensors import safe_open

    t = {"load": 0.0, "merge": 0.0, "encode": 0.0, "write": 0.0}
    started = time.perf_counter()
    dirs = [Path(base_dir)] + [Path(d) for d in ft_dirs]
    where = [model_tensors(d) for d in dirs]
    handles: dict[Path, object] = {}

    def get(i, name):
        path = where[i][name][0]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="numpy")
        return handles[path].get_tensor(name)

    names = sorted(where[0])
    entries = [(n, tuple(where[0][n][2]["shape"])) for n in names]
    n_ft = len(ft_dirs)
    with open(out_file, "wb") as f:
        f.write(safetensors_header(entries))
        for name in names:
            t0 = time.perf_counter()
            arrays = [reference.to_f32_bf16(get(i, name).view(np.uint16)) for i in range(len(dirs))]
            t1 = time.perf_counter()
            merged = reference.ties(arrays[0], arrays[1:], [1.0] * n_ft, [float(density)] * n_ft)
            t2 = time.perf_counter()
            bits = reference.from_f32_bf16(merged)
            t3 = time.perf_counter()
            f.write(memoryview(np.ascontiguousarray(bits)))
            t4 = time.perf_counter()
            t["load"] += t1 - t0
            t["merge"] += t2 - t1
            t["encode"] += t3 - t2
            t["write"] += t4 - t3
        t0 = time.perf_counter()
        f.flush()
        os.fsync(f.fileno())
        t["write"] += time.perf_counter() - t0
    t["total_in_process"] = time.perf_counter() - started
    Path(timings_file).write_text(json.dumps(t))


def compare_outputs(ref_file: Path, npmerge_dir: Path) -> dict:
    """Bit-for-bit comparison of every tensor (reference file vs npmerge's model dir)."""
    ref_start, ref_header = read_header(ref_file)
    ours = model_tensors(npmerge_dir)
    differ = elements = 0
    missing = sorted(set(ref_header) ^ set(ours))
    for name, entry in ref_header.items():
        if name not in ours:
            continue
        path, start, other = ours[name]
        a = np.memmap(ref_file, np.uint16, "r", ref_start + entry["data_offsets"][0],
                      (entry["data_offsets"][1] - entry["data_offsets"][0]) // 2)
        b = np.memmap(path, np.uint16, "r", start + other["data_offsets"][0],
                      (other["data_offsets"][1] - other["data_offsets"][0]) // 2)
        if other["dtype"] != "BF16" or a.shape != b.shape:
            differ += 1
            continue
        bad = int(np.count_nonzero(a != b))
        if bad:
            differ += 1
            elements += bad
    return {"tensors": len(ref_header), "tensors_differing": differ, "elements_differing": elements,
            "missing_tensors": missing, "identical": differ == 0 and not missing}


# ====================================================================== machine
def machine_info(cache: Path) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                mem[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    import numba

    try:
        from npmerge import __version__ as npmerge_version
    except ImportError:
        npmerge_version = None
    git = {}
    for key, cmd in (("commit", ["git", "rev-parse", "--short", "HEAD"]),
                     ("dirty_files", ["git", "status", "--porcelain", "--", "npmerge"])):
        try:
            text = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout
            git[key] = text.strip() if key == "commit" else len(text.splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total": mem.get("MemTotal"),
        "mem_available": mem.get("MemAvailable"),
        "disk_free": shutil.disk_usage(cache).free,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "npmerge": npmerge_version,
        "npmerge_git": git,
    }


# ====================================================================== main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark npmerge against the I/O and memory-bandwidth floors on generated "
                    "Llama-shaped BF16 checkpoints (see the module docstring for details).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="1B", type=lambda s: {k.lower(): k for k in SIZES}.get(s.lower(), s),
                   choices=list(SIZES), help="model size of the generated set")
    p.add_argument("--finetunes", type=int, default=3, help="number of fine-tunes merged")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated set")
    xdg = os.environ.get("XDG_CACHE_HOME")
    p.add_argument("--cache", type=Path, default=(Path(xdg) if xdg else Path.home() / ".cache") / "npmerge-bench",
                   help="cache root: the set lives in CACHE/<size>-<n>ft (reused when complete); merge "
                        "outputs go to CACHE/runs (removed after each run)")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration (the median is reported)")
    p.add_argument("--methods", action="append", default=None,
                   help=f"methods to run, comma-separated or repeated (default: {','.join(METHODS)})")
    p.add_argument("--density", type=float, default=0.2, help="TIES density")
    p.add_argument("--max-memory", action="append", default=None,
                   help="npmerge --max-memory (repeat to compare, e.g. 512MiB and 4GiB; default: npmerge's)")
    p.add_argument("--threads", action="append", type=int, default=None,
                   help="npmerge --threads (repeat to compare, e.g. 1 and 2; default: npmerge's = all cores)")
    p.add_argument("--busy", action="append", type=int, default=None,
                   help="CPU-bound competitor processes running during each merge (repeat to compare, e.g. 0 "
                        "and 1; default 0); with --busy and no --threads, each merge also runs with --threads 1")
    p.add_argument("--cold", action="store_true",
                   help="evict the inputs from the page cache (POSIX_FADV_DONTNEED) before the read floor and "
                        "before every merge: figures include reading from disk (implied when the inputs do not "
                        "fit in RAM)")
    p.add_argument("--lora", action="store_true",
                   help="instead: TIES over --finetunes LoRA adapters (r=16 on every linear layer) of the set's base "
                        "next to TIES over the same fine-tunes as full models, with their I/O floors "
                        "(scripts/bench_lora.py)")
    p.add_argument("--cold-jit", action="store_true",
                   help="instead: the cold start, from empty kernel caches: the README's demo merge, the first "
                        "merge of each of --methods (default: all) and `npmerge warmup` (scripts/bench_cold.py)")
    p.add_argument("--reference", action="store_true",
                   help=f"also time tests/reference.py's plain-NumPy TIES ({' and '.join(REFERENCE_SIZES)} only)")
    p.add_argument("--gen-workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="threads generating the set")
    p.add_argument("--regenerate", action="store_true", help="regenerate the set even if it is complete")
    p.add_argument("--generate-only", action="store_true", help="only make sure the set exists, measure nothing")
    p.add_argument("--json", type=Path, default=None, help="write every figure as JSON to this path")
    args = p.parse_args(argv)
    args.cold_methods = args.methods or []
    methods = []
    for item in args.methods or [",".join(METHODS)]:
        for m in item.split(","):
            m = m.strip().replace("_", "-")
            if not m:
                continue
            if m not in METHOD_ARGS and not args.cold_jit:  # bench_cold.py checks its own
                p.error(f"unknown method {m!r}; choose from {', '.join(METHOD_ARGS)}")
            if m not in methods:
                methods.append(m)
    args.methods = methods
    if args.reference and args.params not in REFERENCE_SIZES:
        p.error(f"--reference loads whole tensors and sorts them: only for --params {' or '.join(REFERENCE_SIZES)}")
    if args.finetunes < 1:
        p.error("--finetunes must be >= 1")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def _sibling(script: str, argv: list[str]) -> int:
    """Run another benchmark script of this folder with `argv`; its exit code."""
    return subprocess.call([sys.executable, str(Path(__file__).resolve().parent / script), *argv])


def human(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GiB" else f"{nbytes / scale:.0f} {unit}"
    return f"{nbytes:.0f} B"


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--reference-worker"]:
        reference_worker(argv[1:])
        return 0
    args = parse_args(argv)
    if args.cold_jit:  # its own script (which uses this one's helpers): run, not imported
        return _sibling("bench_cold.py", [x for m in args.cold_methods for x in ("--methods", m)]
                        + ["--busy", str((args.busy or [0])[0]), "--repeat", str(args.repeat)]
                        + (["--json", str(args.json)] if args.json else []))
    if args.lora:
        return _sibling("bench_lora.py", ["--params", args.params, "--adapters", str(args.finetunes), "--density",
                                          str(args.density), "--repeat", str(args.repeat), "--seed", str(args.seed),
                                          "--cache", str(args.cache)] + (["--json", str(args.json)] if args.json else [])
                        + (["--max-memory", args.max_memory[0]] if args.max_memory else []))
    cache = args.cache.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    set_dir = cache / f"{args.params}-{args.finetunes}ft"
    runs_dir = cache / "runs"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)
    runs_dir.mkdir()
    results: dict = {"benchmark": "npmerge", "version": GENERATOR_VERSION,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results["machine"] = machine_info(cache)
    results["config"] = {"params": args.params, "finetunes": args.finetunes, "seed": args.seed,
                         "repeat": args.repeat, "methods": args.methods, "density": args.density,
                         "max_memory": args.max_memory, "threads": args.threads, "busy": args.busy or [0],
                         "cache": str(cache), "command": NPMERGE}

    # -- the set
    generated_seconds = None
    if args.regenerate or not marker_ok(set_dir, args.params, args.finetunes, args.seed):
        generated_seconds = generate(set_dir, args.params, args.finetunes, args.seed, args.gen_workers)
    else:
        log(f"reusing {set_dir}")
    if args.generate_only:
        shutil.rmtree(runs_dir, ignore_errors=True)
        return 0
    files = set_files(set_dir, args.finetunes)
    models = model_names(args.finetunes)
    inputs = [p for m in models for p in files[m]]
    input_bytes = sum(p.stat().st_size for p in inputs)
    base_tensor_bytes = sum(e[2]["data_offsets"][1] - e[2]["data_offsets"][0]
                            for e in model_tensors(set_dir / "base").values())
    layout = tensor_layout(SIZES[args.params])
    results["dataset"] = {
        "path": str(set_dir), "models": models, "parameters_per_model": sum(math.prod(s) for _, s, _ in layout),
        "tensors_per_model": len(layout), "shards_per_model": len(files["base"]),
        "input_bytes": input_bytes, "output_bytes": base_tensor_bytes,
        "generated_seconds": generated_seconds,
    }
    mem_avail = results["machine"]["mem_available"] or 0
    cold = args.cold or bool(mem_avail and input_bytes > 0.8 * mem_avail)
    if cold and not args.cold:
        log(f"the inputs ({input_bytes / GB:.1f} GB) do not fit in the page cache ({mem_avail / GB:.1f} GB "
            "available): measuring cold (every run reads from disk)")
    results["config"]["cold"] = cold
    read_buf = bytearray(READ_BUFFER)

    def warm() -> float | None:
        """Inputs as each run should find them: in the page cache, or (cold) evicted."""
        if cold:
            evict(inputs)
        else:
            read_all(inputs, read_buf)
            os.sync()
        return resident_fraction(inputs)

    # -- start-up and JIT
    log("start-up and JIT ...")
    startup = {}
    startup["python"] = summarize([run_measured([sys.executable, "-c", "pass"]) for _ in range(5)])
    startup["help"] = summarize([run_measured(NPMERGE + ["--help"]) for _ in range(5)])
    # the merges below use the default kernel cache, filled here for their methods (BF16 sets)
    warmup = NPMERGE + ["warmup", "--dtype", "bfloat16"] + [x for m in args.methods for x in ("--method", m)]
    run_measured(warmup)
    warm_run = run_without_jit(warmup, dict(os.environ), cache_dir=None)
    startup["jit_warm"] = summarize([warm_run])
    startup["jit_warm"]["jit_compiled"] = warm_run["jit_compiled"]
    results["startup"] = startup

    # -- floors
    log("floors ...")
    resident = warm()
    piece = np.random.default_rng(0).integers(0, 256, WRITE_PIECE, dtype=np.uint8)
    reads, writes = [], []
    for _ in range(args.repeat):
        if cold:
            evict(inputs)
        n, s = read_all(inputs, read_buf)
        assert n == input_bytes
        reads.append(s)
        os.sync()
        writes.append(write_fsync(runs_dir, base_tensor_bytes, piece))
    del piece
    mem_bytes, mem_seconds = memory_bandwidth(input_bytes)
    read_s, write_s = statistics.median(reads), statistics.median(writes)
    mem_s = mem_seconds * input_bytes / mem_bytes
    results["floor"] = {
        "page_cache_resident": resident,
        "read": {"bytes": input_bytes, "seconds": read_s, "gbps": input_bytes / read_s / GB, "runs": reads,
                 "buffer_bytes": READ_BUFFER},
        "write": {"bytes": base_tensor_bytes, "seconds": write_s, "gbps": base_tensor_bytes / write_s / GB,
                  "runs": writes, "piece_bytes": WRITE_PIECE},
        "io_floor_seconds": read_s + write_s,
        "memory": {"bytes": input_bytes, "seconds": mem_s, "gbps": mem_bytes / mem_seconds / GB,
                   "buffer_bytes": MEMBW_BUFFER},
    }
    io_floor = read_s + write_s

    # -- merges
    merges = []
    keep_for_reference = None
    for method in args.methods:
        if subprocess.run(NPMERGE + [method, "--help"], capture_output=True).returncode != 0:
            log(f"{method}: not in this npmerge, skipped")
            continue
        takes_base, n_ft, template = METHOD_ARGS[method]
        names = (models[:1] if takes_base else []) + models[1:][:n_ft]
        inputs_args = [str(set_dir / m) for m in names]
        method_args = [a.format(density=args.density) for a in template]
        for busy in args.busy or [0]:
            # 1 vs N threads: every method of the default set, and under load, gets a 1-thread run too
            thread_list = args.threads or ([None, 1] if (method == args.methods[0] or busy) else [None])
            for mem in args.max_memory or [None]:
                for threads in thread_list:
                    extra = (["--max-memory", mem] if mem else []) + (["--threads", str(threads)] if threads else [])
                    cmd = NPMERGE + [method] + inputs_args + method_args + extra
                    plan = json.loads(run_measured(cmd + ["-o", str(runs_dir / "dry-run"), "--dry-run", "--json"])
                                      ["stdout"])
                    label = f"{method} max-memory={mem or 'default'} threads={threads or 'default'} busy={busy}"
                    runs = []
                    for r in range(args.repeat):
                        out = runs_dir / f"{method}-{r}"
                        log(f"{label}: run {r + 1}/{args.repeat} ...")
                        resident = {}

                        def prepare():
                            shutil.rmtree(out, ignore_errors=True)
                            run_measured(warmup)  # recompiles here, untimed, if the source changed
                            resident["value"] = warm()

                        with Competitors(busy):
                            run = run_without_jit(cmd + ["-o", str(out), "--quiet"], before=prepare)
                        run.pop("stdout")
                        run["page_cache_resident"] = resident["value"]
                        run["output_bytes"] = dir_bytes(out)
                        report = json.loads((out / "merge_report.json").read_text())
                        run["input_passes"] = report["totals"]["input_passes"]
                        runs.append(run)
                        if args.reference and method == "ties" and keep_for_reference is None:
                            keep_for_reference = out
                        else:
                            shutil.rmtree(out)
                        log(f"  {run['wall']:.2f} s wall, {run['cpu']:.2f} s CPU, "
                            f"peak anon {human(run['peak_anon'])}")
                    med = summarize(runs)
                    budget = plan["memory_budget"]
                    merges.append({
                        "method": method, "max_memory": mem, "threads": threads, "busy": busy, "command": cmd,
                        "plan": {k: plan[k] for k in ("memory_budget", "working_memory", "span_elements", "threads",
                                                      "read_bytes", "streamed_bytes", "write_bytes")},
                        "runs": runs, "median": med,
                        "discarded_jit_runs": sum(r["discarded_jit_runs"] for r in runs),
                        "jit_compiled_runs": sum(r["jit_compiled"] for r in runs),
                        "ratios": {
                            "wall_over_io_floor": med["wall"] / io_floor,
                            "wall_over_read_floor": med["wall"] / read_s,
                            "input_gbps": plan["read_bytes"] / med["wall"] / GB,
                            "streamed_gbps": plan["read_bytes"] * runs[0]["input_passes"] / med["wall"] / GB,
                            "passes": runs[0]["input_passes"],  # as run (the plan counts the most a method may need)
                            "cpu_over_wall": med["cpu"] / med["wall"],
                            "peak_anon_over_budget": med["peak_anon"] / budget,
                            "min_page_cache_resident": min((r["page_cache_resident"] for r in runs
                                                            if r["page_cache_resident"] is not None), default=None),
                        },
                    })
    for x in merges:  # each configuration against the same one with 1 thread (scaling, and the busy rule)
        one = next((y for y in merges if (y["method"], y["max_memory"], y["busy"]) == (x["method"], x["max_memory"],
                    x["busy"]) and y["threads"] == 1), None)
        x["ratios"]["wall_over_1thread"] = x["median"]["wall"] / one["median"]["wall"] if one else None
    results["merges"] = merges

    # -- reference
    if args.reference:
        log("reference TIES (plain NumPy) ...")
        ref_out = runs_dir / "reference.safetensors"
        timings = runs_dir / "reference-timings.json"
        warm()
        run = run_measured([sys.executable, str(Path(__file__).resolve()), "--reference-worker", str(ref_out),
                            str(timings), str(args.density)] + inputs_args)
        run.pop("stdout")
        ref = {"median": run, "phases": json.loads(timings.read_text())}
        if keep_for_reference is not None:
            ref["bit_exact"] = compare_outputs(ref_out, keep_for_reference)
            shutil.rmtree(keep_for_reference)
            ties_runs = [m for m in merges if m["method"] == "ties"]
            ref["npmerge_ties_wall"] = ties_runs[0]["median"]["wall"]
            ref["speedup"] = run["wall"] / ties_runs[0]["median"]["wall"]
        ref_out.unlink()
        timings.unlink()
        results["reference"] = ref
    shutil.rmtree(runs_dir, ignore_errors=True)

    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    render(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


def render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(170, shutil.get_terminal_size((170, 40)).columns))
    m, d, fl = r["machine"], r["dataset"], r["floor"]
    con.print(f"[bold]machine[/]: {m['nproc']} CPUs ({m['cpu_model']}), {human(m['mem_total'] or 0)} RAM "
              f"({human(m['mem_available'] or 0)} available), Linux {m['kernel']}, Python {m['python']}, "
              f"NumPy {m['numpy']}, Numba {m['numba']}, npmerge {m['npmerge']} (git {m['npmerge_git'].get('commit')}, "
              f"{m['npmerge_git'].get('dirty_files')} uncommitted file(s) under npmerge/)")
    con.print(f"[bold]data[/]: {r['config']['params']} set, {len(d['models'])} models x "
              f"{d['parameters_per_model'] / 1e6:,.1f} M params ({d['tensors_per_model']} tensors, "
              f"{d['shards_per_model']} shard(s)) = {d['input_bytes'] / GB:.3f} GB input, "
              f"{d['output_bytes'] / GB:.3f} GB output; {d['path']}"
              + (f"; generated in {d['generated_seconds']:.1f} s" if d["generated_seconds"] else "; reused"))
    res = fl["page_cache_resident"]
    con.print(f"[bold]page cache[/]: {res:.1%} of the input resident before the floors" if res is not None
              else "[bold]page cache[/]: residency unknown")

    t = Table(title=f"Floors (median of {len(fl['read']['runs'])})")
    for c in ("floor", "bytes", "seconds", "GB/s"):
        t.add_column(c, justify="left" if c == "floor" else "right")
    t.add_row("(a) read all inputs, warm page cache", f"{fl['read']['bytes'] / GB:.3f} GB",
              f"{fl['read']['seconds']:.3f}", f"{fl['read']['gbps']:.2f}")
    t.add_row("(b) write + fsync output-sized file", f"{fl['write']['bytes'] / GB:.3f} GB",
              f"{fl['write']['seconds']:.3f}", f"{fl['write']['gbps']:.2f}")
    t.add_row("[bold]I/O floor = (a) + (b)", "", f"[bold]{fl['io_floor_seconds']:.3f}", "")
    t.add_row("memory bandwidth (np.add.reduce, 1 thread)", f"{fl['memory']['bytes'] / GB:.3f} GB",
              f"{fl['memory']['seconds']:.3f}", f"{fl['memory']['gbps']:.2f}")
    con.print(t)

    merges = r["merges"]

    def config(x):
        return [x["method"], f"{x['max_memory'] or 'default'} ({human(x['plan']['memory_budget'])})",
                str(x["plan"]["threads"]), str(x.get("busy", 0))]

    t = Table(title=f"Merges: absolute (median of {r['config']['repeat']} runs; whole process incl. start-up)")
    for c in ("method", "--max-memory (budget)", "threads", "busy", "wall s", "min-max s", "CPU s", "peak RSS",
              "peak anon", "output", "JIT runs discarded"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for x in merges:
        md = x["median"]
        t.add_row(*config(x), f"{md['wall']:.2f}", f"{md['wall_min']:.2f}-{md['wall_max']:.2f}", f"{md['cpu']:.2f}",
                  human(md["max_rss"]), human(md["peak_anon"]), f"{x['runs'][0]['output_bytes'] / GB:.3f} GB",
                  f"{x['discarded_jit_runs']}" + (f" ({x['jit_compiled_runs']} kept!)" if x["jit_compiled_runs"] else ""))
    con.print(t)
    t = Table(title=f"Merges: ratios (I/O floor {fl['io_floor_seconds']:.3f} s, input {d['input_bytes'] / GB:.3f} GB"
                    + (", cold page cache" if r["config"].get("cold") else "") + ")")
    for c in ("method", "--max-memory (budget)", "threads", "busy", "wall / I/O floor", "wall / 1 thread",
              "wall / read floor", "input GB/s", "passes", "streamed GB/s", "CPU / wall", "peak anon / budget",
              "cache resident"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for x in merges:
        ra = x["ratios"]
        res = ra["min_page_cache_resident"]
        one = ra.get("wall_over_1thread")
        t.add_row(*config(x), f"{ra['wall_over_io_floor']:.2f}x", f"{one:.2f}x" if one else "-",
                  f"{ra['wall_over_read_floor']:.1f}x",
                  f"{ra['input_gbps']:.3f}", f"{ra['passes']:.2f}", f"{ra['streamed_gbps']:.3f}",
                  f"{ra['cpu_over_wall']:.2f}", f"{ra['peak_anon_over_budget']:.3f}",
                  f"{res:.1%}" if res is not None else "?")
    con.print(t)

    s = r["startup"]
    t = Table(title="Start-up and JIT")
    for c in ("what", "wall s", "CPU s", "peak anon"):
        t.add_column(c, justify="left" if c == "what" else "right")
    for key, what in (("python", "python -c pass (median of 5)"), ("help", "npmerge --help (median of 5)"),
                      ("jit_warm", "npmerge warmup of the methods above, kernel cache filled (cold: --cold-jit)")):
        if key in s:
            t.add_row(what, f"{s[key]['wall']:.3f}", f"{s[key]['cpu']:.3f}", human(s[key]["peak_anon"]))
    con.print(t)

    if "reference" in r:
        ref = r["reference"]
        t = Table(title="Plain-NumPy reference TIES (tests/reference.py) vs npmerge ties")
        for c in ("what", "wall s", "CPU s", "peak anon", "load s", "merge s", "encode s", "write s"):
            t.add_column(c, justify="left" if c == "what" else "right")
        rm, ph = ref["median"], ref["phases"]
        t.add_row("reference ties (1 run)", f"{rm['wall']:.2f}", f"{rm['cpu']:.2f}", human(rm["peak_anon"]),
                  f"{ph['load']:.2f}", f"{ph['merge']:.2f}", f"{ph['encode']:.2f}", f"{ph['write']:.2f}")
        if "npmerge_ties_wall" in ref:
            be = ref["bit_exact"]
            t.add_row("npmerge ties (median)", f"{ref['npmerge_ties_wall']:.2f}", "", "", "", "", "", "")
            con.print(t)
            con.print(f"reference wall / npmerge ties wall = [bold]{ref['speedup']:.2f}[/]; outputs "
                      + ("[bold green]bit-identical[/]" if be["identical"] else
                         f"[bold red]DIFFER[/] in {be['tensors_differing']} tensor(s), "
                         f"{be['elements_differing']} element(s)") + f" ({be['tensors']} tensors compared)")
        else:
            con.print(t)


if __name__ == "__main__":
    sys.exit(main())

"""The output bytes: shard layout decided up front, headers first, data streamed in.

Everything about the output is planned before the first byte is written, so every
header goes first and data can arrive chunk by chunk, in any order. Data is written
with `os.pwrite` from caller buffers, never through a writable memmap: on a full disk
a memmap store is a SIGBUS with no cleanup, a pwrite is an ENOSPC we can report.
The model is built in a staging sibling `.<out>.npmerge-partial/` and renamed into
place in one step, so a half-written model never looks complete (FORMAT-AND-SAFETY §4).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
import threading
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..constants import DEFAULT_SHARD_BYTES, MAX_HEADER_BYTES, OUTPUT_METADATA, WRITE_PIECE_BYTES
from ..dtypes import DTYPES
from ..errors import InvalidCheckpoint, OutputError, RecipeError

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
LOCK_NAME = "npmerge.lock"
README_NAME = "README.txt"
SPACE_MARGIN = 64 << 20  # free space demanded beyond the planned bytes (companions, slack)
_MAX_SHARDS = 99_999  # the 5-digit shard name pattern
_CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
_README_TEXT = """\
This directory is an INCOMPLETE output of npmerge, still being written or left
behind by an interrupted run. It is not a usable model. If no npmerge process is
running (see npmerge.lock), it can be deleted.
"""


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    def __post_init__(self):  # NumPy ints would overflow nbytes and break json.dumps
        object.__setattr__(self, "shape", tuple(int(d) if isinstance(d, np.integer) else d for d in self.shape))

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * DTYPES[self.dtype].bits // 8


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    header: bytes  # the full prefix: 8-byte N + padded JSON
    tensors: tuple[str, ...]  # in data order
    offsets: dict[str, int]  # absolute file offset of each tensor's first byte
    size: int  # total file size


@dataclass(frozen=True)
class ShardLayout:
    shards: tuple[ShardPlan, ...]
    total_size: int  # sum of tensor data bytes
    tensors: tuple[OutputTensor, ...] = ()  # in the order given to plan_shards
    _where: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        where = {n: (i, s.offsets[n]) for i, s in enumerate(self.shards) for n in s.tensors}
        object.__setattr__(self, "_where", where)

    def location(self, name: str) -> tuple[int, int]:
        """(shard index, absolute file offset of the tensor's first byte)."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in the output layout")
        return self._where[name]

    def index_json(self) -> bytes | None:
        """model.safetensors.index.json as huggingface_hub writes it; None for one shard."""
        if len(self.shards) == 1:
            return None
        weight_map = {t.name: self.shards[self._where[t.name][0]].filename for t in self.tensors}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        return (json.dumps(index, indent=2) + "\n").encode("utf-8")


def _check_tensor(t: OutputTensor, seen: set) -> None:
    """Refuse what the format or its readers cannot hold, before anything is written."""
    name = t.name
    if not isinstance(name, str) or not name:
        raise RecipeError(f"output tensor name {name!r} is empty or not a string")
    if name == "__metadata__":
        raise RecipeError("an output tensor cannot be named '__metadata__' (reserved by safetensors)")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise RecipeError(f"output tensor name {name!r} contains control or surrogate characters")
    if name in seen:
        raise RecipeError(f"duplicate output tensor name {name!r}")
    seen.add(name)
    if t.dtype not in DTYPES:
        raise RecipeError(f"output tensor {name!r} has unknown dtype {t.dtype!r}")
    if any(type(d) is not int or d < 0 for d in t.shape):
        raise RecipeError(f"output tensor {name!r} has invalid shape {t.shape!r}")
    numel = OutputTensor(name, "U8", t.shape).nbytes
    if numel * DTYPES[t.dtype].bits % 8:  # packed sub-byte dtypes (F4, F6)
        raise RecipeError(f"output tensor {name!r}: {t.dtype} data of shape {t.shape} is not whole bytes")
    if t.nbytes >= 1 << 63:
        raise RecipeError(f"output tensor {name!r} is too large ({t.nbytes} bytes)")


def _plan_one(filename: str, tensors: list[OutputTensor]) -> ShardPlan:
    """One shard exactly as safetensors' `prepare()` lays it out (dtype descending, then name)."""
    ordered = sorted(tensors, key=lambda t: (-DTYPES[t.dtype].order, t.name))
    header: dict = {"__metadata__": dict(OUTPUT_METADATA)}
    rel, start = {}, 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [start, start + t.nbytes]}
        rel[t.name], start = start, start + t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise RecipeError(f"the header of {filename} would be {len(text)} bytes, above the safetensors limit "
                          f"of {MAX_HEADER_BYTES}", hint="use a smaller --shard-size so shards hold fewer tensors")
    prefix = len(text).to_bytes(8, "little") + text
    offsets = {n: len(prefix) + r for n, r in rel.items()}
    return ShardPlan(filename, prefix, tuple(t.name for t in ordered), offsets, len(prefix) + start)


def plan_shards(tensors: Sequence[OutputTensor], shard_bytes: int = DEFAULT_SHARD_BYTES) -> ShardLayout:
    """Assign tensors greedily, in the given order, to shards of at most `shard_bytes` of data.

    A new shard starts when the next tensor would push the current (non-empty) one past
    the limit, so a tensor larger than the limit sits alone.
    """
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
        raise RecipeError(f"shard size must be a positive number of bytes, got {shard_bytes!r}")
    tensors, seen = list(tensors), set()
    for t in tensors:
        _check_tensor(t, seen)
    groups: list[list[OutputTensor]] = [[]]
    current = 0
    for t in tensors:
        if groups[-1] and current + t.nbytes > shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append(t)
        current += t.nbytes
    n = len(groups)
    if n > _MAX_SHARDS:
        raise RecipeError(f"the output would need {n} shards", hint="use a larger --shard-size")
    names = [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    shards = tuple(_plan_one(name, g) for name, g in zip(names, groups))
    return ShardLayout(shards, sum(t.nbytes for t in tensors), tuple(tensors))


# ---------------------------------------------------------------- writing helpers


def _fmt(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def _output_error(exc: OSError, path) -> OutputError:
    """The user-facing error for an OSError while writing (§4.3.7)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"disk full writing {path}", hint="free some space or choose another output location")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"output location not writable: {path} ({exc.strerror})",
                           hint="choose a directory you can write to with -o")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def _writing(path):
    """Map any OSError in the block to an OutputError naming `path`."""
    try:
        yield
    except OSError as e:
        raise _output_error(e, path) from e


def _as_bytes(data) -> memoryview:
    """A flat byte view of a C-contiguous little-endian buffer, without copying."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous or data.dtype.byteorder == ">":
            raise ValueError("OutputWriter.write needs C-contiguous little-endian data")
        return memoryview(data.reshape(-1).view(np.uint8))
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise ValueError("OutputWriter.write needs a C-contiguous buffer")
    return mv if (mv.format, mv.ndim) == ("B", 1) else mv.cast("B")


def _pwrite_all(fd: int, buf: memoryview, pos: int, path) -> None:
    """pwrite in bounded pieces, looping on short writes."""
    done = 0
    while done < len(buf):
        with _writing(path):
            k = os.pwrite(fd, buf[done : done + WRITE_PIECE_BYTES], pos + done)
        if k <= 0:
            raise OutputError(f"cannot write {path}: the system accepted no bytes")
        done += k


def _fsync_dir(path) -> None:
    """Make creates and renames in `path` durable (POSIX needs the directory synced)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _ident(path) -> tuple[int, int] | None:
    """(st_dev, st_ino): an identity that sees through symlinks and bind mounts."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: str) -> set:
    """Identities of `path` and each of its existing ancestors."""
    return {_ident(q) for q in (Path(path), *Path(path).parents)} - {None}


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _read_lock(path: Path) -> dict | None:
    """The lock's {"pid", "host", ...}; a bare pid is accepted too, as humans write locks."""
    try:
        text = path.read_text(errors="replace").strip()
        info = json.loads(text) if text.startswith("{") else {"pid": int(text.split()[0])}
    except (OSError, ValueError, IndexError):
        return None
    return info if isinstance(info, dict) and type(info.get("pid")) is int else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # exists, owned by someone else
    except (OSError, OverflowError):
        return False
    return True


def _resolve_out(out_dir) -> Path:
    """Absolute OUT with its parent's symlinks resolved; the last component is kept as given."""
    p = os.path.join(os.getcwd(), os.fspath(out_dir)).rstrip("/") or "/"
    head, name = os.path.split(p)
    if name in (".", ".."):
        head, name = os.path.split(os.path.realpath(p))
    return Path(os.path.realpath(head)) / name


# ---------------------------------------------------------------- the writer


class OutputWriter:
    """Streams a model directory into a staging sibling and renames it into place only when complete.

    Use: `with OutputWriter(out, layout, inputs=...) as w: w.open(); w.write(...); ...;
    w.commit()`. Leaving the block without `commit()` (by an exception or not) removes
    the staging directory. `finish_shards()` may be called before `commit()` to make the
    shard files final in `staging_dir` (e.g. to hash them for a report).
    """

    private_files = frozenset({LOCK_NAME, README_NAME})  # in staging, never part of the output

    def __init__(self, out_dir, layout: ShardLayout, *, inputs: Sequence = (), force: bool = False,
                 check_space: bool = True):
        self.out_dir = _resolve_out(out_dir)
        self.layout, self.force, self.check_space = layout, force, check_space
        self.inputs = [os.fspath(p) for p in inputs]
        parent, name = self.out_dir.parent, self.out_dir.name
        self._staging = parent / f".{name}.npmerge-partial"
        self._old = parent / f".{name}.npmerge-old"
        self._sizes = {n: None for s in layout.shards for n in s.tensors}  # None: unknown (hand-built layout)
        self._sizes.update((t.name, t.nbytes) for t in layout.tensors)
        self._written = dict.fromkeys(self._sizes, 0)
        self._count_lock = threading.Lock()  # write() may be called from several threads
        self._fds: dict[int, int] = {}
        self._extra: set[str] = set()
        self._state = "new"  # new -> open -> committed | aborted
        self._shards_done = False
        self._created = False  # the staging dir is ours to remove

    @property
    def staging_dir(self) -> Path:
        return self._staging

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state != "committed":
            self.abort()
        return False

    # -- preflight

    def _preflight(self) -> None:
        out, parent = self.out_dir, self.out_dir.parent
        if out.name in ("", ".", ".."):
            raise RecipeError(f"invalid output directory {out}")
        if not parent.is_dir():
            raise RecipeError(f"the output's parent directory does not exist: {parent}",
                              hint="create it first, or choose another -o")
        self._check_inputs()
        if out.is_symlink():
            raise RecipeError(f"the output path {out} is a symlink", hint="give the real directory path with -o")
        if out.exists():
            if not out.is_dir():
                raise RecipeError(f"the output path {out} exists and is not a directory")
            with os.scandir(out) as it:
                if any(True for _ in it) and not self.force:
                    raise RecipeError(f"output directory exists and is not empty: {out}",
                                      hint="--force to replace it, or choose another -o")
            if self.force and os.path.lexists(self._old):
                raise OutputError(f"{self._old} is left over from an interrupted --force run",
                                  hint="check it holds nothing you need, then delete it")
        if os.path.lexists(self._staging):
            self._refuse_staging()
        if self.check_space:
            need = sum(s.size for s in self.layout.shards) + SPACE_MARGIN
            free = shutil.disk_usage(parent).free
            if free < need:
                raise OutputError(f"not enough disk space for {out}: needs {_fmt(need)} ({need} bytes), "
                                  f"{_fmt(free)} ({free} bytes) free",
                                  hint="free some space, choose another -o, or skip the check (--skip-space-check)")

    def _check_inputs(self) -> None:
        """OUT must not be, sit inside, or contain an input: by realpath and by (dev, ino)."""
        out = str(self.out_dir)
        out_id, out_ids = _ident(out), _chain(out)
        hint = "choose an output path outside every input model"
        for inp in self.inputs:
            real = os.path.realpath(inp)
            inp_id = _ident(real)
            if out == real or (inp_id is not None and inp_id == out_id):
                raise RecipeError(f"the output directory {out} is the input {inp}", hint=hint)
            if _inside(out, real) or (inp_id is not None and inp_id in out_ids):
                raise RecipeError(f"the output directory {out} is inside the input {inp}", hint=hint)
            if _inside(real, out) or (out_id is not None and out_id in _chain(real)):
                raise RecipeError(f"the output directory {out} contains the input {inp}", hint=hint)

    def _refuse_staging(self) -> None:
        lock = _read_lock(self._staging / LOCK_NAME)
        if lock is not None:
            host, pid = lock.get("host"), lock["pid"]
            if host not in (None, socket.gethostname()):
                raise OutputError(f"output {self.out_dir} is locked by pid {pid} on host {host}",
                                  hint=f"if that run is gone, delete {self._staging}")
            if _pid_alive(pid):
                raise OutputError(f"output {self.out_dir} is locked by pid {pid}",
                                  hint="another npmerge run is writing it; wait for it or stop it")
        raise OutputError(f"{self._staging} exists: it is the incomplete output of an interrupted npmerge run",
                          hint=f"it holds nothing usable; delete it (rm -r '{self._staging}') and run again")

    # -- open

    def open(self) -> OutputWriter:
        """Preflight, create staging with a lock, create every shard and write its header."""
        if self._state == "open":
            return self
        if self._state != "new":
            raise RuntimeError(f"OutputWriter.open() on a writer that is {self._state}")
        self._state = "open"
        try:
            self._preflight()
            try:
                os.mkdir(self._staging)
            except FileExistsError:  # another run got there first
                self._refuse_staging()
            except OSError as e:
                raise _output_error(e, self._staging) from e
            self._created = True
            started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
            self._create(self._staging / LOCK_NAME, [(json.dumps(lock) + "\n").encode()])
            self._create(self._staging / README_NAME, [_README_TEXT.encode()])
            for i, shard in enumerate(self.layout.shards):
                path = self._staging / (shard.filename + ".tmp")
                with _writing(path):
                    self._fds[i] = fd = os.open(path, _CREATE, 0o644)
                self._reserve(fd, shard.size, path)
                _pwrite_all(fd, memoryview(shard.header), 0, path)
        except BaseException:
            self.abort()
            raise
        return self

    @staticmethod
    def _reserve(fd: int, size: int, path) -> None:
        """Allocate real blocks up front (never a sparse file), so a full disk fails now."""
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
        except OSError as e:  # unsupported here: skip; the pwrites still report ENOSPC
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                raise _output_error(e, path) from e

    def _create(self, path: Path, chunks: Iterable[bytes]) -> None:
        """Write a whole small file with O_EXCL and fsync it."""
        with _writing(path):
            fd = os.open(path, _CREATE, 0o644)
            try:
                pos = 0
                for chunk in chunks:
                    _pwrite_all(fd, memoryview(chunk).cast("B"), pos, path)
                    pos += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)  # errors checked: NFS reports ENOSPC late, at close

    # -- data and companions

    def write(self, name: str, byte_offset: int, data) -> None:
        """Write `data` (bytes, memoryview or array) at byte `byte_offset` of tensor `name`'s data."""
        if self._state != "open" or self._shards_done:
            raise RuntimeError(f"OutputWriter.write() on a writer that is {self._state}"
                               + (" (after finish_shards)" if self._shards_done else ""))
        index, offset = self.layout.location(name)
        buf, size = _as_bytes(data), self._sizes[name]
        if byte_offset < 0 or (size is not None and byte_offset + len(buf) > size):
            raise ValueError(f"{len(buf)} bytes at {byte_offset} fall outside tensor {name!r} ({size} bytes)")
        _pwrite_all(self._fds[index], buf, offset + byte_offset, self._staging / self.layout.shards[index].filename)
        with self._count_lock:
            self._written[name] += len(buf)

    def _companion_path(self, relname: str) -> Path:
        parts = Path(relname).parts
        if not relname or os.path.isabs(relname) or "\\" in relname or any(p in (".", "..") for p in parts):
            raise ValueError(f"companion file name {relname!r} must be a plain relative path")
        reserved = {s.filename for s in self.layout.shards} | {INDEX_NAME, LOCK_NAME, README_NAME}
        if relname in reserved or relname.endswith(".tmp") or relname in self._extra:
            raise ValueError(f"companion file name {relname!r} is reserved or already written")
        if self._state != "open":
            raise RuntimeError(f"OutputWriter: adding {relname} to a writer that is {self._state}")
        self._extra.add(relname)
        path = self._staging / relname
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _place(self, path: Path, chunks: Iterable[bytes]) -> None:
        """tmp + fsync + rename, inside staging."""
        tmp = path.with_name(path.name + ".tmp")
        self._create(tmp, chunks)
        with _writing(path):
            os.rename(tmp, path)

    def add_bytes(self, relname: str, data: bytes) -> None:
        """A companion file (config, card, report) written into staging."""
        self._place(self._companion_path(relname), [bytes(data)])

    def copy_file(self, relname: str, src_path) -> None:
        """A byte-for-byte copy of `src_path` into staging as `relname`."""
        path = self._companion_path(relname)

        def pieces():
            try:
                with open(src_path, "rb") as src:
                    while piece := src.read(WRITE_PIECE_BYTES):
                        yield piece
            except OSError as e:
                raise InvalidCheckpoint(f"cannot read {src_path}: {e.strerror or e}") from e

        self._place(path, pieces())

    # -- commit / abort

    def commit(self) -> Path:
        """Finish every shard, then make the output appear in one rename; return its path."""
        if self._state != "open":
            raise RuntimeError(f"OutputWriter.commit() on a writer that is {self._state}")
        try:
            self.finish_shards()
            with _writing(self._staging):
                os.unlink(self._staging / README_NAME)
                os.unlink(self._staging / LOCK_NAME)
                _fsync_dir(self._staging)
            self._swap_in()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return self.out_dir

    def finish_shards(self) -> None:
        """Check every tensor was written in full, make each shard final in staging, write the index."""
        if self._state != "open":
            raise RuntimeError(f"OutputWriter.finish_shards() on a writer that is {self._state}")
        if self._shards_done:
            return
        for name, size in self._sizes.items():
            if size is not None and self._written[name] != size:
                raise RuntimeError(f"tensor {name!r} incomplete: {self._written[name]} of {size} bytes written")
        for i in range(len(self.layout.shards)):
            self.finish_shard(i)
        index = self.layout.index_json()
        if index is not None:
            self._place(self._staging / INDEX_NAME, [index])
        self._shards_done = True

    def resumed_stats(self, i: int) -> dict | None:
        """Statistics of shard i if an interrupted run completed it (resume); None: compute it."""
        return None

    def finish_shard(self, i: int, stats: dict | None = None) -> None:
        """Make shard i final in staging: every tensor complete, fsync, size check, rename.

        `stats` (the engine's per-tensor statistics of this shard) is what a resumed run
        gets back from `resumed_stats`."""
        if i not in self._fds:
            return
        shard = self.layout.shards[i]
        for name in shard.tensors:
            size = self._sizes[name]
            if size is not None and self._written[name] != size:
                raise RuntimeError(f"tensor {name!r} incomplete: {self._written[name]} of {size} bytes written")
        tmp = self._staging / (shard.filename + ".tmp")
        with _writing(tmp):
            fd = self._fds.pop(i)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size != shard.size:
                raise OutputError(f"{tmp} is {size} bytes, {shard.size} planned")
            os.rename(tmp, self._staging / shard.filename)

    def _swap_in(self) -> None:
        """The commit point. With force, an existing OUT is set aside first and removed after."""
        out, parent = self.out_dir, self.out_dir.parent
        aside = False
        try:
            if self.force and os.path.lexists(out):
                os.rename(out, self._old)
                aside = True
            try:
                os.rename(self._staging, out)
            except OSError:
                if aside:
                    os.rename(self._old, out)
                raise
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise OutputError(f"{out} appeared while the merge was running; nothing was replaced",
                                  hint="choose another -o, or --force to replace it") from e
            raise _output_error(e, out) from e
        self._created = False  # staging is now OUT: abort must never touch it
        with _writing(parent):
            _fsync_dir(parent)
        if aside:
            try:
                shutil.rmtree(self._old) if self._old.is_dir() and not self._old.is_symlink() else self._old.unlink()
            except OSError as e:
                warnings.warn(f"the new output is in place but the old one could not be removed: {self._old} "
                              f"({e.strerror or e})", stacklevel=3)

    def abort(self) -> None:
        """Close every file and remove the staging directory (ours); touch nothing else."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        if self._created:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._created = False
        if self._state != "committed":
            self._state = "aborted"

"""The output bytes: shard layout decided up front, headers first, data streamed in.

Everything about the output is planned before the first byte is written, so every
header goes first and data can arrive chunk by chunk, in any order. Data is written
with `os.pwrite` from caller buffers, never through a writable memmap: on a full disk
a memmap store is a SIGBUS with no cleanup, a pwrite is an ENOSPC we can report.
The model is built in a staging sibling `.<out>.npmerge-partial/` (io/staging.py) and
renamed into place in one step, so a half-written model never looks complete
(docs/format-and-safety.md §3). Each shard is final (fsynced, renamed, sha256 recorded in the
staging manifest) as soon as it is done: an interrupted run keeps those for `--resume`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..constants import DEFAULT_SHARD_BYTES, MAX_HEADER_BYTES, OUTPUT_METADATA, WRITE_PIECE_BYTES, WRITEBACK_BYTES
from ..dtypes import DTYPES
from ..errors import InvalidCheckpoint, OutputError, RecipeError, shown
from ..units import human_bytes
from . import staging as st
from ..constants import INDEX_NAME, SINGLE_NAME
from .staging import SPACE_MARGIN, Staging, writing

_MAX_SHARDS = 99_999  # the 5-digit shard name pattern
# Test hook: seconds to sleep before each data write, so tests can interrupt a real merge mid-way.


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


def plan_shards(tensors: Sequence[OutputTensor], shard_bytes: int = DEFAULT_SHARD_BYTES,
                single_name: str = SINGLE_NAME) -> ShardLayout:
    """Assign tensors greedily, in the given order, to shards of at most `shard_bytes` of data.

    A new shard starts when the next tensor would push the current (non-empty) one past
    the limit, so a tensor larger than the limit sits alone. One shard is `single_name`
    (a PEFT adapter's is adapter_model.safetensors).
    """
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
        raise RecipeError(f"shard size must be a positive number of bytes, got {shown(shard_bytes)}")
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
    names = [single_name] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    shards = tuple(_plan_one(name, g) for name, g in zip(names, groups))
    return ShardLayout(shards, sum(t.nbytes for t in tensors), tuple(tensors))


# ---------------------------------------------------------------- the writer


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


def layout_digest(layout: ShardLayout) -> str:
    """sha256 over every shard's name, header bytes and size: same digest, same output layout."""
    h = hashlib.sha256()
    for s in layout.shards:
        h.update(s.filename.encode() + b"\0" + s.header + s.size.to_bytes(8, "little"))
    return h.hexdigest()


def _resumable(exc) -> bool:
    """Failures after which finished shards are worth keeping: interruptions and output errors
    (a full disk). Bad input, changed input or a bug would only fail again."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit, OutputError))


class _Stream:
    """What the writer tracks while a shard's bytes arrive: a running sha256 of the prefix
    written in order (so a finished shard is never read back to be hashed) and early
    writeback (so the disk works while we compute and the final fsync is short)."""

    def __init__(self, header: bytes):
        self.hash = hashlib.sha256(header)
        self.hashed = len(header)  # bytes [0, hashed) are in the hash; -1: out of order, re-read
        self.kicked = self.dropped = 0  # writeback started below `kicked`; pages dropped below `dropped`

    def wrote(self, fd: int, pos: int, buf: memoryview) -> None:
        if pos == self.hashed:
            self.hash.update(buf)
            self.hashed += len(buf)
        elif self.hashed >= 0 and pos < self.hashed:  # overwrote hashed bytes (never done by the engine)
            self.hashed = -1
        end = pos + len(buf)
        if end - self.kicked >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            # Linux: DONTNEED starts writeback of dirty pages (without waiting) and drops clean
            # ones, i.e. the previous window, written back by now: the output does not pile up
            # as dirty page cache, to be written only by the final fsync.
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, self.dropped, end - self.dropped, os.POSIX_FADV_DONTNEED)
            self.dropped, self.kicked = self.kicked, end

    def digest(self, size: int, path) -> str:
        return self.hash.hexdigest() if self.hashed == size else st.sha256_file(path)


@dataclass(frozen=True)
class OutputCheck:
    """What OutputWriter.preflight found: where the output goes and what writing it takes."""

    out: Path  # the output directory (absolute, parent's symlinks resolved)
    replaces: bool  # an existing non-empty output is replaced (--force)
    resumed: int  # shards an interrupted run recorded as finished (--resume; open() re-verifies them)
    shards: int  # shards in the output
    need: int  # bytes of free space demanded: the shards still to write, plus a margin
    free: int | None  # bytes free where the output goes (None: the space check is off)


class OutputWriter:
    """Streams a model directory into a staging sibling and renames it into place only when complete.

    Use: `with OutputWriter(out, layout, inputs=...) as w: w.open(); w.write(...); ...;
    w.commit()`. Leaving the block without `commit()` removes the staging directory,
    except after an interruption or output error with shards already finished: those
    stay in staging (`kept` says so) for a later writer with `resume=True`, which
    verifies them against the manifest and `fingerprint` (plan.json) and skips them.
    `fingerprint["inputs"]` (staging.file_fingerprint entries) are re-checked just
    before the commit. `finish_shards()` may be called before `commit()` to make the
    shard files final in `staging_dir` (e.g. to hash them for a report). `resumable=False`:
    every abort removes staging (for outputs that cannot be resumed).
    """

    private_files = st.PRIVATE  # in staging, never part of the output

    def __init__(self, out_dir, layout: ShardLayout, *, inputs: Sequence = (), force: bool = False,
                 check_space: bool = True, resume: bool = False, fingerprint: dict | None = None,
                 resumable: bool = True):
        self.out_dir = st.resolve_out(out_dir)
        self.layout, self.force, self.check_space, self.resume = layout, force, check_space, resume
        self.resumable = resumable  # False: an abort never keeps finished shards (a writer without --resume)
        self.inputs = [os.fspath(p) for p in inputs]
        self.fingerprint = {**(fingerprint or {}), "layout_sha256": layout_digest(layout),
                            "layout": {"shards": len(layout.shards), "dtypes": {t.name: t.dtype for t in layout.tensors}}}
        self._stage = Staging(self.out_dir)
        self._old = self.out_dir.parent / f".{self.out_dir.name}.npmerge-old"
        self._sizes = {n: None for s in layout.shards for n in s.tensors}  # None: unknown (hand-built layout)
        self._sizes.update((t.name, t.nbytes) for t in layout.tensors)
        self._written = dict.fromkeys(self._sizes, 0)
        self._count_lock = threading.Lock()  # write() may be called from several threads
        self._fds: dict[int, int] = {}
        self._streams: dict[int, _Stream] = {}
        self._extra: set[str] = set()
        self._done: dict[int, dict] = {}  # shard index -> manifest record (finished here or resumed)
        self._resumed: set[int] = set()
        self._state = "new"  # new -> open -> committed | aborted
        self._shards_done = False
        self.kept: str | None = None  # set by an abort that kept finished shards for --resume

    @property
    def staging_dir(self) -> Path:
        return self._stage.path

    @property
    def shard_files(self) -> dict[str, dict]:
        """{filename: {"size", "sha256"}} of the finished shards, hashed as their bytes were written."""
        return {r["file"]: {"size": r["size"], "sha256": r["sha256"]} for _, r in sorted(self._done.items())}

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state != "committed":
            self.abort(exc)
        return False

    # -- preflight

    def preflight(self) -> OutputCheck:
        """Every check open() makes before it writes, creating and changing nothing: the output
        location, write permission, a lock or a leftover staging directory, with `resume` the
        interrupted run's plan, and free space. The plan runs it (api.plan_merge), so a dry run
        refuses what the real run refuses; open() runs the same checks again."""
        self._preflight()
        shards = [(s.filename, s.size) for s in self.layout.shards]
        kept: dict = {}
        if self.resume and self._stage.exists():
            self._stage.check_unlocked()
            self._stage.check_plan(self.fingerprint)
            kept = self._stage.recorded(shards)
        need, free = self._check_space([i for i in range(len(shards)) if i not in kept])
        replaces = self.out_dir.is_dir() and bool(os.listdir(self.out_dir))
        return OutputCheck(self.out_dir, replaces, len(kept), len(shards), need, free)

    def _preflight(self) -> None:
        out, parent = self.out_dir, self.out_dir.parent
        if out.name in ("", ".", ".."):
            raise RecipeError(f"invalid output directory {out}")
        if not parent.exists():
            raise RecipeError(f"the output's parent directory does not exist: {parent}",
                              hint="create it first, or choose another -o")
        if not parent.is_dir():
            raise RecipeError(f"the output's parent {parent} is not a directory", hint="choose another -o")
        st.check_apart(out, self.inputs)
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
        if self._stage.exists() and not self.resume:
            self._stage.refuse()
        st.check_writable(parent, self._stage.path)

    def _check_space(self, todo: list[int]) -> tuple[int, int | None]:
        """(bytes needed, bytes free) for writing shards `todo`; refuses when they do not fit."""
        need = sum(self.layout.shards[i].size for i in todo) + SPACE_MARGIN
        if not self.check_space:
            return need, None
        free = shutil.disk_usage(self.out_dir.parent).free
        if free < need:
            raise OutputError(f"not enough disk space for {self.out_dir}: needs {human_bytes(need)} ({need} bytes), "
                              f"{human_bytes(free)} ({free} bytes) free",
                              hint="free some space or choose another output location with -o")
        return need, free

    # -- open

    def open(self) -> OutputWriter:
        """Preflight; create (or, resuming, take over) staging; create each unfinished shard with its header."""
        if self._state == "open":
            return self
        if self._state != "new":
            raise RuntimeError(f"OutputWriter.open() on a writer that is {self._state}")
        self._state = "open"
        try:
            self._preflight()
            todo = list(range(len(self.layout.shards)))
            if self.resume and self._stage.exists():
                self._done = self._stage.take_over(self.fingerprint, [(s.filename, s.size) for s in self.layout.shards])
                self._resumed = set(self._done)
                for i in self._resumed:
                    for name in self.layout.shards[i].tensors:
                        self._written[name] = self._sizes[name] or 0
                todo = [i for i in todo if i not in self._done]
                self._check_space(todo)
            else:  # staging first: an unwritable location is reported as such, not as "0 bytes free"
                self._stage.create(self.fingerprint)
                self._check_space(todo)
            for i in todo:
                shard = self.layout.shards[i]
                path = self.staging_dir / (shard.filename + ".tmp")
                with writing(path):
                    self._fds[i] = fd = os.open(path, st.CREATE, 0o644)
                self._reserve(fd, shard.size, path)
                st.pwrite_all(fd, memoryview(shard.header), 0, path)
                self._streams[i] = _Stream(shard.header)
        except BaseException as e:
            self.abort(e)
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
                raise st.output_error(e, path) from e

    # -- data and companions

    def write(self, name: str, byte_offset: int, data) -> None:
        """Write `data` (bytes, memoryview or array) at byte `byte_offset` of tensor `name`'s data."""
        if self._state != "open" or self._shards_done:
            raise RuntimeError(f"OutputWriter.write() on a writer that is {self._state}"
                               + (" (after finish_shards)" if self._shards_done else ""))
        index, offset = self.layout.location(name)
        if index in self._done:
            raise RuntimeError(f"OutputWriter.write() to tensor {name!r} of shard {index}, which is finished")
        buf, size = _as_bytes(data), self._sizes[name]
        if byte_offset < 0 or (size is not None and byte_offset + len(buf) > size):
            raise ValueError(f"{len(buf)} bytes at {byte_offset} fall outside tensor {name!r} ({size} bytes)")
        fd = self._fds[index]
        st.pwrite_all(fd, buf, offset + byte_offset,
                      self.staging_dir / (self.layout.shards[index].filename + ".tmp"), need=self._left)
        self._streams[index].wrote(fd, offset + byte_offset, buf)
        with self._count_lock:
            self._written[name] += len(buf)

    def _left(self) -> int:
        """Tensor bytes still to write (for a disk-full message)."""
        return sum((self._sizes[n] or 0) - self._written[n] for i, s in enumerate(self.layout.shards)
                   if i not in self._done for n in s.tensors)

    def _companion_path(self, relname: str) -> Path:
        parts = Path(relname).parts
        if not relname or os.path.isabs(relname) or "\\" in relname or any(p in (".", "..") for p in parts):
            raise ValueError(f"companion file name {relname!r} must be a plain relative path")
        reserved = {s.filename for s in self.layout.shards} | {INDEX_NAME} | st.PRIVATE
        if relname in reserved or relname.endswith(".tmp") or relname in self._extra:
            raise ValueError(f"companion file name {relname!r} is reserved or already written")
        if self._state != "open":
            raise RuntimeError(f"OutputWriter: adding {relname} to a writer that is {self._state}")
        self._extra.add(relname)
        path = self.staging_dir / relname
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add_bytes(self, relname: str, data: bytes) -> None:
        """A companion file (config, card, report) written into staging."""
        st.place_file(self._companion_path(relname), [bytes(data)])

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

        st.place_file(path, pieces())

    # -- shards

    def resumed_stats(self, i: int) -> dict | None:
        """Statistics of shard i if an interrupted run finished it (verified on open); None: compute it."""
        return self._done[i]["stats"] if i in self._resumed else None

    def finish_shard(self, i: int, stats: dict | None = None) -> None:
        """Make shard i final in staging (every tensor complete, fsync, size check, rename), then
        record its size, sha256 and `stats` (JSON-serialisable) in the manifest."""
        if i in self._done or i not in self._fds:
            return
        shard = self.layout.shards[i]
        for name in shard.tensors:
            size = self._sizes[name]
            if size is not None and self._written[name] != size:
                raise RuntimeError(f"tensor {name!r} incomplete: {self._written[name]} of {size} bytes written")
        tmp, final = self.staging_dir / (shard.filename + ".tmp"), self.staging_dir / shard.filename
        with writing(tmp):
            fd = self._fds.pop(i)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size != shard.size:
                raise OutputError(f"{tmp} is {size} bytes, {shard.size} planned")
            os.rename(tmp, final)
            st.fsync_dir(self.staging_dir)
            digest = self._streams.pop(i).digest(shard.size, final)
        record = {"shard": i, "file": shard.filename, "size": shard.size, "sha256": digest, "stats": stats or {}}
        # Known as done before its manifest line exists: an interruption landing right after the
        # line is written must still keep the shard (a kept shard without a line is just redone).
        self._done[i] = record
        self._stage.record(record)

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
            st.place_file(self.staging_dir / INDEX_NAME, [index])
        self._shards_done = True

    # -- commit / abort

    def commit(self) -> Path:
        """Finish every shard, check the inputs did not change, then make the output appear in one rename."""
        if self._state != "open":
            raise RuntimeError(f"OutputWriter.commit() on a writer that is {self._state}")
        try:
            self.finish_shards()
            changes = st.input_changes(self.fingerprint.get("inputs", []))
            if changes:
                raise InvalidCheckpoint(f"input changed during the merge: {changes[0]}"
                                        + "".join(f"\n  {c}" for c in changes[1:]),
                                        hint="nothing was written; inputs must not be modified while npmerge "
                                             "runs: run again once they are stable")
            self._stage.finalize()
            self._swap_in()
        except BaseException as e:
            self.abort(e)
            raise
        self._state = "committed"
        return self.out_dir

    def _swap_in(self) -> None:
        """The commit point. With force, an existing OUT is set aside first and removed after."""
        out, parent = self.out_dir, self.out_dir.parent
        aside = False
        try:
            if self.force and os.path.lexists(out):
                os.rename(out, self._old)
                aside = True
            try:
                os.rename(self.staging_dir, out)
            except OSError:
                if aside:
                    os.rename(self._old, out)
                raise
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise OutputError(f"{out} appeared while the merge was running; nothing was replaced",
                                  hint="choose another -o, or --force to replace it") from e
            raise st.output_error(e, out) from e
        self._stage.owned = False  # staging is now OUT: abort must never touch it
        with writing(parent):
            st.fsync_dir(parent)
        if aside:
            try:
                shutil.rmtree(self._old) if self._old.is_dir() and not self._old.is_symlink() else self._old.unlink()
            except OSError as e:
                warnings.warn(f"the new output is in place but the old one could not be removed: {self._old} "
                              f"({e.strerror or e})", stacklevel=3)

    def abort(self, exc: BaseException | None = None) -> None:
        """Close every file; remove the staging directory (ours), or after an interruption or
        output error keep its finished shards for --resume. Touch nothing else."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._streams.clear()
        if self._stage.owned:
            if self._done and self.resumable and _resumable(exc) and self._stage.park({r["file"] for r in self._done.values()}):
                self.kept = (f"{len(self._done)} of {len(self.layout.shards)} shard(s) are finished and kept in "
                             f"{self.staging_dir}: run the same command with --resume to continue, "
                             "or delete that directory")
            else:
                self._stage.discard()
        if self._state != "committed":
            self._state = "aborted"

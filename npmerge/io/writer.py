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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..constants import INDEX_NAME, WRITE_PIECE_BYTES, WRITEBACK_BYTES
from ..errors import InvalidCheckpoint, OutputError, RecipeError
from ..units import human_bytes
from . import staging as st
from .shards import ShardLayout, part_shards
from .staging import SPACE_MARGIN, Staging, writing

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
                 one_file: bool = False, part: tuple[int, int] | None = None, adopt: bool = False,
                 resumable: bool = True, final_header=None):
        self.out_dir = st.resolve_out(out_dir)
        self.one_file = one_file  # OUT is the layout's single shard itself (no directory, no companions)
        # final_header(stats) -> the shard's prefix, of its planned length, written when the shard
        # is finished (a one-file output's summary, known only once its data is written)
        self.final_header = final_header
        if one_file and len(layout.shards) != 1:
            raise ValueError("a one-file output needs a layout of one shard")
        self.layout, self.force, self.check_space, self.resume = layout, force, check_space, resume
        self.resumable = resumable  # False: an abort never keeps finished shards (a writer without --resume)
        self.inputs = [os.fspath(p) for p in inputs]
        self.fingerprint = {**(fingerprint or {}), "layout_sha256": layout_digest(layout),
                            "layout": {"shards": len(layout.shards), "dtypes": {t.name: t.dtype for t in layout.tensors}}}
        # A part of a merge split into parts writes only its shards, into its own staging
        # directory, and ends with a record instead of a commit (finish_part); `adopt`: the
        # shards come finished from the parts (adopt_shard), as `npmerge assemble` puts them.
        self.part, self.adopt = part, adopt
        self.mine = set(part_shards(layout, *part) if part else range(len(layout.shards)))
        self._stage = Staging(self.out_dir, st.part_dir(self.out_dir, *part) if part else None)
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
        need, free = self._check_space([i for i in sorted(self.mine) if i not in kept and not self.adopt])
        replaces = self.out_dir.is_file() if self.one_file else (self.out_dir.is_dir() and bool(os.listdir(self.out_dir)))
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
        if out.exists() and self.one_file:
            if out.is_dir():
                raise RecipeError(f"the output path {out} is an existing directory; an -o ending in .safetensors "
                                  "writes one file", hint="choose a file path that is not a directory")
            if not self.force:
                raise RecipeError(f"output file exists: {out}", hint="--force to replace it, or choose another -o")
        elif out.exists():
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
            todo = [] if self.adopt else sorted(self.mine)
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
        if self.one_file:
            raise RuntimeError(f"OutputWriter: a one-file output has no companion files ({relname})")
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
        if self.final_header is not None:
            prefix = memoryview(self.final_header(stats or {}))
            if len(prefix) != len(shard.header):
                raise RuntimeError(f"final header of {len(prefix)} bytes for a planned {len(shard.header)}")
            st.pwrite_all(self._fds[i], prefix, 0, tmp)
            self._streams[i].wrote(self._fds[i], 0, prefix)  # out of order: hashed by re-reading the file
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
        for i in sorted(self.mine):
            self.finish_shard(i)  # checks every tensor was written in full
        index = self.layout.index_json() if self.part is None else None
        if index is not None:
            st.place_file(self.staging_dir / INDEX_NAME, [index])
        self._shards_done = True

    # -- parts

    def adopt_shard(self, i: int, src: Path, record: dict) -> None:
        """Take shard i finished from a part (`npmerge assemble`): moved into staging (the same
        filesystem: one rename) and recorded as a shard this run finished."""
        if not self.adopt or self._state != "open" or i in self._done:
            raise RuntimeError(f"OutputWriter.adopt_shard({i}) on a writer that cannot adopt it")
        dest = self.staging_dir / self.layout.shards[i].filename
        with writing(dest):
            os.rename(src, dest)
        rec = {**record, "shard": i, "file": dest.name}
        self._done[i] = rec
        self._stage.record(rec)

    def finish_part(self, record: dict) -> Path:
        """A part's end: its shards final, then `record` and their manifest records in
        part.json (the part's completion mark, what assemble reads); its staging directory
        stays, unlocked, for assemble or a rerun with --resume."""
        if self.part is None or self._state != "open":
            raise RuntimeError("OutputWriter.finish_part() on a writer that is not an open part")
        try:
            self.finish_shards()
            done = {"fingerprint": self.fingerprint, **record, "shards": [self._done[i] for i in sorted(self.mine)]}
            st.place_file(self.staging_dir / st.PART_NAME, [(json.dumps(done, indent=1, allow_nan=True) + "\n").encode()])
            self._stage.park({r["file"] for r in self._done.values()})
        except BaseException as e:
            self.abort(e)
            raise
        self._state = "committed"
        return self.staging_dir

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
        if self.one_file:
            return self._place_file()
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

    def _place_file(self) -> None:
        """A one-file output's commit point: its one shard appears as OUT in one step (a hard
        link, which refuses an OUT that appeared meanwhile; a rename with --force, which
        replaces an existing file atomically); then staging goes."""
        out, src = self.out_dir, self.staging_dir / self.layout.shards[0].filename
        try:
            if self.force:
                if out.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "is a directory", str(out))
                os.replace(src, out)
            else:
                try:
                    os.link(src, out)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    if os.path.lexists(out):  # a filesystem without hard links
                        raise FileExistsError(errno.EEXIST, "exists", str(out)) from e
                    os.rename(src, out)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.EISDIR, errno.ENOTEMPTY):
                raise OutputError(f"{out} appeared while the merge was running; nothing was replaced",
                                  hint="choose another -o, or --force to replace it") from e
            raise st.output_error(e, out) from e
        with writing(out.parent):
            st.fsync_dir(out.parent)
        self._stage.discard()

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

"""The staging directory a merge is built in, and the low-level safe-write helpers.

`.<out>.npmerge-partial/` sits next to OUT (same filesystem, so the commit is one
rename). Besides the output files it holds what makes a run safe to interrupt and
resume (docs/format-and-safety.md §3):

- `npmerge.lock`: pid, host and start time of the run writing it (O_EXCL, so two runs
  never share a staging dir); removed whenever the run ends;
- `plan.json`: the plan's fingerprint (npmerge version, recipe hash, input files'
  realpath/size/mtime/inode/header hash, output layout hash); `--resume` refuses to
  continue a different plan;
- `manifest.jsonl`: one fsynced JSON line per finished shard (file, size, sha256, the
  engine's statistics of its tensors), appended only after the shard is renamed and
  synced: that line is the shard's completion marker;
- `README.txt` for a human who finds the directory.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable

from ..constants import MAX_HEADER_BYTES, WRITE_PIECE_BYTES
from ..errors import OutputError, RecipeError, shown
from ..units import human_bytes

LOCK_NAME = "npmerge.lock"
README_NAME = "README.txt"
PLAN_NAME = "plan.json"
MANIFEST_NAME = "manifest.jsonl"
PART_NAME = "part.json"  # a finished part of a merge split into parts (npmerge/parts.py)
PRIVATE = frozenset({LOCK_NAME, README_NAME, PLAN_NAME, MANIFEST_NAME, PART_NAME})  # never part of the output
SPACE_MARGIN = 64 << 20  # free space demanded beyond the planned bytes (companions, slack)
CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
_README_TEXT = """\
This directory is an INCOMPLETE output of npmerge, still being written or left
behind by an interrupted run. It is not a usable model. Shards listed in
manifest.jsonl are complete: run the same npmerge command again with --resume to
finish the merge, or, if no npmerge process is running (see npmerge.lock), delete
this directory.
"""
_FINGERPRINT_PARTS = {
    "npmerge_version": "the npmerge version differs from the interrupted run's",
    "recipe_sha256": "the recipe (method, models, parameters or dtypes) differs from the interrupted run's",
    "layout_sha256": "the output layout (--shard-size or output dtypes) differs from the interrupted run's",
}


# ---------------------------------------------------------------- write helpers


def _free(path) -> int | None:
    try:
        return shutil.disk_usage(os.path.dirname(os.fspath(path)) or ".").free
    except OSError:
        return None


def output_error(exc: OSError, path, need: Callable[[], int] | None = None) -> OutputError:
    """The user-facing error for an OSError while writing (§4.3.7), with figures for a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free(path)
        figures = [f"{human_bytes(need())} still to write"] if need else []
        figures += [f"{human_bytes(free)} free"] if free is not None else []
        what = "disk full (quota exceeded)" if exc.errno == errno.EDQUOT else "disk full"
        return OutputError(f"{what} writing {path}" + (f" ({', '.join(figures)})" if figures else ""),
                           hint="free some space or choose another output location with -o")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"output location not writable: {path} ({exc.strerror})",
                           hint="choose a directory you can write to with -o")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def writing(path, need: Callable[[], int] | None = None):
    """Map any OSError in the block to an OutputError naming `path`."""
    try:
        yield
    except OSError as e:
        raise output_error(e, path, need) from e


def pwrite_all(fd: int, buf: memoryview, pos: int, path, need: Callable[[], int] | None = None) -> None:
    """pwrite in bounded pieces, looping on short writes."""
    done = 0
    while done < len(buf):
        with writing(path, need):
            k = os.pwrite(fd, buf[done : done + WRITE_PIECE_BYTES], pos + done)
        if k <= 0:
            raise OutputError(f"cannot write {path}: the system accepted no bytes")
        done += k


def fsync_dir(path) -> None:
    """Make creates and renames in `path` durable (POSIX needs the directory synced)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def create_file(path: Path, chunks: Iterable[bytes]) -> None:
    """Write a whole small file with O_EXCL and fsync it."""
    with writing(path):
        fd = os.open(path, CREATE, 0o644)
        try:
            pos = 0
            for chunk in chunks:
                pwrite_all(fd, memoryview(chunk).cast("B"), pos, path)
                pos += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)  # errors checked: NFS reports ENOSPC late, at close


def place_file(path: Path, chunks: Iterable[bytes]) -> None:
    """tmp + fsync + rename: `path` is either absent or complete."""
    tmp = path.with_name(path.name + ".tmp")
    create_file(tmp, chunks)
    with writing(path):
        os.rename(tmp, path)


def sha256_file(path, piece: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- where OUT may go


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


def resolve_out(out_dir) -> Path:
    """Absolute OUT with its parent's symlinks resolved; the last component is kept as given."""
    p = os.path.join(os.getcwd(), os.fspath(out_dir)).rstrip("/") or "/"
    head, name = os.path.split(p)
    if name in (".", ".."):
        head, name = os.path.split(os.path.realpath(p))
    return Path(os.path.realpath(head)) / name


def check_writable(parent: Path, staging: Path) -> None:
    """The output location must accept new entries (staging is created in `parent`). Checked
    without creating anything: permissions, a read-only mount, a filesystem with no storage at
    all (/sys, /proc: root may pass the permission check, then mkdir fails). Whatever else only
    an attempt reveals fails when staging is created."""
    problem = None
    if not os.access(parent, os.W_OK | os.X_OK):
        problem = OSError(errno.EACCES, os.strerror(errno.EACCES))
    else:
        with contextlib.suppress(OSError, AttributeError):
            vfs = os.statvfs(parent)
            if vfs.f_flag & os.ST_RDONLY:
                problem = OSError(errno.EROFS, os.strerror(errno.EROFS))
            elif vfs.f_blocks == 0:
                problem = OSError(errno.EPERM, "a virtual filesystem without storage, like /sys or /proc")
    if problem is not None:
        raise output_error(problem, staging)


def check_apart(out: Path, inputs: Iterable[str]) -> None:
    """OUT must not be, sit inside, or contain an input: by realpath and by (dev, ino)."""
    out_s = str(out)
    out_id, out_ids = _ident(out_s), _chain(out_s)
    hint = "choose an output path outside every input model"
    for inp in inputs:
        real = os.path.realpath(inp)
        inp_id = _ident(real)
        if out_s == real or (inp_id is not None and inp_id == out_id):
            raise RecipeError(f"the output directory {out_s} is the input {inp}", hint=hint)
        if _inside(out_s, real) or (inp_id is not None and inp_id in out_ids):
            raise RecipeError(f"the output directory {out_s} is inside the input {inp}", hint=hint)
        if _inside(real, out_s) or (out_id is not None and out_id in _chain(real)):
            raise RecipeError(f"the output directory {out_s} contains the input {inp}", hint=hint)


# ---------------------------------------------------------------- input fingerprints


def file_fingerprint(path) -> dict:
    """realpath, size, mtime_ns, inode and header sha256 of an input file (from one open fd)."""
    real = os.path.realpath(path)
    with open(real, "rb") as f:
        st = os.fstat(f.fileno())
        n = int.from_bytes(f.read(8), "little")
        digest = hashlib.sha256(f.read(min(n, MAX_HEADER_BYTES))).hexdigest()
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "header_sha256": digest}


def input_changes(entries: list[dict]) -> list[str]:
    """How the files fingerprinted in `entries` differ now (cheap: one stat each)."""
    changes = []
    for e in entries:
        try:
            st = os.stat(e["path"])
        except OSError as exc:
            changes.append(f"{e['path']}: {exc.strerror}")
            continue
        what = [w for w, a, b in (("size", st.st_size, e["size"]), ("modification time", st.st_mtime_ns, e["mtime_ns"]),
                                  ("inode", st.st_ino, e["ino"])) if a != b]
        if what:
            changes.append(f"{e['path']}: {' and '.join(what)} changed")
    return changes


def plan_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for key, text in _FINGERPRINT_PARTS.items():
        if old.get(key) != new.get(key):
            detail = {"npmerge_version": lambda: _changes(old.get(key), new.get(key), "version"),
                      "recipe_sha256": lambda: _changes(old.get("recipe"), new.get("recipe"), "recipe"),
                      "layout_sha256": lambda: _layout_changes(old.get("layout"), new.get("layout"))}[key]()
            diffs.append(text + (f": {detail}" if detail else ""))
    old_inputs = {e["path"]: e for e in old.get("inputs", [])}
    new_inputs = {e["path"]: e for e in new.get("inputs", [])}
    for path in sorted(old_inputs.keys() - new_inputs.keys()):
        diffs.append(f"input file {path} of the interrupted run is not an input now")
    for path in sorted(new_inputs.keys() - old_inputs.keys()):
        diffs.append(f"input file {path} was not an input of the interrupted run")
    for path in sorted(old_inputs.keys() & new_inputs.keys()):
        if old_inputs[path] != new_inputs[path]:
            fields = [k for k in new_inputs[path] if old_inputs[path].get(k) != new_inputs[path][k]]
            diffs.append(f"input file {path} changed since the interrupted run ({', '.join(fields)})")
    return diffs


_ABSENT = object()


def _changes(old, new, where: str, limit: int = 4) -> str:
    """The keys of two plain-data records that differ, each with both values (plan.json
    of an older npmerge may lack a record: then nothing is named)."""
    if old is None or new is None:
        return ""
    found: list[str] = []

    def walk(a, b, at: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in [*a, *(k for k in b if k not in a)]:
                walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{at}.{k}" if at else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{at}[{i}]")
        elif a != b or type(a) is not type(b):
            was = "absent" if a is _ABSENT else shown(a)
            now = "absent" if b is _ABSENT else shown(b)
            found.append(f"{at or where} was {was}, now {now}")

    walk(old, new, "")
    return "; ".join(found[:limit]) + (f" (and {len(found) - limit} more)" if len(found) > limit else "")


def _layout_changes(old, new) -> str:
    if old is None or new is None:
        return ""
    dtypes = _changes(old.get("dtypes"), new.get("dtypes"), "dtypes", limit=2)
    if dtypes:
        return "output dtype of " + dtypes
    if new.get("shards") != old.get("shards"):
        return f"{new.get('shards')} shard(s), the interrupted run wrote {old.get('shards')}"
    return "the same shards and dtypes, other headers (a one-file output's header holds the recipe)"


# ---------------------------------------------------------------- locks


def read_lock(path: Path) -> dict | None:
    """The lock's {"pid", "host", ...}; a bare pid is accepted too, as humans write locks."""
    try:
        text = path.read_text(errors="replace").strip()
        info = json.loads(text) if text.startswith("{") else {"pid": int(text.split()[0])}
    except (OSError, ValueError, IndexError):
        return None
    return info if isinstance(info, dict) and type(info.get("pid")) is int else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # exists, owned by someone else
    except (OSError, OverflowError):
        return False
    return True


# ---------------------------------------------------------------- the staging directory


def parts_dir(out_dir: Path) -> Path:
    """Where the parts of a merge split into parts stage (`--part I/N`): beside OUT, on the
    filesystem every node sees."""
    return out_dir.parent / f".{out_dir.name}.npmerge-parts"


def part_dir(out_dir: Path, part: int, parts: int) -> Path:
    return parts_dir(out_dir) / f"part-{part:04d}-of-{parts:04d}"


class Staging:
    """`.<out>.npmerge-partial/`: created or taken over, then parked, discarded or finalised.

    `owned` is true while this process holds the lock; nothing here ever touches a
    staging directory it does not own.
    """

    def __init__(self, out_dir: Path, path: Path | None = None):
        self.out_dir = out_dir
        self.path = path or out_dir.parent / f".{out_dir.name}.npmerge-partial"  # `path`: a part's (parts.py)
        self.owned = False

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def refuse(self) -> None:
        """Raise the error for a staging dir this run may not use (locked, or left over)."""
        lock = read_lock(self.path / LOCK_NAME)
        here = socket.gethostname()
        if lock is not None:
            host, pid = lock.get("host") or here, lock["pid"]
            if host != here or pid_alive(pid):
                raise OutputError(f"output {self.out_dir} is locked by pid {pid} on host {host}",
                                  hint="another npmerge run is writing it: wait for it or stop it (if no such run "
                                       f"exists, delete {self.path / LOCK_NAME} and use --resume)")
        raise OutputError(f"{self.path} exists: it is the incomplete output of an interrupted npmerge run",
                          hint="run the same command again with --resume to continue it, or delete it "
                               f"(rm -r '{self.path}') to start over")

    def create(self, fingerprint: dict) -> None:
        try:
            if self.path.parent != self.out_dir.parent:  # a part's: the parts' directory may be new
                os.makedirs(self.path.parent, exist_ok=True)
            os.mkdir(self.path)
        except FileExistsError:  # another run got there first
            self.refuse()
        except OSError as e:
            raise output_error(e, self.path) from e
        self.owned = True
        self._lock()
        create_file(self.path / README_NAME, [_README_TEXT.encode()])
        create_file(self.path / MANIFEST_NAME, [])
        place_file(self.path / PLAN_NAME, [(json.dumps(fingerprint, indent=1) + "\n").encode()])
        with writing(self.path):
            fsync_dir(self.path)
            fsync_dir(self.path.parent)

    def _lock(self) -> None:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        try:
            create_file(self.path / LOCK_NAME, [(json.dumps(lock) + "\n").encode()])
        except OutputError as e:
            if isinstance(e.__cause__, FileExistsError):
                self.owned = False
                self.refuse()
            raise

    def take_over(self, fingerprint: dict, shards: list[tuple[str, int]]) -> dict[int, dict]:
        """--resume: claim a stale lock, check the plan, keep the verified shards; return their records.

        `shards` is the layout's (filename, size) per shard index.
        """
        lock_path = self.path / LOCK_NAME
        self.check_unlocked()
        if os.path.lexists(lock_path):  # stale: rename it away atomically, so one claimant wins
            stale = lock_path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.rename(lock_path, stale)
            except FileNotFoundError:
                self.refuse()
            except OSError as e:
                raise output_error(e, lock_path) from e
            os.unlink(stale)
        self._lock()
        self.owned = True
        try:
            self.check_plan(fingerprint)
            kept = {i: rec for i, rec in self.recorded(shards).items()
                    if sha256_file(self.path / shards[i][0]) == rec.get("sha256")}
            self._prune({shards[i][0] for i in kept})
            place_file(self.path / MANIFEST_NAME, [_line(kept[i]) for i in sorted(kept)])
            if not os.path.lexists(self.path / PLAN_NAME):  # killed while setting up: start it afresh here
                place_file(self.path / PLAN_NAME, [(json.dumps(fingerprint, indent=1) + "\n").encode()])
            with writing(self.path):
                fsync_dir(self.path)
        except BaseException:
            self.release_lock()  # refused: leave the directory as it was for the right command
            raise
        return kept

    # Read-only parts of take_over, which a dry run (OutputWriter.preflight) runs too.

    def check_unlocked(self) -> None:
        """Refuse when a live run (or one on another host) holds the lock."""
        lock = read_lock(self.path / LOCK_NAME)
        if lock is not None and ((lock.get("host") or socket.gethostname()) != socket.gethostname()
                                 or pid_alive(lock["pid"])):
            self.refuse()

    def check_plan(self, fingerprint: dict) -> None:
        """Refuse to resume a different plan (recipe, layout, version, input files)."""
        hint = (f"run exactly the interrupted command again with --resume, or delete {self.path} "
                "to start over")
        if not os.path.lexists(self.path / PLAN_NAME):
            return  # the run died setting up, before its plan (and any shard): nothing to differ from
        try:
            old = json.loads((self.path / PLAN_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RecipeError(f"cannot resume from {self.path}: no readable {PLAN_NAME} ({e})",
                              hint=f"the run stopped before writing anything; delete {self.path} and run "
                                   "again without --resume") from None
        try:
            diffs = plan_differences(old, fingerprint)
        except (AttributeError, KeyError, TypeError):
            diffs = [f"{PLAN_NAME} is damaged"]
        if diffs:
            raise RecipeError(f"cannot resume into {self.out_dir}: {diffs[0]}"
                              + "".join(f"\n  {d}" for d in diffs[1:]), hint=hint)

    def recorded(self, shards: list[tuple[str, int]]) -> dict[int, dict]:
        """Manifest records of shards whose file is there with the planned name and size
        (not yet hashed: take_over keeps those whose sha256 also matches)."""
        found: dict[int, dict] = {}
        for rec in self._manifest():
            i = rec.get("shard")
            if (type(i) is int and 0 <= i < len(shards) and rec.get("file") == shards[i][0]
                    and rec.get("size") == shards[i][1] and isinstance(rec.get("stats"), dict)):
                path = self.path / shards[i][0]
                if path.is_file() and path.stat().st_size == shards[i][1]:
                    found[i] = rec
        return found

    def _manifest(self) -> list[dict]:
        """Manifest records; a torn last line (the run was killed mid-append) is ignored."""
        try:
            lines = (self.path / MANIFEST_NAME).read_bytes().splitlines()
        except OSError:
            return []
        records = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
        return records

    def record(self, rec: dict) -> None:
        """Append one finished shard's line to the manifest and fsync it: its completion marker."""
        path = self.path / MANIFEST_NAME
        with writing(path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                os.write(fd, _line(rec))
                os.fsync(fd)
            finally:
                os.close(fd)

    def _prune(self, keep: set[str]) -> None:
        """Remove everything but the bookkeeping files and `keep` (inside our own staging dir)."""
        for entry in os.scandir(self.path):
            if entry.name in keep or entry.name in PRIVATE:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def release_lock(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_NAME)
        self.owned = False

    def park(self, keep: set[str]) -> bool:
        """Interrupted: keep the finished shards and bookkeeping for --resume, drop the rest, unlock.
        False (and nothing done) when there is no plan.json left to resume from."""
        if not self.owned or not (self.path / PLAN_NAME).is_file():
            return False
        self._prune(keep)
        self.release_lock()
        with contextlib.suppress(OSError):
            fsync_dir(self.path)
        return True

    def discard(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
            self.owned = False

    def finalize(self) -> None:
        """Remove the bookkeeping files before the commit rename (the lock last)."""
        with writing(self.path):
            for name in (README_NAME, PLAN_NAME, MANIFEST_NAME, LOCK_NAME):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / name)
            fsync_dir(self.path)


def _line(rec: dict) -> bytes:
    return (json.dumps(rec, separators=(",", ":"), allow_nan=True) + "\n").encode()

"""Strict safetensors reader: header validation and zero-copy read-only views.

Why our own parser: the official Python API has no offsets and copies on the numpy
path (docs/format-and-safety.md §1). Validation follows the reference's
`SafeTensors::read_metadata` step by step (§1.2) so that every file it rejects is
rejected here with the same error class (`err.kind`), and everything it accepts
(§1.4) is accepted, except the stricter checks listed in DIVERGENCES (§1.5).
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import re
import stat
from dataclasses import dataclass

import numpy as np

from ..constants import MAX_HEADER_BYTES, MAX_JSON_DEPTH
from ..dtypes import DTYPES, DType
from ..errors import InvalidCheckpoint

# Where we deliberately reject what the reference accepts (kind "Divergence:<key>").
DIVERGENCES = {
    "duplicate-name": "a tensor name appears twice (reference: last one wins, #401)",
    "duplicate-metadata-key": "a key appears twice inside __metadata__ (reference: last wins)",
    "name-control-char": "tensor name contains U+0000-U+001F or U+007F (reference accepts, #748)",
    "dtype-map-form": 'dtype written as {"F32": null} (serde enum map form)',
    "array-entry": 'tensor entry written as ["F32", [1], [0, 4]] (serde struct-as-sequence form)',
    "numpy-shape": "zero-size shape NumPy cannot represent (a dim >= 2**63, "
    "itemsize x product of non-zero dims >= 2**63, or too many dims)",
}

_U64 = 1 << 64
_NP_MAX = (1 << 63) - 1
_NP_MAXDIMS = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
_FIELDS = ("dtype", "shape", "data_offsets")
_HINT_CORRUPT = "the file is corrupt or not a safetensors file; re-download or re-export it"
_HINT_SHORT = "the file is incomplete; re-download it"
_SURROGATE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_DEPTH_LUT = np.zeros(256, np.int8)
_DEPTH_LUT[[ord("["), ord("{")]] = 1
_DEPTH_LUT[[ord("]"), ord("}")]] = -1
_ADVICE = {"willneed": "MADV_WILLNEED", "sequential": "MADV_SEQUENTIAL", "dontneed": "MADV_DONTNEED"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first data byte
    end: int  # absolute file offset past the last byte

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: str
    header_len: int
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo]  # JSON header order
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _q(name: str) -> str:
    """Quote a tensor name for messages: escapes control chars, shortens long names."""
    if len(name) > 120:
        name = name[:100] + "..."
    return "'" + name.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _jtype(x) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if x is None or type(x) is bool:
        return json.dumps(x)
    return {int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(x), "an object")


def _fail(source: str, kind: str, what: str, hint: str | None = _HINT_CORRUPT):
    err = InvalidCheckpoint(f"{what} ({source})", hint)
    err.kind = kind
    return err


def _diverge(source: str, key: str, what: str):
    return _fail(source, "Divergence:" + key, what, "npmerge is stricter than the safetensors "
                 "library here on purpose; fix the writer or re-export the file")


def _check_prefix(prefix, file_size: int, source: str) -> int:
    """Steps 1-3: return N, refusing it before anything of size N is allocated."""
    if file_size < 8 or len(prefix) < 8:
        raise _fail(source, "HeaderTooSmall", f"file is {file_size} bytes; a safetensors file "
                    "needs at least 8" if file_size < 8 else f"only {len(prefix)} of the 8 "
                    "length bytes could be read (file changed while reading?)", _HINT_SHORT)
    n = int.from_bytes(bytes(prefix[:8]), "little")
    if n > MAX_HEADER_BYTES:
        raise _fail(source, "HeaderTooLarge",
                    f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise _fail(source, "InvalidHeaderLength",
                    f"header length {n} but file has only {file_size - 8} bytes after the "
                    "length field (truncated download?)", _HINT_SHORT)
    return n


class _Obj(dict):
    """A JSON object that remembers its raw pairs when a key was repeated."""

    __slots__ = ("pairs",)


def _hook(pairs):
    d = _Obj(pairs)
    d.pairs = pairs if len(d) != len(pairs) else None
    return d


def _parse_int(s: str):
    # serde reads "-0" as the float -0.0; over-long literals become floats (or fail
    # with "number out of range" past f64), so neither may pass a `type is int` check.
    if s == "-0":
        return -0.0
    if len(s) > 21:
        return _parse_float(s)
    return int(s)


def _parse_float(s: str):
    f = float(s)
    if math.isinf(f):
        raise ValueError(f"number out of range: {s[:40]}")
    return f


def _no_constant(s: str):
    raise ValueError(f"{s} is not valid JSON")


def _json_depth(hb) -> int:
    """Max bracket depth outside strings, without recursion, in linear time (NumPy).

    Escapes are dropped first (`\\\\` pairs, then `\\"`), exactly as a JSON lexer pairs
    them; then a bracket counts only where the number of quotes before it is even.
    """
    arr = np.frombuffer(hb, np.uint8)
    if np.count_nonzero((arr == 91) | (arr == 123)) < MAX_JSON_DEPTH:
        return 0
    if np.any(arr == 92):
        arr = np.frombuffer(bytes(hb).replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    depth = quotes = best = 0
    for i in range(0, len(arr), 1 << 20):
        chunk = arr[i:i + (1 << 20)]
        q = np.cumsum(chunk == 34, dtype=np.int64) + quotes
        run = np.cumsum(np.where(q & 1, 0, _DEPTH_LUT[chunk]), dtype=np.int64) + depth
        best, depth, quotes = max(best, int(run.max())), int(run[-1]), int(q[-1])
        if best >= MAX_JSON_DEPTH:
            break
    return best


def _has_lone_surrogate(root) -> bool:
    stack = [root]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(x, dict):  # raw pairs too: serde also parses overwritten duplicates
            stack.extend(itertools.chain.from_iterable(x.pairs or x.items()))
        elif isinstance(x, list):
            stack.extend(x)
    return False


def _is_u64_list(v) -> bool:
    return type(v) is list and all(type(x) is int and 0 <= x < _U64 for x in v)


def _load_json(hb, source: str):
    """Steps 4-5 up to `serde_json::from_str`: strict UTF-8, then a serde-like JSON parse."""
    bad = lambda what: _fail(source, "InvalidHeaderDeserialization", what)  # noqa: E731
    try:
        text = str(hb, "utf-8")
    except UnicodeDecodeError as e:
        raise _fail(source, "InvalidHeader", f"header is not valid UTF-8 at byte {e.start} "
                    f"of the header (file offset {8 + e.start})")
    if text.startswith("\ufeff"):
        raise bad("header starts with a UTF-8 byte-order mark, which JSON does not allow")
    if text.endswith("\x00"):
        raise bad("header padded with NUL bytes instead of spaces (writer bug)")
    head = text.lstrip(" \t\n\r")[:1]
    if head != "{":  # serde fails at the first token too; never parse 100 MB of it
        raise bad(f"header JSON must be an object, but it starts with {head!r}")
    if _json_depth(hb) >= MAX_JSON_DEPTH:
        raise bad(f"header nesting too deep ({MAX_JSON_DEPTH} or more levels of brackets)")
    try:
        obj = json.loads(text, object_pairs_hook=_hook, parse_int=_parse_int,
                         parse_float=_parse_float, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise bad(f"invalid JSON in header: {e.msg} at line {e.lineno} column {e.colno}")
    except (ValueError, RecursionError) as e:
        raise bad(f"invalid JSON in header: {e}")
    if _SURROGATE_RE.search(text) and _has_lone_surrogate(obj):
        raise bad("invalid JSON in header: a \\u escape is an unpaired UTF-16 surrogate")
    return obj


def _parse_entries(buf, file_size: int, source: str):
    """Steps 1-5 plus our stricter name/form checks.

    Returns (N, metadata, items) with items = [(name, DType, shape, begin, end)] in
    header order, offsets relative to the data buffer.
    """
    mv = memoryview(buf)
    n = _check_prefix(mv[:8], file_size, source)
    if len(mv) < 8 + n:
        raise _fail(source, "InvalidHeaderLength", f"only {len(mv) - 8} of {n} header bytes "
                    "could be read (file changed while reading?)", _HINT_SHORT)
    obj = _load_json(mv[8:8 + n], source)
    bad = lambda what: _fail(source, "InvalidHeaderDeserialization", what)  # noqa: E731

    pairs = obj.pairs or list(obj.items())
    metadata, seen_meta, items, later = None, False, [], []
    for name, entry in pairs:
        if name == "__metadata__":
            if seen_meta:
                raise bad("duplicate '__metadata__' entry in header")
            seen_meta = True
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise bad(f"__metadata__ must be an object of strings, not {_jtype(entry)}")
            for k, v in entry.pairs or entry.items():
                if type(v) is not str:
                    raise bad(f"__metadata__ value for key {_q(k)} must be a string, not {_jtype(v)}")
            if entry.pairs:
                seen: set[str] = set()
                dup = next(k for k, _ in entry.pairs if k in seen or seen.add(k))
                later.append(("duplicate-metadata-key", f"duplicate __metadata__ key {_q(dup)}"))
            metadata = dict(entry)
            continue
        what = f"tensor {_q(name)}"
        if type(entry) is list and len(entry) == 3:
            later.append(("array-entry", f"{what}: entry must be an object, not an array"))
            entry = _Obj(zip(_FIELDS, entry))
            entry.pairs = None
        if not isinstance(entry, dict):
            raise bad(f"{what}: entry must be an object with dtype, shape and data_offsets, "
                      f"not {_jtype(entry)}")
        if entry.pairs:
            keys = [k for k, _ in entry.pairs]
            for f in _FIELDS:
                if keys.count(f) > 1:
                    raise bad(f"{what} has a duplicate '{f}' field")
        for f in _FIELDS:
            if f not in entry:
                raise bad(f"{what} is missing '{f}'")
        dt = entry["dtype"]
        if (isinstance(dt, dict) and len(dt) == 1 and not dt.pairs
                and next(iter(dt)) in DTYPES and next(iter(dt.values())) is None):
            later.append(("dtype-map-form", f"{what}: dtype must be a string, not an object"))
            dt = next(iter(dt))
        if type(dt) is not str:
            raise bad(f"{what}: dtype must be a string such as \"F32\", not {_jtype(dt)}")
        if dt not in DTYPES:
            raise bad(f"{what} has unknown dtype {_q(dt)} (accepted, case-sensitive: "
                      f"{', '.join(DTYPES)})")
        shape, offs = entry["shape"], entry["data_offsets"]
        if not _is_u64_list(shape):
            raise bad(f"shape of {_q(name)} must be non-negative integers below 2**64")
        if type(offs) is not list or len(offs) != 2:
            raise bad(f"data_offsets of {_q(name)} must be exactly 2 integers")
        if not _is_u64_list(offs):
            raise bad(f"data_offsets of {_q(name)} must be non-negative integers below 2**64")
        items.append((name, DTYPES[dt], tuple(shape), offs[0], offs[1]))

    names = set()
    for name, *_ in items:
        if name in names:
            raise _diverge(source, "duplicate-name", f"duplicate tensor name {_q(name)} in header")
        names.add(name)
        m = _CONTROL_RE.search(name)
        if m:
            raise _diverge(source, "name-control-char", f"invalid tensor name {_q(name)} "
                           f"(contains control character U+{ord(m.group()):04X})")
    if later:
        raise _diverge(source, *later[0])
    return n, metadata, items


def _check_layout(source: str, n: int, file_size: int, items) -> None:
    """Steps 6-7 (sort by offsets, contiguity, sizes, exact coverage), then NumPy limits."""
    start, last = 0, None
    for name, dt, shape, b, e in sorted(items, key=lambda t: (t[3], t[4])):
        if e < b:
            raise _fail(source, "InvalidOffset", f"tensor {_q(name)} has data_offsets "
                        f"[{b}, {e}]: end before begin")
        if b > start:
            raise _fail(source, "InvalidOffset", f"gap in data before tensor {_q(name)} "
                        f"(bytes {start}..{b} unused)")
        if b < start:
            raise _fail(source, "InvalidOffset", f"tensor {_q(name)} overlaps {_q(last[0])} "
                        f"(bytes {b}..{e} vs {last[3]}..{last[4]})")
        numel = 1
        for d in shape:  # checked u64 product, left to right, like the reference
            numel *= d
            if numel >= _U64:
                break
        nbits = numel * dt.bits
        if numel >= _U64 or nbits >= _U64:
            raise _fail(source, "ValidationOverflow",
                        f"size of tensor {_q(name)} overflows (shape {list(shape)} of {dt.name})")
        if nbits % 8:
            raise _fail(source, "MisalignedSlice", f"tensor {_q(name)}: {numel} elements of "
                        f"{dt.name} ({dt.bits} bits each) do not fill whole bytes")
        if e - b != nbits // 8:
            raise _fail(source, "TensorInvalidInfo", f"tensor {_q(name)}: shape {list(shape)} x "
                        f"{dt.name} = {nbits // 8} bytes but offsets give {e - b}")
        start, last = e, (name, dt, shape, b, e)
    covered = 8 + n + start
    if covered < file_size:
        raise _fail(source, "MetadataIncompleteBuffer",
                    f"{file_size - covered} unexpected bytes after the last tensor")
    if covered > file_size:
        raise _fail(source, "MetadataIncompleteBuffer", f"file is {covered - file_size} bytes "
                    "short of what the header declares (incomplete download?)", _HINT_SHORT)
    for name, dt, shape, b, e in items:
        size = max(1, dt.bits // 8)
        for d in shape:
            size *= d or 1
        if len(shape) > _NP_MAXDIMS or size > _NP_MAX or any(d > _NP_MAX for d in shape):
            raise _diverge(source, "numpy-shape", f"tensor {_q(name)} has shape "
                           f"{list(shape)}, which NumPy cannot represent")


def parse_header(buf, file_size: int, source: str) -> Header:
    """Validate a header from the first 8+N bytes (or the whole file) and the file size."""
    n, metadata, items = _parse_entries(buf, file_size, source)
    _check_layout(source, n, file_size, items)
    base = 8 + n
    tensors = {name: TensorInfo(name, dt, shape, base + b, base + e)
               for name, dt, shape, b, e in items}
    return Header(source, n, metadata, tensors, file_size)


def _os_fail(source: str, e: OSError, doing: str = "cannot open"):
    reason = e.strerror or str(e)
    return _fail(source, "OSError", f"{doing} file: {reason}",
                 "check that the path exists, is a regular file and is readable")


def _not_regular(source: str, mode: int):
    what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return _fail(source, "OSError", f"path is {what}, not a regular file",
                 "point at a .safetensors file")


def _open_checked(source: str):
    """Open read-only without ever blocking (FIFOs are refused before and after open)."""
    try:
        st = os.stat(source)
    except OSError as e:
        raise _os_fail(source, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(source, st.st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(source, flags | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise _os_fail(source, e) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_regular(source, st.st_mode)
    return fd, st


def _read_into(fd: int, view: memoryview) -> int:
    got = 0
    while got < len(view):
        if hasattr(os, "readv"):
            k = os.readv(fd, [view[got:]])
        else:
            chunk = os.read(fd, len(view) - got)
            k = len(chunk)
            view[got:got + k] = chunk
        if k == 0:
            break
        got += k
    return got


def _read_header(path):
    source = os.fspath(path)
    fd, st = _open_checked(source)
    try:
        prefix = bytearray(min(8, st.st_size))
        try:
            got = _read_into(fd, memoryview(prefix))
            n = _check_prefix(prefix[:got], st.st_size, source)
            buf = bytearray(8 + n)
            buf[:8] = prefix
            got = 8 + _read_into(fd, memoryview(buf)[8:])
        except OSError as e:
            raise _os_fail(source, e, "cannot read") from None
        header = parse_header(memoryview(buf)[:got], st.st_size, source)
    finally:
        os.close(fd)
    return header, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_header(path) -> Header:
    """Read and validate the header of a file; reads only 8 + N bytes."""
    return _read_header(path)[0]


class SafetensorsFile:
    """One validated file, memory-mapped once (np.memmap(path, np.uint8, mode='r'), lazily on first view).

    Views keep the mapping alive: `close()` drops our reference, and the kernel
    mapping goes away when the last view is garbage-collected.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.header, self._fingerprint = _read_header(self.path)
        self._mm = None
        self._raw = None
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _info(self, name: str) -> TensorInfo:
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        try:
            return self.header.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {_q(name)} in {self.path}") from None

    def _map(self) -> np.ndarray:
        if self._raw is None:
            # Map the same inode we validated; a file replaced or resized since would
            # otherwise be read past its end (SIGBUS) or with stale offsets.
            fd, st = _open_checked(self.path)
            with os.fdopen(fd, "rb", buffering=0) as f:
                if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._fingerprint:
                    raise _fail(self.path, "OSError", "file changed since its header was read",
                                "do not modify inputs while npmerge runs")
                self._mm = np.memmap(f, dtype=np.uint8, mode="r")
            self._raw = self._mm.view(np.ndarray)
        return self._raw

    def _storage(self, info: TensorInfo) -> np.dtype:
        dt = info.dtype
        if dt.storage is None or dt.kind == "complex":
            raise _fail(self.path, "UnsupportedDType", f"tensor {_q(info.name)}: dtype "
                        f"{dt.name} is not supported by npmerge",
                        "only BOOL, integer, FP8, F16, BF16, F32 and F64 tensors can be read")
        return dt.storage

    def view(self, name: str) -> np.ndarray:
        """Zero-copy read-only view in the raw storage dtype, shaped."""
        info = self._info(name)
        dtype = self._storage(info)
        if info.nbytes == 0:
            out = np.empty(info.shape, dtype)
            out.flags.writeable = False
            return out
        return self._map()[info.begin:info.end].view(dtype).reshape(info.shape)

    def flat(self, name: str) -> np.ndarray:
        """1-D read-only contiguous view of the same bytes."""
        info = self._info(name)
        dtype = self._storage(info)
        if info.nbytes == 0:
            out = np.empty(0, dtype)
            out.flags.writeable = False
            return out
        return self._map()[info.begin:info.end].view(dtype)

    def advise(self, name: str, advice: str) -> None:
        """Hint the kernel about the tensor's page range; a no-op where unsupported."""
        if advice not in _ADVICE:
            raise ValueError(f"advice must be one of {sorted(_ADVICE)}, not {advice!r}")
        info = self._info(name)
        if info.nbytes == 0 or (self._raw is None and advice == "dontneed"):
            return
        try:
            self._map()
            option = getattr(mmap, _ADVICE[advice])
            start = info.begin - info.begin % mmap.PAGESIZE
            self._mm._mmap.madvise(option, start, info.end - start)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self) -> None:
        self._mm = None
        self._raw = None
        self._closed = True

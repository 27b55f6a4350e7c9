"""Numba kernels, loaded lazily, and where their compiled code is cached.

Importing this package does not import numba: `npmerge --help` and `npmerge info`
must start instantly. `load("family")` prepares the JIT cache location first, then
imports the kernel module (which compiles on first call, or loads compiled code from
the cache).

Numba's `cache=True` needs a writable directory: numba tries the package's own
`__pycache__`, then NUMBA_CACHE_DIR. We decide before numba is imported:

1. NUMBA_CACHE_DIR set by the user: that.
2. The package's `__pycache__` writable: there (numba's default; `npmerge warmup` run
   where npmerge is installed, e.g. while building a container image, fills it).
3. Otherwise a writable per-user directory (~/.cache/npmerge/numba, else the temp
   dir). If the package's `__pycache__` holds compiled kernels (a read-only image), the
   per-user directory becomes an *overlay*: it links every file of the read-only cache
   (numba keys entries by a hash of the source, so they stay valid), numba loads them
   from there, and kernels the image lacks (another CPU, another numba, other dtypes)
   are compiled and saved next to the links, never into the image. `compiled()` tells
   the caller whether that happened, so it can say so.
4. Nothing writable at all: kernels are compiled in memory for each run (CACHE False).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
IN_TREE = _PACKAGE_DIR / "__pycache__"
CACHE = True  # kernel modules pass it as numba's cache=: False when nothing is writable
OVERLAY: Path | None = None  # the writable directory in front of a read-only cache (3.)
_chosen: str | None = None
_decided = False


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".npmerge-probe-")
        probe.close()
        return True
    except OSError:
        return False


def cache_dir_candidates() -> list[Path]:
    """Where compiled kernels may be cached, best first."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    home_cache = Path(xdg) if xdg else Path.home() / ".cache"
    return [
        IN_TREE,
        home_cache / "npmerge" / "numba",
        Path(tempfile.gettempdir()) / f"npmerge-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}",
    ]


def numba_subdir(source_dir: Path) -> str:
    """The directory numba caches a source directory's functions in under NUMBA_CACHE_DIR
    (numba.core.caching.UserProvidedCacheLocator.get_suitable_cache_subpath)."""
    import hashlib

    path = os.path.abspath(source_dir)
    return f"{os.path.basename(path)}_{hashlib.sha1(path.encode()).hexdigest()}"


def _link_read_only_cache(overlay: Path) -> None:
    """Link each compiled kernel of the read-only in-tree cache into the overlay (once;
    an index numba rewrote after compiling more kernels is a real file and stays)."""
    target = overlay / numba_subdir(_PACKAGE_DIR)
    target.mkdir(parents=True, exist_ok=True)
    for src in IN_TREE.iterdir():
        if src.suffix in (".nbi", ".nbc"):
            dst = target / src.name
            if not os.path.lexists(dst):
                try:
                    dst.symlink_to(src)
                except OSError:
                    pass


def ensure_cache_dir() -> str | None:
    """Choose where kernels are cached (see the module docstring) before numba is
    imported; return the directory, or None when kernels are not cached."""
    global CACHE, OVERLAY, _chosen, _decided
    if _decided:
        return _chosen
    _decided = True
    if os.environ.get("NUMBA_CACHE_DIR"):
        _chosen = os.environ["NUMBA_CACHE_DIR"]
        return _chosen
    if _writable(IN_TREE):
        _chosen = str(IN_TREE)
        return _chosen
    baked = IN_TREE.is_dir() and any(p.suffix == ".nbi" for p in IN_TREE.iterdir())
    for candidate in cache_dir_candidates()[1:]:
        if _writable(candidate):
            if baked:
                _link_read_only_cache(candidate)
                OVERLAY = candidate
            os.environ["NUMBA_CACHE_DIR"] = str(candidate)
            _chosen = str(candidate)
            return _chosen
    CACHE = False
    return None


_loaded: dict[str, object] = {}
_compiled: list[str] = []


def _listen() -> None:
    """Record the kernels this process compiles (instead of loading them from the cache)."""
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev):
            pass

        def on_end(self, ev):
            fn = ev.data["dispatcher"].py_func
            if fn.__module__.startswith(__name__ + "."):
                _compiled.append(f"{fn.__module__.rsplit('.', 1)[1]}.{fn.__name__}")

    event.register("numba:compile", Listener())


def load(name: str):
    """Import and return `npmerge.kernels.<name>`, preparing numba first."""
    module = _loaded.get(name)
    if module is None:
        if not _loaded:
            ensure_cache_dir()
            _listen()
        module = importlib.import_module(f"{__name__}.{name}")
        _loaded[name] = module
    return module


def is_cached(name: str) -> bool:
    """Whether the kernel "module.function" has fresh compiled code in the cache (numba's
    index for it exists and matches the source); False when that cannot be told."""
    module, function = name.split(".")
    try:
        index = getattr(load(module), function)._cache._cache_file._load_index()
    except (AttributeError, OSError, EOFError, ValueError):
        return False
    return bool(index)


def compiled() -> list[str]:
    """The kernels (and helpers) this process compiled so far, in order."""
    return list(_compiled)


def cache_note() -> str | None:
    """What the user should hear about the kernel cache after a run, if anything: kernels
    compiled in memory (nothing writable), or compiled beside a read-only installed cache
    that lacked them (another CPU or numba, other dtypes)."""
    if not _loaded:
        return None
    if not CACHE:
        return ("no writable directory for the kernel cache: kernels were compiled in memory for this run "
                "(set NUMBA_CACHE_DIR to a writable directory to keep them)")
    if OVERLAY is not None and _compiled:
        return (f"the installed kernel cache ({IN_TREE}) lacks kernels this machine needs (another CPU or numba "
                f"version, or other dtypes): compiled {len(set(_compiled))} and cached them in {OVERLAY}")
    return None


def threads(requested: int | None) -> int:
    """The compute threads in effect for --threads (None: all the cores this process may
    use; NUMBA_NUM_THREADS, where set, caps it as it caps numba)."""
    ensure_cache_dir()
    import numba

    available = numba.config.NUMBA_NUM_THREADS
    return max(1, min(int(requested), available)) if requested is not None else available

"""Numba kernels, loaded lazily.

Importing this package does not import numba: `npmerge --help` and `npmerge info`
must start instantly. `load("convert")` prepares the JIT cache location and thread
count first, then imports the kernel module (which compiles on first call, or loads
compiled code from the cache).

Numba's `cache=True` needs a writable directory. Numba first tries the package's
own `__pycache__`, then a per-user directory; in a read-only container neither may
be writable and numba would raise at import. We pick a writable place ourselves and
export it as NUMBA_CACHE_DIR before numba is imported.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


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
        _PACKAGE_DIR / "__pycache__",
        home_cache / "npmerge" / "numba",
        Path(tempfile.gettempdir()) / f"npmerge-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}",
    ]


def ensure_cache_dir() -> str | None:
    """Set NUMBA_CACHE_DIR to a writable directory unless the user chose one (and the
    thread waiting policy, which must be set before numba starts its threads)."""
    # Threads that finish a parallel region first sleep instead of spinning (GNU OpenMP,
    # numba's default threading layer, spins by default): on a busy machine the spinning
    # thread steals the time slice of the one everybody waits for. Measured on 2 cores with
    # other processes running: task arithmetic 1.7-2.1 s passive vs 7.8-8.8 s spinning, the
    # same as one thread (1.4-2.0 s); quiet, spans are large so the wake-up cost is noise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    for candidate in cache_dir_candidates():
        if _writable(candidate):
            if candidate != _PACKAGE_DIR / "__pycache__":
                os.environ["NUMBA_CACHE_DIR"] = str(candidate)
            return str(candidate)
    return None  # numba will run uncached (cache=True then fails loudly); rare


_loaded: dict[str, object] = {}


def load(name: str):
    """Import and return `npmerge.kernels.<name>`, preparing numba first."""
    module = _loaded.get(name)
    if module is None:
        ensure_cache_dir()
        module = importlib.import_module(f"{__name__}.{name}")
        _loaded[name] = module
    return module


def set_threads(threads: int | None) -> int:
    """Apply --threads (None: all cores numba sees); return the count in effect."""
    ensure_cache_dir()
    import numba

    if threads is not None:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    return numba.get_num_threads()

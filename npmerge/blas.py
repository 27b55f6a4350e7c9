"""One BLAS thread while npmerge runs LAPACK (extract-lora's SVDs).

An OpenBLAS call with several threads splits its reductions (dot products, norms) among
them, so an SVD's bits may depend on the thread count. npmerge parallelises across
modules instead (Python threads; LAPACK releases the GIL) and pins NumPy's OpenBLAS to
one thread for the duration, whatever OPENBLAS_NUM_THREADS says (the CLI defaults it
to 1 anyway, cli.py). NumPy's wheels bundle OpenBLAS as scipy-openblas with prefixed
symbols; a NumPy linked to another BLAS is left alone and `pin_note` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading

_SYMBOLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
            ("openblas_get_num_threads", "openblas_set_num_threads"))
_lock = threading.Lock()
_found: tuple | None = None


def _openblas() -> tuple | None:
    """(get, set) of the OpenBLAS NumPy loaded, or None."""
    global _found
    if _found is None:
        import numpy as np

        here = os.path.dirname(np.__file__)
        libs = sorted(glob.glob(os.path.join(here, "..", "numpy.libs", "lib*openblas*.so*"))
                      + glob.glob(os.path.join(here, ".dylibs", "lib*openblas*.dylib")))
        _found = ()
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for get, set_ in _SYMBOLS:
                if hasattr(lib, get) and hasattr(lib, set_):
                    _found = (getattr(lib, get), getattr(lib, set_))
                    break
            if _found:
                break
    return _found or None


def pin_note() -> str | None:
    """Why the thread count could not be pinned (None: it can)."""
    if _openblas() is not None:
        return None
    return ("NumPy's BLAS is not its bundled OpenBLAS: npmerge cannot pin it to one thread, so SVD results are "
            "reproducible only under the same BLAS threading (set OPENBLAS_NUM_THREADS/OMP_NUM_THREADS/"
            "MKL_NUM_THREADS=1)")


@contextlib.contextmanager
def one_thread():
    """NumPy's OpenBLAS runs single-threaded inside the block (restored after)."""
    found = _openblas()
    if found is None:
        yield
        return
    get, set_ = found
    with _lock:
        before = get()
        set_(1)
    try:
        yield
    finally:
        with _lock:
            set_(before)

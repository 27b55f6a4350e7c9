"""The engine's compute threads: run a span's pieces through serial `nogil` kernels.

Kernels are plain serial functions (kernels/span.py); parallelism is here, in Python
threads that each call a kernel on one piece at a time while the GIL is released. Next to
numba's `parallel=True` this compiles several times faster (the cold start is mostly
compile time) and schedules dynamically: a thread that lost its time slice on a busy
machine simply takes fewer pieces, instead of a static share everybody waits for.

Each piece gets the *slot* of the thread running it, so a kernel can use that slot's
scratch buffers; results that must not depend on scheduling are written per piece
(or are integer counts) and combined in piece order by the caller.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Sequence


class Workers:
    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="npmerge-compute") \
            if self.threads > 1 else None
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self.threads):
            self._slots.put(slot)

    def run(self, task: Callable[[int, int], object], pieces: int) -> list:
        """[task(piece, slot) for piece in range(pieces)], pieces in parallel; the first
        exception is raised after every started piece has finished."""
        if self._pool is None or pieces <= 1:
            return [task(p, 0) for p in range(pieces)]

        def one(piece: int):
            slot = self._slots.get()
            try:
                return task(piece, slot)
            finally:
                self._slots.put(slot)

        futures = [self._pool.submit(one, p) for p in range(pieces)]
        wait(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


_current: Workers | None = None
_serial = Workers(1)


def current() -> Workers:
    """The running merge's workers (for computed sources, e.g. a LoRA product), or a
    serial stand-in outside a merge."""
    return _current or _serial


def activate(pool: Workers | None) -> None:
    global _current
    _current = pool


def pieces(lo: int, hi: int, grid: int, size: int) -> Sequence[tuple[int, int]]:
    """lo..hi cut into pieces of about `size` elements whose inner edges lie on multiples
    of `grid` (a piece never splits a block of the grid; lo need not be on it). An empty
    range is one empty piece: a kernel called on it compiles and does nothing
    (npmerge/precompile.py)."""
    if hi <= lo:
        return [(lo, lo)]
    step = max(grid, size // grid * grid)
    edges = [lo] + list(range((lo // step + 1) * step, hi, step)) + [hi]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]

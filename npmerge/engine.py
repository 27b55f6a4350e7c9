"""Runs a Plan: for each tensor, each pass of its method's driver, each span.

The engine owns the buffers (sized by the plan from --max-memory), turns tensor
sources into span kernel inputs (addresses of mapped raw storage, or float32 buffers
that computed sources fill), runs the first-pass checks every merged tensor gets
(task-vector norms, NaN/Inf counts), hands each span to the driver and the encoded
output to the writer. It knows no method's math and never imports rich: progress
goes through a callback.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from . import kernels
from .constants import BLOCK, READAHEAD_BYTES
from .dtypes import ITEMSIZE
from .errors import IncompatibleModels
from .reduction import exact_sum
from . import precompile, workers
from .span_inputs import SpanInputs
from .workers import Workers

Progress = Callable[[int, str], None]  # (bytes advanced, tensor name)


class _Readahead:
    """Asks for the inputs of the tensors after the current one, in merge order, up to
    READAHEAD_BYTES of input ahead (a tensor at least): reading from disk overlaps the
    computation even where a small tensor is followed by a large one. Within the page
    cache a tensor's passes need, on every machine npmerge's memory default leaves room."""

    def __init__(self, todo: list, pool, prefetch):
        self.todo, self.pool, self.prefetch = todo, pool, prefetch
        self.asked = 0  # todo[:asked] have been prefetched (or are the current one)
        self.current = -1
        self.position = {id(job): i for i, job in enumerate(todo)}

    def started(self, job) -> None:
        self.current = self.position[id(job)]
        self.asked = max(self.asked, self.current + 1)
        ahead = sum(j.read_bytes for j in self.todo[self.current + 1:self.asked])
        while self.asked < len(self.todo) and (ahead == 0 or ahead < READAHEAD_BYTES):
            nxt = self.todo[self.asked]
            self.pool.submit(self.prefetch, nxt)
            ahead += nxt.read_bytes
            self.asked += 1


class WritePipe:
    """Hands output to the writer on a background thread (pwrite and the running sha256
    release the GIL), so writing span i overlaps computing span i+1. Two output
    buffers alternate; at most one write is in flight, so the writer still sees the
    bytes of a shard in order. Errors (a full disk) surface at the next call."""

    def __init__(self, writer, nbytes: int):
        from concurrent.futures import ThreadPoolExecutor

        self.writer = writer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="npmerge-write")
        self._buffers = [np.empty(nbytes, np.uint8), np.empty(nbytes, np.uint8)]
        self._next = 0
        self._pending = None

    def buffer(self) -> np.ndarray:
        """The output buffer to fill next (not the one a write may still be reading)."""
        return self._buffers[self._next]

    def write(self, name: str, offset: int, data) -> None:
        self.wait()
        self._pending = self._pool.submit(self.writer.write, name, offset, data)
        self._next ^= 1

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


class Engine:
    """Merges tensors through their drivers into a writer: `run(plan)` a whole plan, shard
    by shard; `run_driver(job)` one tensor (the plan's, or one built by npmerge/arrays.py).
    `span`: the largest span of the jobs it will run (the output buffers' size)."""

    def __init__(self, writer, *, threads: int | None, span: int, allow_nonfinite: bool = False,
                 progress: Progress | None = None):
        self.allow_nonfinite = allow_nonfinite
        self.writer = writer
        self.progress = progress or (lambda advance, name: None)
        self.threads = kernels.threads(threads)
        self.workers = Workers(self.threads)
        workers.activate(self.workers)
        self.pipe = WritePipe(writer, max(span, 1) * 8)
        self.stats: dict[str, dict] = {}
        self._precompile = None  # the helper compiling the first merge's later kernels (precompile.py)

    @staticmethod
    def _prefetch(job) -> None:
        """Ask the kernel to read the job's inputs ahead (madvise WILLNEED submits the reads
        and may block while the device queue is full: run on its own thread)."""
        for src in job.sources:
            src.prefetch()

    def run(self, plan) -> dict[str, dict]:
        """The plan's tensors shard by shard (the writer's: a part writes some), in each shard's
        data order: output is written sequentially and each shard is final (fsynced) as soon
        as its last tensor is done."""
        jobs = {job.name: job for job in plan.jobs}
        mine = self.writer.mine  # the shards this run writes (a part of a merge split into parts: some)
        shards = [(i, shard) for i, shard in enumerate(plan.layout.shards) if i in mine]
        todo = [jobs[n] for i, shard in shards if self.writer.resumed_stats(i) is None for n in shard.tensors]
        from concurrent.futures import ThreadPoolExecutor

        prefetcher = ThreadPoolExecutor(1, thread_name_prefix="npmerge-prefetch")
        ahead = _Readahead(todo, prefetcher, self._prefetch)
        first = next((job for job in todo if not job.copy), None)
        self._precompile = precompile.start(first, self.threads) if first is not None else None
        try:
            for i, shard in shards:
                resumed = self.writer.resumed_stats(i)
                if resumed is not None:  # completed by an interrupted run, verified by the writer
                    self.stats.update(resumed)
                    self.progress(sum(jobs[n].read_bytes * jobs[n].passes for n in shard.tensors), "resumed")
                    continue
                for name in shard.tensors:
                    job = jobs[name]
                    ahead.started(job)  # keep reading the next tensors while this one computes
                    if job.copy:
                        self._copy(job)
                    else:
                        self.stats[name] = self.merge(job)
                    self.pipe.wait()
                    for src in job.sources:
                        src.release()  # resident memory must not grow with the model
                self.writer.finish_shard(i, {n: self.stats[n] for n in shard.tensors if n in self.stats})
        finally:
            self.close()
            prefetcher.shutdown(wait=True)
        return self.stats

    def close(self) -> None:
        try:
            self.pipe.close()
        finally:
            workers.activate(None)
            self.workers.close()

    def _copy(self, job) -> None:
        src = job.models[0].raw().view(np.uint8)
        piece = self.pipe.buffer().size
        for start in range(0, src.size, piece):
            self.pipe.write(job.name, start, src[start:start + piece])
        self.progress(job.read_bytes, job.name)

    # -- one merged tensor ---------------------------------------------------------
    def merge(self, job) -> dict:
        """Run the job's driver over every span of every pass; return the tensor's statistics.
        The driver stays on its job (the plan's); its buffers go when the tensor is done."""
        try:
            return self.run_driver(job)
        finally:
            job.driver.release()

    def run_driver(self, job, block: int = BLOCK) -> dict:
        """The tensor's statistics, after every pass of `job.driver` over every span.
        `block`: the reduction grid and kernel block size (BLOCK; tests use small ones)."""
        n, nm = job.numel, len(job.models)
        driver = job.driver
        inputs = SpanInputs(job.base, job.models, job.span, job.input_round, block, driver.whole_rows)
        sums = np.zeros((nm, -(-n // block)), np.float64)
        bad = np.zeros((self.threads, nm + 1), np.int64)
        codecs = kernels.load("codecs")
        encoder, no_output, itemsize = codecs.encoder(job.out_dtype), codecs.encoder(None), ITEMSIZE[job.out_dtype]
        overflow = 0
        done = 0
        fused = driver.fuses_check(block)
        while done < len(driver.passes):  # end_pass may drop a pass that turned out unneeded
            pass_name = driver.passes[done]
            writes = driver.writes(pass_name)
            for lo in range(0, n, job.span):
                hi = min(n, lo + job.span)
                span = inputs.span(lo, hi, self.workers)
                if done == 0:
                    span.check, span.sums, span.bad = True, sums, bad
                    if not fused:
                        span.run_checks()
                out = self.pipe.buffer() if writes else None
                span.out = (encoder, out.ctypes.data) if writes else (no_output, 0)
                overflow += driver.feed(pass_name, span)
                if writes:
                    self.pipe.write(job.name, lo * itemsize, out[:(hi - lo) * itemsize])
                self.progress(job.read_bytes * (hi - lo) // max(n, 1), job.name)
            nonfinite = bad.sum(axis=0)
            if done == 0:  # before the driver draws conclusions from non-finite inputs
                self._refuse_nonfinite(job, nonfinite)
                if self._precompile is not None:  # the later passes' kernels, compiled meanwhile
                    self._precompile.wait()
                    self._precompile = None
            driver.end_pass(pass_name)
            done += 1
        self.pipe.wait()
        if overflow and not self.allow_nonfinite:  # inputs are finite here: the merge overflowed
            raise IncompatibleModels(
                f"merged tensor '{job.name}' has {overflow} value(s) beyond the range of {job.out_dtype}: "
                "they would be written as Inf/NaN",
                hint="choose a wider --out-dtype (e.g. float32), or lower --lambda or the weights")
        self.progress(job.read_bytes * max(job.passes - done, 0), job.name)  # passes the driver skipped
        stats = driver.stats()
        for i, m in enumerate(stats["models"]):
            m["l2"] = math.sqrt(exact_sum(sums[i]))  # exact sum of a fixed block grid
        stats["numel"] = n
        stats["passes"] = done
        if nonfinite.any():  # only with --allow-nonfinite (else refused above): the report notes it
            stats["nonfinite"] = [int(x) for x in nonfinite]  # [base, model 1, ...]
        return stats

    def _refuse_nonfinite(self, job, nonfinite: np.ndarray) -> None:
        if not nonfinite.any() or self.allow_nonfinite:
            return
        if nonfinite[0]:
            who, count = f"base '{job.base.label}'", nonfinite[0]
        else:
            i = int(np.flatnonzero(nonfinite[1:])[0])
            who, count = f"model {i + 1} '{job.models[i].label}'", nonfinite[1 + i]
        raise IncompatibleModels(
            f"{who} tensor '{job.name}' has {count} NaN/Inf value(s)"
            + ("" if nonfinite[0] or job.base is None else " (in the weights or their difference from the base)"),
            hint="a broken fine-tune poisons the merge; pass --allow-nonfinite to merge anyway")

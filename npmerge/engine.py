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
from .dtypes import DECODABLE, ITEMSIZE, SPAN_DELTA, span_luts, unaligned_ok
from .errors import IncompatibleModels
from .io.sources import TensorSource
from .reduction import exact_sum
from .methods.protocol import Span, TensorContext
from . import precompile, workers
from .workers import Workers

Progress = Callable[[int, str], None]  # (bytes advanced, tensor name)


class SpanInputs:
    """A merged tensor's sources as span kernel inputs: slot 0 the base (if any), then
    the models. Raw storage is decoded in place; other sources fill a float32 buffer per
    span, addressed so that element indices stay absolute. The kernels take one storage
    kind for all models, so models stored in different dtypes are all decoded into such
    buffers (rare). Kernels only read the buffers and a source's values depend only on
    the range, so a buffer that already holds a span's range (the next pass over a
    one-span tensor) is not filled again."""

    def __init__(self, base: TensorSource | None, models: tuple[TensorSource, ...], span: int, rnd: str | None,
                 block: int = BLOCK, rows: int = 0):
        self.block = block
        self.rows = rows  # computed sources fill whole rows of this length around each span (0: the span)
        self.sources = [base] + list(models)
        n = len(self.sources)
        self.addrs = np.zeros(n, np.int64)
        flags = np.zeros(n, np.int64)
        self._keep: list[np.ndarray] = []  # raw views and buffers, alive while the kernels run
        self._computed: list[tuple[int, TensorSource, np.ndarray]] = []
        in_place = self.in_place(base, models)
        for slot, src in enumerate(self.sources):
            if src is None:
                continue
            if in_place[slot]:
                raw = src.raw()
                self.addrs[slot] = raw.ctypes.data
                self._keep.append(raw)
            else:
                buf = np.empty(max(span + 2 * rows, 1), np.float32)
                self._computed.append((slot, src, buf))
                self._keep.append(buf)
            if src.is_delta:
                flags[slot] = SPAN_DELTA
        codecs = kernels.load("codecs")
        kinds = [(s.dtype if in_place[slot] else "F32") if s is not None else None for slot, s in enumerate(self.sources)]
        self.inp = (codecs.decoder(kinds[0]), codecs.decoder(kinds[1]), codecs.rounder(rnd), self.addrs, flags,
                    span_luts().ctypes.data, base is not None)
        self._filled: list[tuple[int, int] | None] = [None] * len(self._computed)  # range each buffer holds
        self._check_scratch: list = []  # the check pass's block buffers per thread (Span.run_checks)

    @staticmethod
    def in_place(base: TensorSource | None, models) -> list[bool]:
        """Per slot: is the source decoded from its raw storage in place (else through a
        float32 span buffer)? Models are in place only if all of them are, in one dtype."""
        def mappable(src) -> bool:
            raw = src.raw() if src is not None else None
            aligned = raw is not None and (raw.ctypes.data % max(raw.itemsize, 1) == 0 or unaligned_ok())
            return raw is not None and raw.size > 0 and aligned and src.dtype in DECODABLE
        together = all(mappable(m) for m in models) and len({m.dtype for m in models}) <= 1
        return [base is not None and mappable(base)] + [together] * len(models)

    @classmethod
    def buffer_bytes(cls, base: TensorSource | None, models, span: int, rows: int = 0) -> int:
        """Float32 span buffers for the sources that are not decoded in place."""
        slots = [base, *models]
        return 4 * (span + 2 * rows) * sum(1 for s, ok in zip(slots, cls.in_place(base, models))
                                           if s is not None and not ok)

    def span(self, lo: int, hi: int, workers) -> Span:
        for i, (slot, src, buf) in enumerate(self._computed):
            a, b = lo, hi
            if self.rows:  # the whole rows the span touches
                a, b = lo - lo % self.rows, min(src.numel, hi + (-hi) % self.rows)
            if self._filled[i] != (a, b):  # a tensor in one span is computed once, not once per pass
                src.read(a, b - a, buf)
                self._filled[i] = (a, b)
            self.addrs[slot] = buf.ctypes.data - 4 * a
        return Span(lo, hi, self.block, self.inp, workers, check_scratch=self._check_scratch)


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
    def __init__(self, plan, writer, progress: Progress | None = None):
        self.jobs = plan.jobs
        self.layout = plan.layout
        self.allow_nonfinite = plan.allow_nonfinite
        self.writer = writer
        self.progress = progress or (lambda advance, name: None)
        self.threads = kernels.threads(plan.threads)
        self.workers = Workers(self.threads)
        workers.activate(self.workers)
        self.pipe = WritePipe(writer, max(plan.span, 1) * 8)
        self.stats: dict[str, dict] = {}
        self._precompile = None  # the helper compiling the first merge's later kernels (precompile.py)

    @staticmethod
    def _prefetch(job) -> None:
        """Ask the kernel to read the job's inputs ahead (madvise WILLNEED submits the reads
        and may block while the device queue is full: run on its own thread)."""
        for src in job.sources:
            src.prefetch()

    def run(self) -> dict[str, dict]:
        """Shard by shard, in each shard's data order: output is written sequentially and
        each shard is final (fsynced) as soon as its last tensor is done."""
        jobs = {job.name: job for job in self.jobs}
        todo = [jobs[n] for i, shard in enumerate(self.layout.shards) if self.writer.resumed_stats(i) is None
                for n in shard.tensors]
        from concurrent.futures import ThreadPoolExecutor

        prefetcher = ThreadPoolExecutor(1, thread_name_prefix="npmerge-prefetch")
        ahead = _Readahead(todo, prefetcher, self._prefetch)
        first = next((job for job in todo if not job.copy), None)
        self._precompile = precompile.start(first, self.threads) if first is not None else None
        try:
            for i, shard in enumerate(self.layout.shards):
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
        """Run the job's driver over every span of every pass; return the tensor's statistics."""
        return self.run_driver(job)[1]

    def run_driver(self, job, block: int = BLOCK):
        """merge(), returning the finished driver too (tests look at its thresholds).
        `block`: the reduction grid and kernel block size (BLOCK; tests use small ones)."""
        n, nm = job.numel, len(job.models)
        ctx = TensorContext(job.name, job.shape, n, job.params, job.model_params, job.base is not None,
                            self.threads, job.stream_index, job.driver_cache)
        driver = job.method.driver(ctx)
        inputs = SpanInputs(job.base, job.models, job.span, job.input_round, block, driver.whole_rows)
        sums = np.zeros((nm, -(-n // block)), np.float64)
        bad = np.zeros((self.threads, nm + 1), np.int64)
        codecs = kernels.load("codecs")
        encoder, no_output, itemsize = codecs.encoder(job.out_dtype), codecs.encoder(None), ITEMSIZE[job.out_dtype]
        overflow = 0
        done = 0
        while done < len(driver.passes):  # end_pass may drop a pass that turned out unneeded
            pass_name = driver.passes[done]
            writes = driver.writes(pass_name)
            for lo in range(0, n, job.span):
                hi = min(n, lo + job.span)
                span = inputs.span(lo, hi, self.workers)
                if done == 0:
                    span.check, span.sums, span.bad = True, sums, bad
                    if not driver.fused_check:
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
        return driver, stats

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


class _Collect:
    """A writer stand-in that keeps one tensor's output bytes in memory."""

    def __init__(self, nbytes: int):
        self.data = np.zeros(nbytes, np.uint8)

    def write(self, name: str, offset: int, data) -> None:
        chunk = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
        self.data[offset:offset + chunk.size] = chunk


def run_arrays(method: str, base, models, params: dict, model_params: list[dict], *, dtype: str = "F32",
               model_dtype: str | None = None, out_dtype: str = "F32", shape=None, name: str = "tensor", span: int | None = None,
               threads: int | None = None, allow_nonfinite: bool = False, input_round: str | None = None,
               block: int = BLOCK, driver: bool = False, driver_cache: bool = False):
    """Merge one in-memory tensor exactly as a real merge does (tests, warmup): inputs are
    raw storage arrays of `dtype` (float32 for F32, uint16 bit patterns for BF16/F16, ...;
    the models of `model_dtype` if given);
    returns the output's raw storage array (shaped) and the tensor's statistics (and the
    finished driver if `driver`). `span` must be a multiple of `block`."""
    from types import SimpleNamespace

    from .dtypes import DTYPES
    from .io.sources import ArraySource
    from .methods import registry
    from .plan import TensorJob

    m = registry.get(method)
    shape = tuple(shape) if shape is not None else tuple(np.shape(models[0]))
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    g, mp = m.resolve(dict(params), [dict(p) for p in model_params], cross_check=False)
    b = ArraySource(base, dtype, shape, "base", name) if base is not None else None
    srcs = tuple(ArraySource(x, model_dtype or dtype, shape, f"model {i + 1}", name) for i, x in enumerate(models))
    span = span or max(block, -(-numel // block) * block)
    if span % block:
        raise ValueError(f"span {span} is not a multiple of block {block}")
    job = TensorJob(name, shape, numel, out_dtype, False, m, b, srcs, g, tuple(mp), 1, span,
                    input_round=input_round, stream_index=tuple(range(len(srcs))), driver_cache=driver_cache)
    writer = _Collect(numel * ITEMSIZE[out_dtype])
    plan = SimpleNamespace(jobs=[job], layout=None, allow_nonfinite=allow_nonfinite, threads=threads, span=span)
    engine = Engine(plan, writer)
    try:
        drv, stats = engine.run_driver(job, block)
    finally:
        engine.close()
    out = writer.data.view(DTYPES[out_dtype].storage).reshape(shape)
    return (out, stats, drv) if driver else (out, stats)

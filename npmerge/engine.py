"""Runs a Plan: for each tensor, each pass of its method, each chunk.

The engine owns the working buffers (allocated once, sized by the plan from
--max-memory), decodes input chunks straight from the memory-mapped files into
float32 rows, hands them to the method, encodes merged chunks and passes them to
the writer. It knows no method's math and never imports rich: progress goes
through a callback.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from . import kernels
from .constants import BLOCK
from .dtypes import DTYPES, count_nonfinite, decode, encode
from .errors import IncompatibleModels
from .methods.family import TensorMerge
from .plan import Plan, TensorJob

Progress = Callable[[int, str], None]  # (bytes advanced, tensor name)
_EMPTY = np.empty(0, np.float32)
_NO_SUMS = np.empty((1, 0), np.float64)  # block_stats: skip the sums of squares


class Engine:
    def __init__(self, plan: Plan, writer, progress: Progress | None = None):
        self.plan = plan
        self.writer = writer
        self.progress = progress or (lambda advance, name: None)
        self.threads = kernels.set_threads(plan.threads)
        nm, chunk = len(plan.models), plan.chunk
        self._rows = np.empty(nm * chunk, np.float32)
        self._base = np.empty(chunk, np.float32)
        self._out = np.empty(chunk, np.float32)
        self._raw = np.empty(chunk * 8, np.uint8)
        self.stats: dict[str, dict] = {}

    def run(self) -> dict[str, dict]:
        """Shard by shard, in each shard's data order: output is written sequentially and
        each shard is final (fsynced) as soon as its last tensor is done."""
        jobs = {job.name: job for job in self.plan.jobs}
        for i, shard in enumerate(self.plan.layout.shards):
            resumed = self.writer.resumed_stats(i)
            if resumed is not None:  # completed by an interrupted run, verified by the writer
                self.stats.update(resumed)
                self.progress(sum(jobs[n].read_bytes * jobs[n].passes for n in shard.tensors), "resumed")
                continue
            for name in shard.tensors:
                job = jobs[name]
                if job.copy:
                    self._copy(job)
                else:
                    self._merge(job)
                self._release(job)
            self.writer.finish_shard(i, {n: self.stats[n] for n in shard.tensors if n in self.stats})
        return self.stats

    # -- one tensor ----------------------------------------------------------------
    def _copy(self, job: TensorJob) -> None:
        src = job.base.file.flat(job.name).view(np.uint8)
        piece = self.plan.chunk * 4
        for start in range(0, src.size, piece):
            self.writer.write(job.name, start, src[start:start + piece])
        self.progress(job.read_bytes, job.name)

    def _merge(self, job: TensorJob) -> None:
        plan, nm, n = self.plan, len(job.models), job.numel
        has_base = plan.method.uses_base
        tm = TensorMerge(plan.method, plan.global_params, plan.model_params, n, has_base, self.threads)
        base_src = job.base.file.flat(job.name) if has_base else None
        model_src = [r.file.flat(job.name) for r in job.models]
        base_code = job.base.info.dtype.name if has_base else None
        codes = [r.info.dtype.name for r in job.models]
        out_dt = DTYPES[job.out_dtype]
        sumsq: list[np.ndarray] = []
        nonfinite = np.zeros(nm + 1, np.int64)
        overflow = 0  # merged values the output dtype turned into Inf/NaN
        pass_no = 0
        while pass_no < len(tm.passes):  # end_pass may drop a pass that turned out unneeded
            pass_name = tm.passes[pass_no]
            for start in range(0, n, plan.chunk):
                c = min(plan.chunk, n - start)
                rows = self._rows[:nm * c].reshape(nm, c)
                base = self._base[:c] if has_base else _EMPTY
                if has_base:
                    decode(base_src[start:start + c], base_code, base)
                for i in range(nm):
                    decode(model_src[i][start:start + c], codes[i], rows[i], base if has_base else None)
                if pass_no == 0:
                    self._first_pass_checks(rows, base, sumsq, nonfinite)
                out = self._out[:c]
                tm.feed(pass_name, rows, base, out)
                if pass_name == "merge":
                    raw = self._raw[:c * out_dt.itemsize].view(out_dt.storage)
                    encode(out, job.out_dtype, raw)
                    if not plan.recipe.allow_nonfinite:
                        overflow += count_nonfinite(raw, job.out_dtype)
                    self.writer.write(job.name, start * out_dt.itemsize, raw)
                self.progress(job.read_bytes * c // max(n, 1), job.name)
            tm.end_pass(pass_name)
            if pass_no == 0:
                self._refuse_nonfinite(job, nonfinite)
            pass_no += 1
        if overflow:  # inputs are finite here (checked after the first pass): the merge overflowed
            raise IncompatibleModels(
                f"merged tensor '{job.name}' has {overflow} value(s) beyond the range of {job.out_dtype}: "
                "they would be written as Inf/NaN",
                hint="choose a wider --out-dtype (e.g. float32), or lower --lambda or the weights")
        self.progress(job.read_bytes * max(job.passes - pass_no, 0), job.name)  # skipped passes
        stats = tm.stats()
        partials = np.concatenate(sumsq, axis=1) if sumsq else np.zeros((nm, 0))
        for i, m in enumerate(stats["models"]):
            m["l2"] = math.sqrt(math.fsum(partials[i].tolist()))  # exact sum of a fixed block grid
        stats["numel"] = n
        stats["passes"] = pass_no  # over the inputs: TIES skips its low-bits pass when it can
        if nonfinite.any():  # only with --allow-nonfinite (else refused above): the report notes it
            stats["nonfinite"] = [int(x) for x in nonfinite]  # [base, model 1, ...]
        self.stats[job.name] = stats

    def _first_pass_checks(self, rows, base, sumsq, nonfinite) -> None:
        """Delta norms (on the fixed block grid) and NaN/Inf counts, once per tensor."""
        select = kernels.load("select")
        part = np.empty((rows.shape[0], -(-rows.shape[1] // BLOCK)), np.float64)
        select.block_stats(rows, BLOCK, part, nonfinite[1:])
        sumsq.append(part)
        if base.size:
            select.block_stats(base.reshape(1, -1), BLOCK, _NO_SUMS, nonfinite[:1])  # NaN/Inf count only

    def _refuse_nonfinite(self, job: TensorJob, nonfinite: np.ndarray) -> None:
        if not nonfinite.any() or self.plan.recipe.allow_nonfinite:
            return
        plan = self.plan
        if nonfinite[0]:
            who, count = f"base '{plan.base.label}'", nonfinite[0]
        else:
            i = int(np.flatnonzero(nonfinite[1:])[0])
            who, count = f"model {i + 1} '{plan.models[i].label}'", nonfinite[1 + i]
        raise IncompatibleModels(
            f"{who} tensor '{job.name}' has {count} NaN/Inf value(s)"
            + ("" if nonfinite[0] else " (in the weights or their difference from the base)"),
            hint="a broken fine-tune poisons the merge; pass --allow-nonfinite to merge anyway")

    def _release(self, job: TensorJob) -> None:
        """Drop the finished tensor's input pages so resident memory does not grow with the model."""
        refs = ([job.base] if job.base else []) + list(job.models)
        for ref in refs:
            ref.file.advise(job.name, "dontneed")

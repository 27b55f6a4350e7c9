"""The memory budget: parsing --max-memory, its default, and the span size that keeps
every merged tensor's working memory within it."""

from __future__ import annotations

import math
import os

from . import constants
from .errors import BudgetError, RecipeError
from .span_inputs import SpanInputs
from .units import human_bytes


def parse_size(text: str | int | None) -> int | None:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise RecipeError(f"invalid size '{text}'", hint="use e.g. 512MiB, 2GiB, 5GB")
    return int(value * units[unit])


def default_budget() -> int:
    """A quarter of available RAM, capped: leaves room for the page cache that feeds the merge."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(constants.DEFAULT_MEMORY_CAP, max(256 << 20, avail * constants.DEFAULT_MEMORY_FRACTION)))


def kernel_bytes(n_models: int, threads: int) -> int:
    """Per-thread block buffers of the span kernels: decoded rows and base (the kernel's and
    the engine's check pass), weighted deltas, and 10 float32-equivalents of intermediates
    per element (kernels/family.py Scratch: 8 * models + 49 bytes per element)."""
    return threads * (3 * n_models + 12) * constants.BLOCK * 4


def output_bytes(span: int) -> int:
    """The engine's output buffers, shared by all tensors (two, up to 8 bytes per element)."""
    return 16 * span


def job_bytes(job, span: int, threads: int) -> int:
    """Working memory of one merged tensor at this span size, beyond the shared output buffer."""
    driver = job.driver
    checks = len(job.models) * -(-job.numel // constants.BLOCK) * 8
    # computed sources' own scratch (LoRA B @ A) over the whole rows a span touches
    sources = sum(s.work_bytes(span + 2 * driver.whole_rows) for s in job.sources)
    return (SpanInputs.buffer_bytes(job.base, job.models, span, driver.whole_rows) + driver.work_bytes(span)
            + kernel_bytes(len(job.models), threads) + checks + sources)


def choose_span(jobs: list, budget: int, threads: int) -> tuple[int, int]:
    """The largest span (a multiple of BLOCK, at most MAX_SPAN_ELEMENTS) with which every
    merged tensor fits the budget; and the bytes allocated at the worst tensor."""
    merged = [j for j in jobs if not j.copy]
    block = constants.BLOCK
    largest = max((j.numel for j in merged), default=1)
    span = min(constants.MAX_SPAN_ELEMENTS, -(-max(largest, 1) // block) * block)
    while True:
        need = max((output_bytes(span) + job_bytes(j, min(span, -(-j.numel // block) * block), threads)
                    for j in merged), default=output_bytes(span))
        if need <= budget or span <= block:
            break
        span = max(block, (span // 2) // block * block)
    if need > budget:
        worst = max(merged, key=lambda j: job_bytes(j, block, threads))
        raise BudgetError(f"--max-memory {human_bytes(budget, binary=True)} is too small to merge tensor '{worst.name}' "
                          f"of {len(worst.models)} model(s)",
                          hint=f"allow at least {math.ceil(need / 2**20)} MiB")
    return span, need


def grant_caches(jobs: list, budget: int, threads: int, span: int) -> int:
    """Grant optional caches where the budget has room: computed sources of a tensor in
    several spans compute it whole, once (a LoRA source then computes B @ A once, not once
    per pass, and the engine reads it in place; a tensor in one span stays in the engine's
    buffer anyway), and drivers keep what saves them work (Driver.cache_bytes). Return the
    bytes allocated at the worst tensor, caches included. `span`: the plan's (the shared
    output buffer's); jobs carry their own."""
    worst = 0
    for job in jobs:
        if job.copy:
            continue
        need = output_bytes(span) + job_bytes(job, job.span, threads)
        if job.passes > 1 and job.span < job.numel:  # one span: the engine keeps it (SpanInputs)
            for src in job.sources:
                if 0 < src.cache_bytes <= budget - need:
                    src.enable_cache(job.span)
                    need += src.cache_bytes
        extra = job.driver.cache_bytes
        if 0 < extra <= budget - need:
            job.driver.cache = True
            need += extra
        worst = max(worst, need)
    return worst

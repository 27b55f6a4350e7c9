"""One in-memory tensor merged exactly as a real merge merges it: the same TensorJob
(its driver built by TensorJob.with_driver), the same Engine, spans and kernels, with a
writer that keeps the output in memory. For `npmerge warmup` (compiling every kernel on
tiny tensors) and the tests (inputs and span grids a model would not give)."""

from __future__ import annotations

import numpy as np

from .constants import BLOCK
from .dtypes import DTYPES, ITEMSIZE
from .engine import Engine
from .io.sources import ArraySource
from .methods import registry
from .plan import TensorJob


class _Collect:
    """A writer stand-in that keeps one tensor's output bytes in memory."""

    def __init__(self, nbytes: int):
        self.data = np.zeros(nbytes, np.uint8)

    def write(self, name: str, offset: int, data) -> None:
        chunk = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
        self.data[offset:offset + chunk.size] = chunk


def run_arrays(method: str, base, models, params: dict, model_params: list[dict], *, dtype: str = "F32",
               model_dtype: str | None = None, out_dtype: str = "F32", shape=None, name: str = "tensor",
               span: int | None = None, threads: int | None = None, allow_nonfinite: bool = False,
               input_round: str | None = None, block: int = BLOCK, driver: bool = False, driver_cache: bool = False):
    """Merge one tensor: inputs are raw storage arrays of `dtype` (float32 for F32, uint16
    bit patterns for BF16/F16, ...; the models of `model_dtype` if given); returns the
    output's raw storage array (shaped) and the tensor's statistics (and the finished
    driver, buffers kept, if `driver`). `span` must be a multiple of `block`;
    `driver_cache` grants the driver's optional cache as the budget would."""
    m = registry.get(method)
    shape = tuple(shape) if shape is not None else tuple(np.shape(models[0]))
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    g, mp = m.resolve(dict(params), [dict(p) for p in model_params], cross_check=False)
    b = ArraySource(base, dtype, shape, "base", name) if base is not None else None
    srcs = tuple(ArraySource(x, model_dtype or dtype, shape, f"model {i + 1}", name) for i, x in enumerate(models))
    span = span or max(block, -(-numel // block) * block)
    if span % block:
        raise ValueError(f"span {span} is not a multiple of block {block}")
    writer = _Collect(numel * ITEMSIZE[out_dtype])
    engine = Engine(writer, threads=threads, span=span, allow_nonfinite=allow_nonfinite)
    try:
        job = TensorJob(name, shape, numel, out_dtype, False, m, b, srcs, g, tuple(mp), 1, span,
                        input_round=input_round, stream_index=tuple(range(len(srcs)))).with_driver(engine.threads)
        job.driver.cache = driver_cache
        stats = engine.run_driver(job, block)
    finally:
        engine.close()
    out = writer.data.view(DTYPES[out_dtype].storage).reshape(shape)
    return (out, stats, job.driver) if driver else (out, stats)

"""A merge's first use of the kernels, compiled on two cores instead of one.

A cold start (no compiled kernels in the cache) is mostly numba compiling: a TIES merge
compiles its histogram kernel, then its merge kernel, one after the other. Kernels do
not depend on the tensor's dtypes or size (kernels/span.py), so while the merge compiles
and runs its first pass, a helper process compiles the kernels of its later passes into
the shared cache: it builds the method's driver for a tiny tensor and feeds it an empty
span for each later pass (an empty span calls each kernel once on nothing). Before its
second pass the merge waits for the helper, then loads those kernels from the cache.

The helper is forked where the platform can (it starts compiling at once, with numba
already imported), else started as `python -m npmerge.precompile`.

Nothing depends on the helper: if it fails, is killed or is slow, the merge compiles what
it still needs itself, to the same bytes. It is not started when every later kernel is
already cached or when the merge runs on one thread (--threads 1).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

HELPER_TIMEOUT = 120  # seconds the merge waits for the helper at most


class Precompiler:
    """The helper process of one merge (or nothing to wait for): a Popen, or a forked pid."""

    def __init__(self, proc: subprocess.Popen | int | None = None):
        self.proc = proc

    def wait(self) -> None:
        """Wait until the helper finished (its kernels are then in the cache)."""
        if isinstance(self.proc, int):
            deadline = time.monotonic() + HELPER_TIMEOUT
            while os.waitpid(self.proc, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.proc, signal.SIGKILL)
                    os.waitpid(self.proc, 0)
                    break
                time.sleep(0.005)
        elif self.proc is not None:
            try:
                self.proc.wait(timeout=HELPER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def start(job, threads: int) -> Precompiler:
    """Start compiling the kernels of `job`'s later passes, if that pays (module docstring)."""
    from . import kernels

    if threads < 2:
        return Precompiler()
    later = _later_kernels(job.driver)
    if not later or all(kernels.is_cached(name) for name in later):
        return Precompiler()
    spec = {"method": job.method.name, "params": job.params, "model_params": job.model_params,
            "shape": job.shape, "has_base": job.base is not None, "base_dtype": job.base.dtype if job.base else None,
            "model_dtype": job.models[0].dtype, "out_dtype": job.out_dtype}
    if hasattr(os, "fork"):
        codecs = kernels.load("codecs")  # the merge needs them first anyway: not compiled twice
        for dtype in {spec["base_dtype"], spec["model_dtype"], "F32"}:
            codecs.decoder(dtype)
        codecs.encoder(spec["out_dtype"]), codecs.encoder(None), codecs.rounder(job.input_round)
        return Precompiler(_fork(spec))
    try:
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        proc.stdin.write(pickle.dumps(spec))
        proc.stdin.close()
    except OSError:
        return Precompiler()
    return Precompiler(proc)


def _fork(spec: dict) -> int:
    """The helper as a child of this process (numba imported, nothing to start up)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never returns to the merge
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the merge; the merge stops this
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        compile_later_passes(spec)
        code = 0
    finally:
        os._exit(code)


def _later_kernels(driver) -> list[str]:
    """The kernels of the driver's passes after the first, other than the first's."""
    first = driver.kernel_for(driver.passes[0])
    later = [driver.kernel_for(p) for p in driver.passes[1:]]
    return [k for k in dict.fromkeys(later) if k and k != first]


def compile_later_passes(spec: dict) -> None:
    """In the helper: the method's driver for a tiny tensor of the same dtypes and
    parameters, fed an empty span for each pass whose kernel the first pass does not use."""
    import numpy as np

    from . import kernels
    from .dtypes import DTYPES
    from .span_inputs import SpanInputs
    from .io.sources import ArraySource
    from .methods import registry
    from .methods.protocol import TensorContext
    from .workers import Workers

    method = registry.get(spec["method"])
    shape = tuple(spec["shape"]) if len(spec["shape"]) >= 2 else (2, 8)
    shape = (2, shape[-1] if shape[-1] <= 64 else 8)
    numel = shape[0] * shape[1]
    nm = len(spec["model_params"])
    ctx = TensorContext("precompile", shape, numel, spec["params"], tuple(spec["model_params"]), spec["has_base"], 1,
                        tuple(range(nm)))
    driver = method.driver(ctx)

    def source(dtype):
        return ArraySource(np.zeros(numel, DTYPES[dtype].storage), dtype, shape)

    base = source(spec["base_dtype"]) if spec["has_base"] else None
    inputs = SpanInputs(base, tuple(source(spec["model_dtype"]) for _ in range(nm)), numel, None,
                        rows=driver.whole_rows)
    span = inputs.span(0, 0, Workers(1))
    out = np.zeros(8 * numel, np.uint8)
    span.out = (kernels.load("codecs").encoder(spec["out_dtype"]), out.ctypes.data)
    done = {driver.kernel_for(driver.passes[0])}
    for pass_name in list(driver.passes[1:]):
        name = driver.kernel_for(pass_name)
        if name and name not in done:
            driver.feed(pass_name, span)
            done.add(name)


if __name__ == "__main__":
    compile_later_passes(pickle.loads(sys.stdin.buffer.read()))

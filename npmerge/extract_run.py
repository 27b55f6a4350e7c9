"""Running an extraction planned by extract.py.

Modules in parallel on `threads` Python threads, as many at once as the budget holds,
each SVD on a single-threaded BLAS (blas.py): the adapter's bytes do not depend on
threads or budget. Factors are rounded once to the output dtype and spilled to an
unlinked temporary file beside the output (their ranks, hence the file layout, are
known only at the end); then adapter_model.safetensors is written into staging with the
tensors saved whole (read again from FT), with adapter_config.json, README.md and
extract_report.json, and renamed into place (io/staging.py; nothing is kept for a
resume: an interrupted or failed run leaves nothing). Nothing holds more than one
module per thread.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, blas, lowrank
from .dtypes import DTYPES, decode, encode, encode_f64
from .errors import IncompatibleModels
from .extract import CHUNK, ExtractPlan, Item, bound_layout, layout
from .io.lora import CONFIG_NAME
from .io.lora_write import adapter_card, adapter_config, config_bytes, lowrank_keys, whole_key
from .io.models import fingerprints, source
from .io.staging import pwrite_all, sha256_file, writing
from .io.shards import OutputTensor
from .io.writer import OutputWriter
from .report import model_ref, public_name, public_notes, report_json

REPORT_NAME = "extract_report.json"
CARD_NAME = "README.md"


@dataclass
class _Result:
    item: Item
    changed: bool
    rank: int = 0
    spill: tuple[int, int, int] = (0, 0, 0)  # offset, bytes of A, bytes of B
    norm: float = 0.0
    energy: float = 1.0
    optimal_error: float = 0.0
    error: float = 0.0


class _Spill:
    """Encoded factors, appended as modules finish, in an unlinked file beside the output."""

    def __init__(self, where: Path):
        self.where = where / ".npmerge-extract-spill"  # for messages: the file has no name
        with writing(self.where):
            self.file = tempfile.TemporaryFile(dir=where, prefix=".npmerge-extract-")
        self.end = 0
        self.lock = threading.Lock()

    def append(self, *arrays: np.ndarray) -> int:
        data = b"".join(a.tobytes() for a in arrays)
        with self.lock:
            at, self.end = self.end, self.end + len(data)
        pwrite_all(self.file.fileno(), memoryview(data), at, self.where)
        return at

    def read(self, at: int, n: int) -> bytes:
        return os.pread(self.file.fileno(), n, at)

    def close(self) -> None:
        self.file.close()


class _Gate:
    """Admits work while the budget has room for it (each item fits alone: extract._check_budget)."""

    def __init__(self, budget: int):
        self.budget = self.free = budget
        self.cond = threading.Condition()

    def run(self, need: int, work: Callable):
        need = min(need, self.budget)
        with self.cond:
            self.cond.wait_for(lambda: self.free >= need)
            self.free -= need
        try:
            return work()
        finally:
            with self.cond:
                self.free += need
                self.cond.notify_all()


def _values(plan: ExtractPlan, name: str, start: int, n: int, out: np.ndarray, scratch: np.ndarray,
            delta: bool) -> None:
    """out[:n] = FT − BASE (delta) or FT values, float32, of flat elements start..start+n-1."""
    ft = source(plan.ft, name)
    ft.read(start, n, out)
    if ft.is_delta and not delta:  # a bare adapter: FT = fl32(BASE + Δ), as a merge computes it
        source(plan.base, name).read(start, n, scratch)
        out[:n] += scratch[:n]
    elif delta and not ft.is_delta:
        source(plan.base, name).read(start, n, scratch)
        out[:n] -= scratch[:n]


def _release(plan: ExtractPlan, name: str) -> None:
    for model in plan.inputs:
        source(model, name).release()


def _extract(plan: ExtractPlan, item: Item, spill: _Spill) -> _Result:
    if not item.lowrank:
        return _Result(item, _whole_changed(plan, item))
    m, n = item.shape
    delta = np.empty((m, n), np.float64)
    flat = delta.reshape(-1)
    buf, scratch = np.empty(min(CHUNK, m * n), np.float32), np.empty(min(CHUNK, m * n), np.float32)
    for start in range(0, m * n, CHUNK):
        k = min(CHUNK, m * n - start)
        _values(plan, item.name, start, k, buf, scratch, delta=True)
        flat[start:start + k] = buf[:k]
    _release(plan, item.name)
    if not np.isfinite(delta).all():
        raise IncompatibleModels(f"tensor '{item.name}' has NaN or Inf values in the base or the fine-tune",
                                 hint="a task vector with NaN/Inf has no SVD; check the checkpoints")
    if not delta.any():
        return _Result(item, False)
    o = plan.options
    try:
        f = lowrank.factorise(delta, item.max_rank(o.rank), sv_epsilon=o.sv_epsilon, rank_energy=o.rank_energy,
                              distribute=o.distribute_scale, transposed=item.transposed)
    except np.linalg.LinAlgError as exc:
        raise IncompatibleModels(f"the SVD of tensor '{item.name}' failed: {exc}") from None
    if f.rank == 0:
        return _Result(item, True, norm=f.norm, energy=0.0, optimal_error=1.0, error=1.0)
    raw_a, raw_b = _encoded(f.a, plan.out_dtype), _encoded(f.b, plan.out_dtype)
    error = lowrank.relative_error(delta, _decoded(raw_b, plan.out_dtype, f.b.shape),
                                   _decoded(raw_a, plan.out_dtype, f.a.shape), item.transposed)
    at = spill.append(raw_a, raw_b)
    return _Result(item, True, f.rank, (at, raw_a.nbytes, raw_b.nbytes), f.norm, f.energy, f.optimal_error, error)


def _encoded(x: np.ndarray, code: str) -> np.ndarray:
    raw = np.empty(x.size, DTYPES[code].storage)
    encode_f64(x.reshape(-1), code, raw)
    return raw


def _decoded(raw: np.ndarray, code: str, shape) -> np.ndarray:
    if code == "F64":
        return raw.view(np.float64).reshape(shape)
    values = np.empty(raw.size, np.float32)
    decode(raw, code, values)
    return values.astype(np.float64).reshape(shape)


def _whole_changed(plan: ExtractPlan, item: Item) -> bool:
    """Whether FT differs from BASE anywhere in the tensor (NaN counts as a change)."""
    numel = math.prod(item.shape)
    size = min(CHUNK, max(numel, 1))
    buf, scratch = np.empty(size, np.float32), np.empty(size, np.float32)
    try:
        for start in range(0, numel, CHUNK):  # x − y = 0 exactly when x = y (IEEE, with subnormals)
            k = min(CHUNK, numel - start)
            _values(plan, item.name, start, k, buf, scratch, delta=True)
            if buf[:k].any():
                return True
        return False
    finally:
        _release(plan, item.name)


def _write_whole(plan: ExtractPlan, item: Item, key: str, writer: OutputWriter) -> None:
    """FT's tensor, rounded once to the output dtype, streamed into the adapter."""
    numel = math.prod(item.shape)
    size = min(CHUNK, max(numel, 1))
    buf, scratch = np.empty(size, np.float32), np.empty(size, np.float32)
    raw = np.empty(size, DTYPES[plan.out_dtype].storage)
    itemsize = DTYPES[plan.out_dtype].itemsize
    for start in range(0, numel, CHUNK):
        k = min(CHUNK, numel - start)
        _values(plan, item.name, start, k, buf, scratch, delta=False)
        encode(buf[:k], plan.out_dtype, raw[:k])
        writer.write(key, start * itemsize, raw[:k])
    _release(plan, item.name)


def execute(plan: ExtractPlan, out, *, force: bool = False, progress: Callable[[int, str], None] | None = None) -> dict:
    """Run the plan into directory `out`; return the report (also written as extract_report.json)."""
    out = Path(out)
    # the output checks again before the long part (a library caller may plan without `out`)
    check = OutputWriter(out, bound_layout(plan), inputs=plan.input_paths(), force=force).preflight()
    spill = _Spill(check.out.parent)
    try:
        results = _compute(plan, spill, progress)
        return _write(plan, out, force, results, spill)
    finally:
        spill.close()


def _first_use(plan: ExtractPlan) -> None:
    """Run every kernel the workers will run once, in this thread: numba kernels load on first
    use, and a first use from two threads at once can deadlock (Python's import lock against
    numba's compiler lock; seen under load)."""
    one, scratch = np.empty(1, np.float32), np.empty(1, np.float32)
    for item in plan.items:
        if math.prod(item.shape):
            _values(plan, item.name, 0, 1, one, scratch, delta=True)
            _values(plan, item.name, 0, 1, one, scratch, delta=False)
    _decoded(_encoded(np.zeros(1), plan.out_dtype), plan.out_dtype, (1,))
    encode(one, plan.out_dtype, np.empty(1, DTYPES[plan.out_dtype].storage))


def _compute(plan: ExtractPlan, spill: _Spill, progress) -> list[_Result]:
    gate = _Gate(plan.budget)
    _first_use(plan)

    def one(item: Item) -> _Result:
        result = gate.run(item.need, lambda: _extract(plan, item, spill))
        if progress is not None:
            progress(item.read_bytes, item.name)
        return result

    with blas.one_thread():
        if plan.threads == 1:
            return [one(i) for i in plan.items]
        with ThreadPoolExecutor(plan.threads, thread_name_prefix="npmerge-extract") as pool:
            futures = [pool.submit(one, i) for i in plan.items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _write(plan: ExtractPlan, out: Path, force: bool, results: list[_Result], spill: _Spill) -> dict:
    lowranked = [r for r in results if r.rank > 0]
    if not lowranked:
        changed = [r.item.name for r in results if r.changed]
        raise IncompatibleModels(
            f"nothing to extract: no selected 2-D weight of '{plan.ft.label}' differs from the base"
            + (f" by a singular value above --sv-epsilon {plan.options.sv_epsilon}" if changed else ""),
            hint="check the models (a fine-tune of this base?) and --include/--exclude/--sv-epsilon")
    ranks = {r.item.module: r.rank for r in lowranked}
    whole = [r for r in results if not r.item.lowrank and r.changed]
    tensors, keys = [], {}
    for r in lowranked:
        m, n = r.item.shape
        a, b = lowrank_keys(r.item.module, r.item.embedding)
        rows, cols = (n, m) if r.item.transposed else (m, n)
        tensors += [OutputTensor(a, plan.out_dtype, (r.rank, cols)), OutputTensor(b, plan.out_dtype, (rows, r.rank))]
    for r in whole:
        keys[r.item.name] = whole_key(r.item.name, r.item.module in ranks)
        tensors.append(OutputTensor(keys[r.item.name], plan.out_dtype, r.item.shape))
    base_ref, ft_ref = model_ref(plan.base), model_ref(plan.ft)
    saved = sorted({r.item.module or r.item.name for r in whole if r.item.module not in ranks})
    config = adapter_config(
        public_name(base_ref), ranks, saved,
        layer_bias=any(r.item.module in ranks for r in whole),
        fan_in_fan_out=any(r.item.what == "conv1d" for r in lowranked), task_type=_task_type(plan.base))
    planned = layout(tensors)
    fingerprint = {"inputs": [e for m in plan.inputs for e in fingerprints(m)]}
    with OutputWriter(out, planned, inputs=plan.input_paths(), force=force, fingerprint=fingerprint,
                      resumable=False) as writer:
        writer.open()
        for r in lowranked:
            at, na, nb = r.spill
            a, b = lowrank_keys(r.item.module, r.item.embedding)
            for key, start, size in ((a, at, na), (b, at + na, nb)):
                for piece in range(0, size, CHUNK):
                    writer.write(key, piece, spill.read(start + piece, min(CHUNK, size - piece)))
        for r in whole:
            _write_whole(plan, r.item, keys[r.item.name], writer)
        report = _report(plan, results, keys)
        writer.add_bytes(CONFIG_NAME, config_bytes(config))
        writer.add_bytes(CARD_NAME, adapter_card(base_ref, ft_ref, config, report["totals"]).encode())
        writer.finish_shards()
        report["files"] = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                           for p in sorted(writer.staging_dir.iterdir())
                           if p.is_file() and p.name not in writer.private_files}
        writer.add_bytes(REPORT_NAME, report_json(report))
        writer.commit()
    return report


def _task_type(base) -> str | None:
    archs = (base.config or {}).get("architectures") if isinstance(base.config, dict) else None
    return "CAUSAL_LM" if isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs) else None


def _report(plan: ExtractPlan, results: list[_Result], keys: dict[str, str]) -> dict:
    """Deterministic (no times, threads or memory figures), like merge_report.json."""
    modules, whole, skipped = {}, {}, {k: list(v) for k, v in plan.skipped.items()}
    norm2 = kept2 = err2 = 0.0
    for r in results:
        i = r.item
        if not r.changed:
            skipped.setdefault("unchanged", []).append(i.name)
        elif not i.lowrank:
            whole[i.name] = {"key": keys[i.name], "kind": i.what}
        elif r.rank == 0:
            skipped.setdefault("below --sv-epsilon", []).append(i.name)
        else:
            norm2 += r.norm ** 2
            kept2 += r.energy * r.norm ** 2
            err2 += (r.error * r.norm) ** 2
            modules[i.module] = {"tensor": i.name, "kind": i.what, "shape": list(i.shape), "rank": r.rank,
                                 "energy": r.energy, "error": r.error, "optimal_error": r.optimal_error,
                                 "norm": r.norm}
    params = sum(v["rank"] * sum(v["shape"]) for v in modules.values())
    base_ref, ft_ref = model_ref(plan.base), model_ref(plan.ft)
    return {
        "npmerge_version": __version__,
        "base": {**base_ref.as_record(), "name": public_name(base_ref)},
        "fine_tune": {**ft_ref.as_record(), "name": public_name(ft_ref)},
        "parameters": {**plan.options.record(), "out_dtype": plan.out_dtype},
        "decomposition": "exact truncated SVD (LAPACK gesdd, float64, single-threaded BLAS)",
        "totals": {"lowrank": len(modules), "whole": len(whole), "adapter_parameters": params,
                   "energy": kept2 / norm2 if norm2 else 1.0, "error": math.sqrt(err2 / norm2) if norm2 else 0.0},
        "modules": modules,
        "saved_whole": whole,
        "skipped": skipped,
        "notes": public_notes(plan, plan.notes),
    }


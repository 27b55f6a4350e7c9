"""`npmerge extract-lora BASE FT -o ADAPTER`: a PEFT LoRA adapter from a full fine-tune.

Plan (everything from headers, nothing written): open BASE and FT as a merge does
(io/models.py: paths, Hub ids, MODEL+ADAPTER), check FT has the base's tensors and
shapes, sort each selected tensor into a low-rank module (a 2-D weight; the input
embedding and the head only with --embed-lora) or a tensor saved whole (embeddings and
head by default, norms, biases, anything else that changed), give each low-rank module
the memory of its exact SVD (lowrank.svd_bytes) and refuse one that does not fit
`--max-memory`, and run the output checks of a merge (io/writer.py preflight).

Run: modules in parallel on `threads` Python threads, as many at once as the budget
holds, each SVD on a single-threaded BLAS (blas.py): the adapter's bytes do not depend
on threads or budget. Factors are rounded once to the output dtype and spilled to an
unlinked temporary file beside the output (their ranks, hence the file layout, are
known only at the end); then adapter_model.safetensors is written into staging with
the tensors saved whole (read again from FT), with adapter_config.json, README.md and
extract_report.json, and renamed into place (io/staging.py). Nothing holds more than
one module per thread.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, blas, lowrank
from .budget import default_budget, parse_size
from .dtypes import DTYPES, ENCODABLE, decode, encode, encode_f64, parse_user_dtype
from .errors import BudgetError, IncompatibleModels, RecipeError
from .io.adapted import AdaptedModel
from .io.layout import HEAD_NAMES, embedding_name, is_buffer
from .io.lora import CONFIG_NAME, CONV1D_MODULES, WEIGHTS_NAME
from .io.lora_write import RESERVED_SEGMENTS, adapter_card, adapter_config, config_bytes, lowrank_keys, whole_key
from .io.models import fingerprints, open_model, source
from .io.staging import pwrite_all, sha256_file, writing
from .io.writer import OutputCheck, OutputTensor, OutputWriter, plan_shards
from .report import model_ref, public_name, report_json
from .units import human_bytes

CHUNK = 1 << 20  # elements per read of an input tensor
REPORT_NAME = "extract_report.json"
CARD_NAME = "README.md"
DEFAULT_RANK = 128  # mergekit-extract-lora's --max-rank default


@dataclass(frozen=True)
class Options:
    """What to extract (the CLI's options; see `npmerge extract-lora --help`)."""

    rank: int = DEFAULT_RANK
    sv_epsilon: float = 0.0
    rank_energy: float | None = None
    distribute_scale: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embed_lora: bool = False
    skip_undecomposable: bool = False
    out_dtype: str | None = None

    def check(self) -> None:
        if type(self.rank) is not int or self.rank < 1:
            raise RecipeError(f"--rank must be a positive integer, got {self.rank!r}",
                              hint="e.g. --rank 64 (mergekit's default is 128)")
        if not (math.isfinite(self.sv_epsilon) and self.sv_epsilon >= 0):
            raise RecipeError(f"--sv-epsilon must be a number >= 0, got {self.sv_epsilon!r}",
                              hint="singular values at or below it are dropped; 0 (the default) keeps them all")
        if self.rank_energy is not None and not (0 < self.rank_energy <= 1):
            raise RecipeError(f"--rank-energy must be in (0, 1], got {self.rank_energy!r}",
                              hint="the fraction of each module's squared Frobenius norm to keep, e.g. 0.9")
        for flag, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as exc:
                    raise RecipeError(f"{flag} {p!r} is not a valid regular expression: {exc}",
                                      hint="a Python regular expression, searched in each module name "
                                           "(e.g. --include 'self_attn' --exclude 'layers\\.0\\.')") from None

    def selects(self, module: str) -> bool:
        """mergekit's rule: re.search of each pattern on the module name."""
        if self.include and not any(re.search(p, module) for p in self.include):
            return False
        return not any(re.search(p, module) for p in self.exclude)

    def record(self) -> dict:
        return {"rank": self.rank, "sv_epsilon": self.sv_epsilon, "rank_energy": self.rank_energy,
                "distribute_scale": self.distribute_scale, "include": list(self.include),
                "exclude": list(self.exclude), "embed_lora": self.embed_lora,
                "skip_undecomposable": self.skip_undecomposable}


@dataclass(frozen=True)
class Item:
    """One selected base tensor: a low-rank module's weight, or a tensor saved whole if changed."""

    name: str
    module: str
    shape: tuple[int, ...]
    lowrank: bool
    what: str  # linear, conv1d, embedding, head; whole: embedding, head, norm/bias, undecomposable
    need: int  # working bytes
    read_bytes: int  # bytes of BASE + FT read

    @property
    def transposed(self) -> bool:
        """PEFT stores (B·A)ᵀ for embedding LoRA and Conv1D layers."""
        return self.lowrank and self.what in ("embedding", "conv1d")

    @property
    def embedding(self) -> bool:
        return self.lowrank and self.what == "embedding"

    def max_rank(self, rank: int) -> int:
        return min(rank, *self.shape)


@dataclass
class ExtractPlan:
    base: object
    ft: object
    options: Options
    items: list[Item]
    out_dtype: str
    budget: int
    threads: int
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # why -> tensors left out at plan time
    output: OutputCheck | None = None

    @property
    def total_work(self) -> int:
        return sum(i.read_bytes for i in self.items)

    @property
    def inputs(self) -> list:
        return [self.base, self.ft]

    def input_paths(self) -> list[Path]:
        paths = [Path(self.base.path), Path(self.ft.path)]
        on = getattr(self.ft, "on", None)
        return paths + ([Path(on.path)] if on is not None and on is not self.base else [])

    def as_dict(self, out) -> dict:
        """The plan as --dry-run shows it (models as the user named them)."""
        return {"base": model_ref(self.base).name, "fine_tune": model_ref(self.ft).name, "out": str(out),
                "out_dtype": self.out_dtype, "threads": self.threads, "max_memory": self.budget,
                "parameters": self.options.record(),
                "tensors": [{"tensor": i.name, "module": i.module, "shape": list(i.shape),
                             "lowrank": i.lowrank, "kind": i.what,
                             "max_rank": i.max_rank(self.options.rank) if i.lowrank else None,
                             "memory": i.need} for i in self.items],
                "skipped": self.skipped, "notes": self.notes}

    def close(self) -> None:
        self.ft.close()
        self.base.close()


# ---------------------------------------------------------------- plan


def plan_extract(base_ref: str, ft_ref: str, options: Options, *, max_memory=None, threads: int | None = None,
                 out=None, force: bool = False) -> ExtractPlan:
    """Open and check both models and lay out the extraction; with `out`, also run every
    check of the output location the real run makes (a plan that builds is a run that starts)."""
    options.check()
    budget = parse_size(max_memory) or default_budget()
    threads = (os.cpu_count() or 1) if threads is None else threads
    if threads < 1:
        raise RecipeError(f"--threads must be >= 1, got {threads}")
    out_dtype = parse_user_dtype(options.out_dtype) if options.out_dtype else None
    base = open_model(base_ref, role="base")
    ft = None
    try:
        ft = open_model(ft_ref, base, role="fine-tune")
        if not isinstance(ft, AdaptedModel) and ft.identity() == base.identity():
            raise RecipeError(f"the fine-tune '{ft_ref}' is the base model itself", hint="give the fine-tuned model")
        _check_tensors(base, ft)
        items, skipped = _items(base, ft, options)
        plan = ExtractPlan(base, ft, options, items, out_dtype or _base_dtype(base, items), budget, threads,
                           skipped=skipped)
        plan.notes += [n for m in (base, ft) for n in (getattr(m, "ref", None) and m.ref.notes or ())]
        plan.notes += list(getattr(ft, "notes", ()))
        if blas.pin_note():
            plan.notes.append(blas.pin_note())
        _check_budget(plan)
        if out is not None:
            plan.output = OutputWriter(Path(out), _bound_layout(plan), inputs=plan.input_paths(),
                                       force=force).preflight()
    except BaseException:
        if ft is not None and ft is not base:
            ft.close()
        base.close()
        raise
    return plan


def _check_tensors(base, ft) -> None:
    """FT holds the base's tensors (buffers aside) with the base's shapes."""
    hint = "extract-lora needs a fine-tune of this base: same architecture and vocabulary size"
    names = {n for n in base.tensors if not is_buffer(n)}
    theirs = {n for n in ft.tensors if not is_buffer(n)}
    for what, diff in (("lacks", sorted(names - theirs)), ("has", sorted(theirs - names))):
        if diff:
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            where = "the base's tensor" if what == "lacks" else "tensor"
            tail = "" if what == "lacks" else ", which the base lacks"
            raise IncompatibleModels(f"the fine-tune '{ft.label}' {what} {where} '{diff[0]}'{tail}{more}", hint=hint)
    for name in sorted(names):
        a, b = tuple(base.tensors[name].info.shape), tuple(ft.tensors[name].info.shape)
        if a != b:
            raise IncompatibleModels(f"tensor '{name}' is {list(b)} in the fine-tune '{ft.label}' but {list(a)} in "
                                     f"the base '{base.label}'", hint=hint)


def _items(base, ft, options: Options) -> tuple[list[Item], dict[str, list[str]]]:
    """Sort the base's float tensors into low-rank modules and tensors saved whole."""
    names = [n for n in base.tensors if not is_buffer(n) and base.tensors[n].info.dtype.is_float]
    embed = embedding_name(names)
    model_type = (base.config or {}).get("model_type") if isinstance(base.config, dict) else None
    conv1d = CONV1D_MODULES.get(model_type, ()) if isinstance(model_type, str) else ()
    found: list[tuple[str, str, tuple, bool, str]] = []
    skipped: dict[str, list[str]] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        if not options.selects(module or name):
            skipped.setdefault("not selected (--include/--exclude)", []).append(name)
            continue
        clash = RESERVED_SEGMENTS.intersection(name.split("."))
        if clash:
            raise IncompatibleModels(f"tensor '{name}' has a segment PEFT reserves for adapter keys "
                                     f"('{sorted(clash)[0]}'): its adapter keys would be read as something else",
                                     hint="leave it out with --exclude, or rename it in the checkpoints")
        shape = tuple(base.tensors[name].info.shape)
        if name == embed:
            found.append((name, module, shape, options.embed_lora, "embedding"))
        elif len(shape) == 2 and (name in HEAD_NAMES or name == "output.weight"):
            found.append((name, module, shape, options.embed_lora, "head"))
        elif len(shape) == 2 and param == "weight" and module:
            found.append((name, module, shape, True, "conv1d" if module.rsplit(".", 1)[-1] in conv1d else "linear"))
        else:
            found.append((name, module, shape, False, "norm/bias" if len(shape) == 1 else "undecomposable"))
    lowrank_modules = {f[1] for f in found if f[3]}
    items = []
    for name, module, shape, is_lowrank, what in found:
        if (options.skip_undecomposable and not is_lowrank and what in ("norm/bias", "undecomposable")
                and module not in lowrank_modules):
            skipped.setdefault("undecomposable (--skip-undecomposable)", []).append(name)
            continue
        reads = base.tensors[name].info.nbytes + ft.tensors[name].info.nbytes
        items.append(Item(name, module, shape, is_lowrank, what, _need(base, ft, name, shape, is_lowrank, options),
                          reads))
    return items, skipped


def _need(base, ft, name: str, shape: tuple, is_lowrank: bool, options: Options) -> int:
    """Working bytes of one item: input reads (two float32 chunks, the output's encoded chunk and
    what a computed source allocates), and for a module its SVD (Δ included), its factors
    (float64, encoded, decoded to float32 and back to float64) and the error check's blocks."""
    numel = math.prod(shape)
    chunk = min(CHUNK, max(numel, 1))
    reads = 16 * chunk + source(ft, name).work_bytes(chunk)
    if not is_lowrank:
        return reads
    m, n = shape
    r = min(options.rank, m, n)
    return reads + lowrank.svd_bytes(m, n) + 28 * r * (m + n) + 24 * min(m * n, max(n, lowrank.ERROR_ROWS))


def _base_dtype(base, items: list[Item]) -> str:
    """The output dtype by default: the one holding most of the selected base elements."""
    sizes: dict[str, int] = {}
    for i in items:
        code = base.tensors[i.name].info.dtype.name
        sizes[code] = sizes.get(code, 0) + math.prod(i.shape)
    code = max(sorted(sizes), key=sizes.get) if sizes else "F32"
    return code if code in ENCODABLE else "F32"


def _check_budget(plan: ExtractPlan) -> None:
    """Every item fits --max-memory alone, or the plan is refused naming the first that does not."""
    for item in plan.items:
        if item.need > plan.budget:
            m, n = item.shape
            way = ("leave out --embed-lora (embeddings and head are then saved whole)" if item.what in
                   ("embedding", "head") else f"--exclude '{re.escape(item.module)}$' to leave it out")
            raise BudgetError(f"--max-memory {human_bytes(plan.budget, binary=True)} is too small for the exact SVD "
                              f"of module '{item.module}' [{m}, {n}]: it needs {human_bytes(item.need, binary=True)}",
                              hint=f"allow at least {math.ceil(item.need / 2**20)} MiB with --max-memory, or {way}")


def _bound_layout(plan: ExtractPlan):
    """The largest adapter the plan can write (every module at its maximum rank, every
    tensor saved whole): what the output checks (free space) are run against."""
    tensors = []
    for item in plan.items:
        if item.lowrank:
            r = item.max_rank(plan.options.rank)
            m, n = item.shape
            a, b = lowrank_keys(item.module, item.embedding)
            tensors += [OutputTensor(a, plan.out_dtype, (r, m if item.transposed else n)),
                        OutputTensor(b, plan.out_dtype, (n if item.transposed else m, r))]
        else:
            tensors.append(OutputTensor(whole_key(item.name, False), plan.out_dtype, item.shape))
    return _layout(tensors)


def _layout(tensors: list[OutputTensor]):
    return plan_shards(sorted(tensors, key=lambda t: t.name), shard_bytes=1 << 62, single_name=WEIGHTS_NAME)


# ---------------------------------------------------------------- run


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
    """Admits work while the budget has room for it (each item fits alone, see _check_budget)."""

    def __init__(self, budget: int):
        self.free = budget
        self.cond = threading.Condition()

    def run(self, need: int, work: Callable):
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
    check = OutputWriter(out, _bound_layout(plan), inputs=plan.input_paths(), force=force)
    spill = _Spill(check.out_dir.parent)
    try:
        results = _compute(plan, spill, progress)
        return _write(plan, out, force, results, spill)
    finally:
        spill.close()


def _compute(plan: ExtractPlan, spill: _Spill, progress) -> list[_Result]:
    gate = _Gate(plan.budget)

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
    layout = _layout(tensors)
    fingerprint = {"inputs": [e for m in plan.inputs for e in fingerprints(m)]}
    with OutputWriter(out, layout, inputs=plan.input_paths(), force=force, fingerprint=fingerprint,
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
        "notes": plan.notes,
    }


def run_extract(base_ref: str, ft_ref: str, out, options: Options, *, max_memory=None, threads=None,
                force: bool = False, progress=None) -> dict:
    """Plan and execute in one call (the library entry point)."""
    plan = plan_extract(base_ref, ft_ref, options, max_memory=max_memory, threads=threads, out=out, force=force)
    try:
        return execute(plan, out, force=force, progress=progress)
    finally:
        plan.close()


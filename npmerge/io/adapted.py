"""A model with a LoRA adapter applied, as the planner and the engine see it.

`AdaptedModel` is what a bare adapter directory (applied to the merge's base) or
mergekit's `MODEL+ADAPTER` names. It looks like a Checkpoint to the compatibility
checks (its `tensors`, `config` and `root` are those of the model the adapter is
applied to), and gives the engine one tensor source per tensor:

- applied to the merge's base: the task vector tau itself (`is_delta`), so the
  kernels' M - B is tau exactly and task arithmetic of one adapter with weight 1 is
  B + tau; a tensor the adapter does not touch is a ZeroSource (tau = 0, reads
  nothing);
- applied to another model X (`X+ADAPTER` where X is not the merge's base): model
  values fl32(X + tau), and X's own tensor where the adapter does not touch it.

A tensor the adapter replaces whole (modules_to_save, `bias: all`) is the stored
replacement itself, read in place: its values are exact in both roles.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..dtypes import DTYPES
from ..errors import IncompatibleModels
from .lora import CONFIG_NAME, LoraAdapter
from .lora_target import LoraTarget
from .sources import MappedSource, TensorSource, ZeroSource


class AdaptedModel:
    """`adapter` applied to `on` (a Checkpoint or another AdaptedModel).

    `on_base`: `on` is the merge's base, so sources deliver task vectors. `owns_on`:
    close() closes `on` too (a model opened for this reference alone)."""

    def __init__(self, name: str, adapter: LoraAdapter, on, *, on_base: bool, owns_on: bool):
        self.name = name  # the reference as given
        self.ref = None  # its ModelRef (io/models.py sets it)
        self.adapter = adapter
        self.on = on
        self.on_base = on_base
        self.owns_on = owns_on
        self.notes: list[str] = []
        self._check()

    # -- what the plan and the compatibility checks ask a model --------------------
    @property
    def label(self) -> str:
        return self.name

    @property
    def path(self) -> Path:
        return self.adapter.path

    @property
    def root(self):
        return self.on.root

    @property
    def config(self):
        return self.on.config

    @property
    def tensors(self):
        """The tensors of the model the adapter is applied to: same names, shapes, dtypes."""
        return self.on.tensors

    @property
    def files(self) -> dict:
        """The adapter's weights file (and the model's, when opened for this reference)."""
        return {**(self.on.files if self.owns_on else {}), **self.adapter.files}

    def identity(self) -> set[tuple[int, int]]:
        """The adapter's: the same adapter twice is the same model, a model and that
        model with an adapter are not."""
        return self.adapter.identity()

    def fingerprints(self) -> list[dict]:
        """What a resumed run must find unchanged: the adapter's weights and
        adapter_config.json (by content), and the model's files if it is not the base."""
        from .staging import file_fingerprint

        entries = [file_fingerprint(p) for p in self.files]
        config = os.path.realpath(self.adapter.path / CONFIG_NAME)
        st = os.stat(config)
        entries.append({"path": config, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                        "sha256": self.adapter.config_sha256})
        return entries

    def close(self) -> None:
        self.adapter.close()
        if self.owns_on:
            self.on.close()

    # -- plan-time checks ---------------------------------------------------------
    def _check(self) -> None:
        """Shapes (module and both shapes named), targets the model lacks, float
        tensors only: all from headers, before any data is read."""
        model_type = self.on.config.get("model_type") if isinstance(self.on.config, dict) else None
        self.notes += self.adapter.check_against({n: r.info.shape for n, r in self.on.tensors.items()},
                                                 model_type if isinstance(model_type, str) else None)
        for name, t in self.adapter.targets.items():
            dtype = self.on.tensors[name].info.dtype.name
            if not DTYPES[dtype].is_float:
                raise IncompatibleModels(f"adapter '{self.adapter.path}' changes '{name}', which is a {dtype} tensor "
                                         f"in '{self.on.label}'", hint="LoRA adapters change float weights only; "
                                         "the adapter belongs to another model")
        named = self.adapter.base_model_name_or_path
        if named and _names_other_model(named, self.on):
            self.notes.append(f"adapter '{self.adapter.path}' names '{named}' as its base model "
                              f"({CONFIG_NAME}), and is applied to '{self.on.label}': check they are the same model "
                              "(shapes match)")

    # -- tensor sources -----------------------------------------------------------
    def source(self, name: str, on_source: TensorSource) -> TensorSource:
        """Tensor `name` of the adapted model; `on_source` is the same tensor of `on`."""
        t = self.adapter.targets.get(name)
        if t is None:
            return ZeroSource(name, on_source.shape, self.label) if self.on_base else on_source
        if t.full is not None and t.a is None and t.bias is None:
            return MappedSource(t.full, self.label)
        return LoraSource(t, on_source, delta=self.on_base, label=self.label)


def _names_other_model(named: str, model) -> bool:
    """True unless `named` (base_model_name_or_path: a Hub id or a path, maybe from
    another machine) plausibly is `model`: the same directory, the same last path
    component, or the Hub cache folder of that id."""
    path = Path(os.path.expanduser(named))
    where = Path(model.root or model.path)
    try:
        if path.exists() and os.path.samefile(path, where):
            return False
    except OSError:
        pass
    want = named.rstrip("/\\").replace("\\", "/").split("/")[-1].lower()
    parts = {p.lower() for p in Path(os.path.abspath(where)).parts + Path(os.path.realpath(where)).parts}
    hub_folder = "models--" + named.strip("/").replace("/", "--").lower()
    return not (want in parts or hub_folder in parts)


class LoraSource(TensorSource):
    """One tensor an adapter changes by a low-rank product (and maybe a replacement or
    a lora bias), computed per range on request.

    delta=True: the values are tau (LoraTarget.read_delta), against `on`'s values
    where the target needs them. delta=False: model values fl32(X + tau), X read from
    `on`. After enable_cache(chunk) (the plan's budget had room for the whole tensor in
    float32), raw() computes every element once, `chunk` elements at a time, and the
    engine reads that in place in every pass: a multi-pass method computes B @ A once."""

    def __init__(self, target: LoraTarget, on: TensorSource, *, delta: bool, label: str):
        self.target = target
        self.on = on
        self.is_delta = delta
        self.label = label
        self.name = target.name
        self.shape = tuple(target.shape)
        self.dtype = "F32"
        self._needs_on = target.needs_base or not delta
        self._chunk: int | None = None  # set by enable_cache
        self._cache: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        t = self.target
        own = sum(ref.info.nbytes for ref in (t.a, t.b, t.full, t.bias) if ref is not None)
        return own + (self.on.nbytes if self._needs_on else 0)

    def work_bytes(self, n: int) -> int:
        return self.target.work_bytes(n) + ((4 * n + self.on.work_bytes(n)) if self._needs_on else 0)

    @property
    def cache_bytes(self) -> int:
        return 4 * self.numel

    def enable_cache(self, chunk: int) -> None:
        self._chunk = max(1, chunk)

    def raw(self) -> np.ndarray | None:
        if self._chunk is None:
            return None
        if self._cache is None:
            cache = np.empty(self.numel, np.float32)
            for start in range(0, self.numel, self._chunk):
                n = min(self._chunk, self.numel - start)
                self.read(start, n, cache[start:start + n])
            cache.flags.writeable = False
            self._cache = cache
        return self._cache

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        dst = out[:n]
        if self._cache is not None:
            dst[...] = self._cache[start:start + n]
            return
        on = None
        if self._needs_on:
            on = np.empty(n, np.float32)
            self.on.read(start, n, on)
        self.target.read_delta(start, n, dst, on if self.target.needs_base else None)
        if not self.is_delta:
            dst += on  # fl32(tau + X) = fl32(X + tau): one rounding

    def prefetch(self) -> None:
        if self._needs_on:
            self.on.prefetch()

    def release(self) -> None:
        self._cache = None
        self.on.release()

"""A model on disk: one .safetensors file, a directory with model.safetensors, or a
sharded directory with model.safetensors.index.json.

Opening a checkpoint validates every header and the index against the shards
(docs/format-and-safety.md §2) before anything else happens, so a corrupt download
fails in seconds with the file named, never mid-merge.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING

from ..constants import INDEX_NAME, SINGLE_NAME
from ..errors import InvalidCheckpoint
from .safetensors import SafetensorsFile, TensorInfo

if TYPE_CHECKING:
    from .hub import ModelRef

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
OTHER_FORMATS = (".gguf", ".ggml", ".h5", ".msgpack", ".onnx")
_INDEX_HINT = "the index is corrupt; fetch the model again"
_CONVERT_HINT = (
    "npmerge reads safetensors only and never unpickles; convert the model first, e.g. "
    "load it with transformers and save_pretrained(..., safe_serialization=True)"
)


class _Duplicate(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list) -> dict:
    """json object hook: a key given twice (json keeps the last silently) is an error."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of a checkpoint lives."""

    file: SafetensorsFile
    info: TensorInfo


class Checkpoint:
    """A validated model: tensor catalogue (name -> file, dtype, shape, offset) and config."""

    def __init__(self, path: str | os.PathLike, *, ref: ModelRef | None = None):
        self.path = Path(path)
        self.ref = ref  # how the user named it (io/hub.py); None: by its path
        self.files: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorRef] = {}
        self.config: dict | None = None
        self.root: Path | None = None  # model directory, None for a bare file
        self._open()

    @property
    def label(self) -> str:
        """How messages, tables and reports name the model: as the user gave it (a Hub id, or
        a path relative to the working directory), never as a cache snapshot path."""
        return self.ref.name if self.ref is not None else str(self.path)

    # -- opening -----------------------------------------------------------
    def _open(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise InvalidCheckpoint(f"model path '{self.path}' does not exist",
                                    hint="check the path") from None
        except OSError as exc:
            raise InvalidCheckpoint(f"cannot access model path '{self.path}': {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            self.root = self.path
            self._open_dir()
        elif stat.S_ISREG(st.st_mode):
            self._refuse_other_format(self.path)
            self._add_file(self.path)
            for name, info in self.files[str(self.path)].header.tensors.items():
                self.tensors[name] = TensorRef(self.files[str(self.path)], info)
        else:
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise InvalidCheckpoint(f"model path '{self.path}' is {kind}, not a model directory or .safetensors file",
                                    hint="point npmerge at a Hugging Face model directory or a .safetensors file")
        if "" in self.tensors:  # the format allows it; no loader or writer can use it
            raise InvalidCheckpoint(f"invalid tensor name '' (empty) in {self.tensors[''].file.path}",
                                    hint="re-export the model: every tensor needs a name")
        self._sort_tensors()

    @staticmethod
    def _refuse_other_format(path: Path) -> None:
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise InvalidCheckpoint(f"'{path}' is a pickle checkpoint ({suffix}), not safetensors",
                                    hint=_CONVERT_HINT)
        if suffix in OTHER_FORMATS:
            raise InvalidCheckpoint(f"'{path}' is a {suffix[1:].upper()} file, not safetensors",
                                    hint="npmerge merges safetensors checkpoints only")

    def _open_dir(self) -> None:
        root = self.path
        index, single = root / INDEX_NAME, root / SINGLE_NAME
        has_index, has_single = os.path.lexists(index), os.path.lexists(single)  # broken links: say why below
        if has_index and has_single:
            raise InvalidCheckpoint(
                f"ambiguous weights in '{root}': both {SINGLE_NAME} and {INDEX_NAME} exist",
                hint="remove the stale one (transformers would silently load model.safetensors)")
        if has_index:
            self._open_index(index)
        elif has_single:
            self._add_file(single)
            for name, info in self.files[str(single)].header.tensors.items():
                self.tensors[name] = TensorRef(self.files[str(single)], info)
        else:
            names = sorted(os.listdir(root))
            if any(n.lower().endswith(PICKLE_SUFFIXES) for n in names):
                raise InvalidCheckpoint(f"'{root}' holds pickle weights (.bin/.pt), not safetensors",
                                        hint=_CONVERT_HINT)
            if "adapter_model.safetensors" in names:
                raise InvalidCheckpoint(f"'{root}' is a LoRA adapter, not a full model",
                                        hint="merge the adapter into its base model first (peft merge_and_unload)")
            raise InvalidCheckpoint(f"no {SINGLE_NAME} or {INDEX_NAME} in '{root}'",
                                    hint="point npmerge at a Hugging Face model directory or a .safetensors file")
        config = root / "config.json"
        if config.is_file():
            try:
                self.config = json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise InvalidCheckpoint(f"invalid config.json in '{root}': {exc}") from None
            except OSError as exc:
                raise InvalidCheckpoint(f"cannot read config.json in '{root}': {exc.strerror}") from None
            if not isinstance(self.config, dict):
                raise InvalidCheckpoint(f"invalid config.json in '{root}': not a JSON object")

    def _open_index(self, index: Path) -> None:
        where = f"index '{index}'"
        try:
            data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
        except _Duplicate as exc:
            raise InvalidCheckpoint(f"{where} lists '{exc.key}' twice", hint=_INDEX_HINT) from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidCheckpoint(f"{where} is not valid JSON: {exc}", hint=_INDEX_HINT) from None
        except OSError as exc:
            raise InvalidCheckpoint(f"cannot read {where}: {exc.strerror}") from None
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise InvalidCheckpoint(f"{where} has no 'weight_map' object", hint=_INDEX_HINT)
        if "metadata" in data and not isinstance(data["metadata"], dict):
            raise InvalidCheckpoint(f"{where}: 'metadata' must be an object", hint=_INDEX_HINT)
        weight_map = data["weight_map"]
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InvalidCheckpoint(f"{where}: shard of tensor '{name}' is not a file name", hint=_INDEX_HINT)
            self._check_shard_name(index, shard)
        for shard in dict.fromkeys(weight_map.values()):
            self._add_file(self.path / shard, must_stay_in=self.path)
        for name, shard in weight_map.items():
            file = self.files[str(self.path / shard)]
            info = file.header.tensors.get(name)
            if info is None:
                raise InvalidCheckpoint(f"{where} puts tensor '{name}' in '{shard}', which does not contain it",
                                        hint="the download is inconsistent; fetch the model again")
            self.tensors[name] = TensorRef(file, info)
        for file in self.files.values():
            for name in file.header.tensors:
                owner = weight_map.get(name)
                if owner is None:
                    raise InvalidCheckpoint(f"tensor '{name}' of shard '{Path(file.path).name}' is missing from {where}",
                                            hint="the index and shards disagree; fetch the model again")
                if self.path / owner != Path(file.path):
                    raise InvalidCheckpoint(f"tensor '{name}' is in both '{Path(file.path).name}' and '{owner}' "
                                            f"of {where}", hint="the index and shards disagree; fetch the model again")

    @staticmethod
    def _check_shard_name(index: Path, shard: str) -> None:
        pure = PureWindowsPath(shard)
        if (not shard or "/" in shard or "\\" in shard or pure.drive or pure.root or shard in (".", "..")
                or not shard.endswith(".safetensors")):
            raise InvalidCheckpoint(f"unsafe shard path '{shard}' in index '{index}'",
                                    hint="shard names must be plain .safetensors file names in the model directory")

    def _add_file(self, path: Path, must_stay_in: Path | None = None) -> None:
        if str(path) in self.files:
            return
        if os.path.islink(path) and not os.path.exists(path):
            try:
                os.stat(path)
                reason = "cannot be resolved"
            except OSError as exc:
                reason = ("is a symlink loop" if exc.errno == errno.ELOOP
                          else f"is a broken symlink (to '{os.readlink(path)}')")
            raise InvalidCheckpoint(f"weights file '{path}' {reason}",
                                    hint="the model directory is incomplete; fetch the model again")
        if must_stay_in is not None:
            try:
                st = os.lstat(path)
            except OSError as exc:
                raise InvalidCheckpoint(f"shard '{path}' listed in the index cannot be opened: {exc.strerror}",
                                        hint="the download is incomplete; fetch the model again") from None
            real = Path(os.path.realpath(path))
            inside = Path(os.path.realpath(must_stay_in))
            in_hf_cache = "blobs" in real.parts  # HF hub cache: snapshots/<rev>/x -> ../../blobs/<sha>
            if stat.S_ISLNK(st.st_mode) and not (real.is_relative_to(inside) or in_hf_cache):
                raise InvalidCheckpoint(f"shard path '{path}' resolves outside the model directory ({real})",
                                        hint="copy the shard into the model directory (only symlinks into a "
                                             "Hugging Face cache's blobs/ may point elsewhere)")
        self.files[str(path)] = SafetensorsFile(path)

    def _sort_tensors(self) -> None:
        """Physical order: files in the order first named, then data offset."""
        order = {id(f): i for i, f in enumerate(self.files.values())}
        items = sorted(self.tensors.items(), key=lambda kv: (order[id(kv[1].file)], kv[1].info.begin, kv[0]))
        self.tensors = dict(items)

    # -- facts ---------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(ref.info.nbytes for ref in self.tensors.values())

    @property
    def total_params(self) -> int:
        return sum(ref.info.numel for ref in self.tensors.values())

    def identity(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of every weight file: two paths naming one model share them."""
        out = set()
        for p in self.files:
            st = os.stat(p)
            out.add((st.st_dev, st.st_ino))
        return out

    def close(self) -> None:
        for f in self.files.values():
            f.close()

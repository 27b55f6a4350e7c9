"""What the output's shards hold: every tensor's file, offset and header, decided before
the first byte is written (io/writer.py then only puts bytes where this says).

A model directory is sharded greedily by `--shard-size` as huggingface_hub does
(model.safetensors, or model-0000i-of-0000n.safetensors + index); a one-file output
(`-o NAME.safetensors`, the layout diffusion tools load) is one shard whose header also
carries the recipe and, written last into reserved space, the merge's summary.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..constants import DEFAULT_SHARD_BYTES, MAX_HEADER_BYTES, OUTPUT_METADATA, SINGLE_NAME
from ..dtypes import DTYPES
from ..errors import RecipeError, shown

_MAX_SHARDS = 99_999  # the 5-digit shard name pattern


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    def __post_init__(self):  # NumPy ints would overflow nbytes and break json.dumps
        object.__setattr__(self, "shape", tuple(int(d) if isinstance(d, np.integer) else d for d in self.shape))

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * DTYPES[self.dtype].bits // 8


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    header: bytes  # the full prefix: 8-byte N + padded JSON
    tensors: tuple[str, ...]  # in data order
    offsets: dict[str, int]  # absolute file offset of each tensor's first byte
    size: int  # total file size


@dataclass(frozen=True)
class ShardLayout:
    shards: tuple[ShardPlan, ...]
    total_size: int  # sum of tensor data bytes
    tensors: tuple[OutputTensor, ...] = ()  # in the order given to plan_shards
    shard_bytes: int = DEFAULT_SHARD_BYTES  # the limit it was laid out with (the report keeps it: verify --recompute)
    _where: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        where = {n: (i, s.offsets[n]) for i, s in enumerate(self.shards) for n in s.tensors}
        object.__setattr__(self, "_where", where)

    def location(self, name: str) -> tuple[int, int]:
        """(shard index, absolute file offset of the tensor's first byte)."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in the output layout")
        return self._where[name]

    def index_json(self) -> bytes | None:
        """model.safetensors.index.json as huggingface_hub writes it; None for one shard."""
        if len(self.shards) == 1:
            return None
        weight_map = {t.name: self.shards[self._where[t.name][0]].filename for t in self.tensors}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        return (json.dumps(index, indent=2) + "\n").encode("utf-8")


def _check_tensor(t: OutputTensor, seen: set) -> None:
    """Refuse what the format or its readers cannot hold, before anything is written."""
    name = t.name
    if not isinstance(name, str) or not name:
        raise RecipeError(f"output tensor name {name!r} is empty or not a string")
    if name == "__metadata__":
        raise RecipeError("an output tensor cannot be named '__metadata__' (reserved by safetensors)")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise RecipeError(f"output tensor name {name!r} contains control or surrogate characters")
    if name in seen:
        raise RecipeError(f"duplicate output tensor name {name!r}")
    seen.add(name)
    if t.dtype not in DTYPES:
        raise RecipeError(f"output tensor {name!r} has unknown dtype {t.dtype!r}")
    if any(type(d) is not int or d < 0 for d in t.shape):
        raise RecipeError(f"output tensor {name!r} has invalid shape {t.shape!r}")
    numel = OutputTensor(name, "U8", t.shape).nbytes
    if numel * DTYPES[t.dtype].bits % 8:  # packed sub-byte dtypes (F4, F6)
        raise RecipeError(f"output tensor {name!r}: {t.dtype} data of shape {t.shape} is not whole bytes")
    if t.nbytes >= 1 << 63:
        raise RecipeError(f"output tensor {name!r} is too large ({t.nbytes} bytes)")


def _plan_one(filename: str, tensors: list[OutputTensor], metadata: dict = OUTPUT_METADATA,
              reserve: int = 0) -> ShardPlan:
    """One shard exactly as safetensors' `prepare()` lays it out (dtype descending, then name);
    `reserve` spaces after the JSON keep room for metadata known only at the end (one file)."""
    ordered = sorted(tensors, key=lambda t: (-DTYPES[t.dtype].order, t.name))
    header: dict = {"__metadata__": dict(metadata)}
    rel, start = {}, 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [start, start + t.nbytes]}
        rel[t.name], start = start, start + t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b" " * reserve
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise RecipeError(f"the header of {filename} would be {len(text)} bytes, above the safetensors limit "
                          f"of {MAX_HEADER_BYTES}", hint="use a smaller --shard-size so shards hold fewer tensors")
    prefix = len(text).to_bytes(8, "little") + text
    offsets = {n: len(prefix) + r for n, r in rel.items()}
    return ShardPlan(filename, prefix, tuple(t.name for t in ordered), offsets, len(prefix) + start)


def plan_shards(tensors: Sequence[OutputTensor], shard_bytes: int = DEFAULT_SHARD_BYTES,
                single_name: str = SINGLE_NAME) -> ShardLayout:
    """Assign tensors greedily, in the given order, to shards of at most `shard_bytes` of data.

    A new shard starts when the next tensor would push the current (non-empty) one past
    the limit, so a tensor larger than the limit sits alone. One shard is `single_name`
    (a PEFT adapter's is adapter_model.safetensors).
    """
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
        raise RecipeError(f"shard size must be a positive number of bytes, got {shown(shard_bytes)}")
    tensors, seen = list(tensors), set()
    for t in tensors:
        _check_tensor(t, seen)
    groups: list[list[OutputTensor]] = [[]]
    current = 0
    for t in tensors:
        if groups[-1] and current + t.nbytes > shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append(t)
        current += t.nbytes
    n = len(groups)
    if n > _MAX_SHARDS:
        raise RecipeError(f"the output would need {n} shards", hint="use a larger --shard-size")
    names = [single_name] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    shards = tuple(_plan_one(name, g) for name, g in zip(names, groups))
    return ShardLayout(shards, sum(t.nbytes for t in tensors), tuple(tensors), int(shard_bytes))


def plan_one_file(tensors: Sequence[OutputTensor], filename: str, metadata: dict[str, str], limit: int,
                  reserve: int) -> ShardLayout:
    """The whole output as one file of at most `limit` data bytes, its header holding
    `metadata` and `reserve` bytes of room for more (with_metadata)."""
    tensors, seen = list(tensors), set()
    for t in tensors:
        _check_tensor(t, seen)
    total = sum(t.nbytes for t in tensors)
    if total > limit:
        raise RecipeError(f"a one-file output would hold {total:,} bytes of tensors, above the limit of {limit:,}",
                          hint="a larger --shard-size raises the limit of one file; or give -o a directory "
                               "(without .safetensors) for a sharded model directory")
    return ShardLayout((_plan_one(filename, tensors, metadata, reserve),), total, tuple(tensors), int(limit))


def with_metadata(shard: ShardPlan, metadata: dict[str, str]) -> bytes | None:
    """The shard's prefix with `metadata` added to its header's __metadata__, padded to the
    planned length (so no data moves); None when it does not fit the reserved room."""
    text = shard.header[8:]
    header = json.loads(text)
    header["__metadata__"] = {**header["__metadata__"], **metadata}
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(new) > len(text):
        return None
    return shard.header[:8] + new + b" " * (len(text) - len(new))


def part_shards(layout: ShardLayout, part: int, parts: int) -> list[int]:
    """The shards part `part` of `parts` (1-based) writes: whole shards, balanced by bytes
    (largest first, each to the part with the fewest bytes so far, the lower part on a tie);
    the same on every machine, as it depends only on the layout. A part may get none."""
    load = [0] * parts
    owner = {}
    for i in sorted(range(len(layout.shards)), key=lambda i: (-layout.shards[i].size, i)):
        p = min(range(parts), key=lambda p: (load[p], p))
        owner[i] = p
        load[p] += layout.shards[i].size
    return [i for i in range(len(layout.shards)) if owner[i] == part - 1]

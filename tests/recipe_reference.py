"""An independent reference for whole recipes: what `npmerge run` must write, computed
tensor by tensor with tests/reference.py (docs/recipes.md recipe values + the method
functions) from plain PyYAML data and the official safetensors reader.

It shares no code with npmerge. It knows Llama-style names (`model.layers.<j>.`), which
is all the fixtures use, and follows mergekit: `models:` is one slice over all layers;
the base is never merged as a model (a listed base is skipped); embeddings take the
first slice's sources and parameters, the other tensors outside the layers the last
slice's; output layers are numbered consecutively.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml
from safetensors import safe_open

import reference as ref

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EXPONENT = re.compile(r"^[-+]?\d+(\.\d*)?[eE][-+]?\d+$")  # YAML 1.1 leaves these strings

# (has a base, per-model defaults, global defaults), docs/semantics.md / docs/recipes.md
METHODS = {
    "ties": (True, {"weight": 1.0, "density": 1.0}, {"lambda": 1.0, "normalize": True, "consensus": "sum"}),
    "task_arithmetic": (True, {"weight": 1.0}, {"lambda": 1.0, "normalize": False}),
    "linear": (False, {"weight": 1.0}, {"normalize": True}),
    "passthrough": (False, {"scale": None}, {}),
}
NUMPY_CODE = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
USER_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _numbers(x):
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers(v) for v in x]
    if isinstance(x, str) and EXPONENT.match(x):
        return float(x)
    return x


class Model:
    """Raw tensors of a model directory (all shards), read with the official library."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
                 else ["model.safetensors"])
        self.raw = {}
        for f in files:
            with safe_open(str(self.path / f), framework="numpy") as st:
                for k in st.keys():
                    self.raw[k] = st.get_tensor(k)
        self.config = json.loads((self.path / "config.json").read_text())

    def code(self, name: str) -> str:
        return NUMPY_CODE[self.raw[name].dtype]

    def f32(self, name: str) -> np.ndarray:
        return self.raw[name].astype(np.float32)  # exact for BF16 / F16 / F32


def _round(x: np.ndarray, code: str | None) -> np.ndarray:
    if code == "BF16":
        return ref.to_f32_bf16(ref.from_f32_bf16(x))
    if code == "F16":
        return x.astype(np.float16).astype(np.float32)
    return x


def encode(x: np.ndarray, code: str) -> np.ndarray:
    """float32 -> raw storage bits (uint16 / uint32), one rounding."""
    if code == "BF16":
        return ref.from_f32_bf16(x)
    if code == "F16":
        return x.astype(np.float16).view(np.uint16)
    return x.astype(np.float32).view(np.uint32)


def bits(a: np.ndarray) -> np.ndarray:
    """A tensor as read by the official library -> its raw bits."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.uint32)


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _vocabulary(data: dict, base_ref: str | None, model):
    """With tokenizer_source (or tokenizer: {source, pad_to_multiple_of}): (model ref, tensor name)
    -> that tensor's float32 rows in output-vocabulary order (tests/reference.py, mergekit's
    rules); None without. Inputs in npmerge's order: the base, then the other models."""
    block = data.get("tokenizer") or {}
    source = data.get("tokenizer_source") or (block.get("source", "union") if block else None)
    if source is None:
        return None
    merged = [m["model"] for m in data.get("models") or [] if m["model"] != base_ref]
    if not merged:
        merged = list(dict.fromkeys(s["model"] for sl in data["slices"] for s in sl["sources"] if s["model"] != base_ref))
    refs = ([base_ref] if base_ref else []) + merged
    vocabs: list[dict] = []
    for r in refs:
        rows = model(r).raw[VOCAB_TENSORS[0]].shape[0]
        vocabs.append(ref.read_vocabulary(model(r).path, rows, vocabs[0] if vocabs else None))
    which = source if source in ("base", "union") else refs.index(source)
    names, n_tokens, size = ref.output_vocabulary(which, vocabs, 0, block.get("pad_to_multiple_of"))
    cache: dict = {}

    def rows_of(r: str, name: str) -> np.ndarray:
        if name not in cache:  # a tied model (no lm_head) uses its embeddings as its head
            full = [model(x).f32(name if name in model(x).raw else VOCAB_TENSORS[0]) for x in refs]
            cache[name] = [ref.permuted_rows(names, n_tokens, size, vocabs, 0, j, full) for j in range(len(refs))]
        return cache[name][refs.index(r)]

    return rows_of


def expected(recipe_path: Path, cwd: Path) -> tuple[dict[str, tuple[str, np.ndarray]], int]:
    """{output name: (dtype code, raw bits)} and the output's layer count."""
    data = _numbers(yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")))
    method = data["merge_method"]
    has_base, model_defaults, global_defaults = METHODS[method]
    top = data.get("parameters") or {}
    base_ref = data.get("base_model") if has_base else None
    cache: dict[str, Model] = {}

    def model(r: str) -> Model:
        if r not in cache:
            cache[r] = Model(cwd / r)
        return cache[r]

    if data.get("models"):
        first = next(m["model"] for m in data["models"] if m["model"] != base_ref)
        n = (model(base_ref) if base_ref else model(first)).config["num_hidden_layers"]
        sources = [{"model": m["model"], "layer_range": [0, n], "parameters": m.get("parameters") or {}}
                   for m in data["models"]]
        if base_ref and all(m["model"] != base_ref for m in data["models"]):
            sources.append({"model": base_ref, "layer_range": [0, n]})
        slices = [{"sources": sources}]
    else:
        slices = data["slices"]
    dtype = USER_DTYPE.get(data.get("dtype"))
    out_dtype = USER_DTYPE.get(data.get("out_dtype")) or dtype
    rows_of = _vocabulary(data, base_ref, model)

    def values(r: str, n: str) -> np.ndarray:
        """A model's tensor as merged: in output-vocabulary row order under a tokenizer source."""
        return rows_of(r, n) if rows_of and n in VOCAB_TENSORS else model(r).f32(n)

    def merge(out_name: str, t: float, sl: dict, in_names: list[str]):
        sp = sl.get("parameters") or {}
        srcs = list(zip(sl["sources"], in_names))
        base = [(s, n) for s, n in srcs if s["model"] == base_ref]
        merged = [(s, n) for s, n in srcs if s["model"] != base_ref]
        g = {k: ref.resolve_parameter([sp.get(k), top.get(k)], out_name, t, d) for k, d in global_defaults.items()}
        per = [{k: ref.resolve_parameter([(s.get("parameters") or {}).get(k), sp.get(k), top.get(k)], n, t, d)
                for k, d in model_defaults.items()} for s, n in merged]
        stored = model((base or merged)[0][0]["model"]).code((base or merged)[0][1])
        out = out_dtype or stored
        xs = [_round(values(s["model"], n), dtype) for s, n in merged]
        if method == "passthrough":
            (s, n), = merged
            if per[0]["scale"] is None:
                if out == stored and dtype in (None, stored):
                    return stored, bits(model(s["model"]).raw[n])
                return out, encode(xs[0], out)
            return out, encode(ref.passthrough(xs[0], per[0]["scale"]), out)
        w = [float(p["weight"]) for p in per]
        if method == "linear":
            return out, encode(ref.linear(xs, w, normalize=bool(g["normalize"])), out)
        b = _round(values(base[0][0]["model"], base[0][1]), dtype)
        if method == "task_arithmetic":
            y = ref.task_arithmetic(b, xs, w, lam=float(g["lambda"]), normalize=bool(g["normalize"]))
        else:
            y = ref.ties(b, xs, w, [float(p["density"]) for p in per], lam=float(g["lambda"]),
                         normalize=bool(g["normalize"]), consensus=g["consensus"])
        return out, encode(y, out)

    first_source = slices[0]["sources"][0]
    names = list(model(first_source["model"]).raw)
    layered: dict[int, list[str]] = {}
    outside = []
    for name in names:
        m = LAYER.match(name)
        if m:
            layered.setdefault(int(m.group(1)), []).append(m.group(2))
        else:
            outside.append(name)
    result = {}
    for name in outside:
        sl = slices[0] if "embed" in name else slices[-1]
        result[name] = merge(name, 0.0, sl, [name] * len(sl["sources"]))
    j = 0
    for sl in slices:
        a0, b0 = sl["sources"][0]["layer_range"]
        length = b0 - a0
        for k in range(length):
            t = ref.layer_t(k, length)
            for rest in layered[a0 + k]:
                in_names = [f"model.layers.{s['layer_range'][0] + k}.{rest}" for s in sl["sources"]]
                out_name = f"model.layers.{j}.{rest}"
                result[out_name] = merge(out_name, t, sl, in_names)
            j += 1
    return result, j

"""A PEFT LoRA adapter directory read as task vectors, without PyTorch.

`LoraAdapter(path)` validates `adapter_config.json` and `adapter_model.safetensors`
(the strict reader of io/safetensors.py; `adapter_model.bin` is pickle and refused)
and turns every saved tensor into a `LoraTarget`: what the adapter does to one tensor
of the base model. PEFT's conventions, checked against its source (huggingface/peft):

- keys are `base_model.model.<module>.<param>` with the adapter name removed
  (utils/save_and_load.py `get_peft_model_state_dict`);
- `lora_A.weight` [r, in] and `lora_B.weight` [out, r] change `<module>.weight` by
  scale * B @ A, transposed for `fan_in_fan_out` (Conv1D) layers; `lora_embedding_A`
  [r, num_embeddings] and `lora_embedding_B` [dim, r] change an embedding by
  scale * (B @ A)^T; `lora_B.bias` (lora_bias) adds scale * b to `<module>.bias`
  (tuners/lora/layer.py `get_delta_weight`, `merge`);
- scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; r and alpha per
  module from `rank_pattern` / `alpha_pattern`, whose keys are regular expressions:
  the first key K (in file order) with re.match(rf"(.*\\.)?({K})$", module) wins, for
  each pattern separately (utils/other.py `get_pattern_key`, lora/model.py);
- any other tensor (modules_to_save, `bias: all|lora_only`, `...base_layer.weight`
  copies of targeted embeddings) replaces the base tensor of the same name with
  `.base_layer` segments removed; its task vector is replacement - base.

Nothing here reads tensor data (that is `LoraTarget.read_delta`, io/lora_target.py),
and nothing imports numba (the kernel loads on the first read).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

from ..dtypes import DECODABLE
from ..errors import IncompatibleModels, InvalidCheckpoint
from .checkpoint import TensorRef
from .lora_target import LoraTarget
from .safetensors import SafetensorsFile

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# Modules transformers builds as Conv1D (weight [in, out]) in GPT-2-style models; every
# other low-rank target is an nn.Linear. PEFT sets fan_in_fan_out by this layer type and
# ignores adapter_config.json's value (tuners/lora/model.py, dispatch_default).
_GPT2_CONV1D = ("c_attn", "q_attn", "c_proj", "c_fc")
CONV1D_MODULES = {"gpt2": _GPT2_CONV1D, "imagegpt": _GPT2_CONV1D, "decision_transformer": _GPT2_CONV1D,
                  "openai-gpt": ("c_attn", "c_proj", "c_fc")}
FACTOR_DTYPES = ("F16", "BF16", "F32")  # float32-exact, so the products are exact in float64
_PARTS = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_B.bias": "bias",
          "lora_embedding_A": "a", "lora_embedding_B": "b"}
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias"
                     r"|lora_embedding_A|lora_embedding_B)$")
_LORA_SEGMENTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}
# init_lora_weights values that leave the base weights alone (PiSSA, OLoRA, CorDA, LoftQ
# and LoRA-GA rewrite them, so the adapter applies to a base that exists nowhere else).
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Config keys whose presence means the adapter is more than W + scale * B @ A.
_UNSUPPORTED = {
    "layer_replication": "it duplicates base layers (the output would not have the base's tensors)",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, not to the weights",
    "use_qalora": "QA-LoRA pools the input, so B @ A is not the weight change",
    "trainable_token_indices": "trainable tokens are not supported yet",
    "target_parameters": "LoRA on raw nn.Parameters is not supported yet",
    "arrow_config": "Arrow routes between several adapters at run time",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
}
_HINT_RESAVE = ("re-save the adapter with a current PEFT: PeftModel.from_pretrained(base, DIR)"
                ".save_pretrained(OUT, safe_serialization=True)")


def is_lora_adapter(path) -> bool:
    """True for a directory holding adapter_config.json (a PEFT adapter, maybe not LoRA)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class LoraAdapter:
    """A validated PEFT LoRA adapter: config values and `targets` keyed by base tensor name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self._read_config()
        self.file = self._open_weights()
        self.targets: dict[str, LoraTarget] = self._read_targets()

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def files(self) -> dict[str, SafetensorsFile]:
        """The weights file, keyed by path as Checkpoint.files (fingerprints, identity checks);
        adapter_config.json matters too: see `config_sha256`."""
        return {self.file.path: self.file}

    def identity(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of the weights file, as Checkpoint.identity()."""
        st = os.stat(self.file.path)
        return {(st.st_dev, st.st_ino)}

    def close(self) -> None:
        self.file.close()

    # -- adapter_config.json ----------------------------------------------------
    def _bad(self, what: str, hint: str | None = None) -> InvalidCheckpoint:
        return InvalidCheckpoint(f"adapter '{self.path}': {what}", hint=hint)

    def _read_config(self) -> dict:
        where = self.path / CONFIG_NAME
        if not self.path.is_dir():
            raise InvalidCheckpoint(f"adapter '{self.path}' is not a directory",
                                    hint="point at a PEFT adapter directory (adapter_config.json + weights)")
        try:
            raw = where.read_bytes()
            self.config_sha256 = hashlib.sha256(raw).hexdigest()
            cfg = json.loads(raw.decode("utf-8"))
        except FileNotFoundError:
            raise self._bad(f"no {CONFIG_NAME}", hint="a PEFT adapter directory holds adapter_config.json "
                            "next to adapter_model.safetensors") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise self._bad(f"invalid {CONFIG_NAME}: {exc}", hint=_HINT_RESAVE) from None
        except OSError as exc:
            raise self._bad(f"cannot read {CONFIG_NAME}: {exc.strerror}") from None
        if not isinstance(cfg, dict):
            raise self._bad(f"invalid {CONFIG_NAME}: not a JSON object", hint=_HINT_RESAVE)
        peft_type = cfg.get("peft_type")
        if peft_type != "LORA":
            what = "no peft_type" if peft_type is None else f"peft_type {peft_type!r}"
            raise self._bad(f"{CONFIG_NAME} has {what}; npmerge merges LoRA adapters (peft_type LORA) only",
                            hint="prompt/prefix tuning and other PEFT methods do not change the weights "
                                 "by B @ A; merge the adapter into its base with PEFT first")
        if cfg.get("use_dora"):
            raise self._dora()
        for key, why in _UNSUPPORTED.items():
            if cfg.get(key) not in (None, False, [], {}):
                raise self._bad(f"{CONFIG_NAME} sets {key}: {why}",
                                hint="merge the adapter into its base with PEFT (merge_and_unload) first")
        init = cfg.get("init_lora_weights", True)
        if not any(init is v or (isinstance(v, str) and init == v) for v in _SAFE_INITS):
            raise self._bad(f"{CONFIG_NAME} has init_lora_weights {init!r}: the adapter was trained on "
                            "modified base weights", hint="save it with PEFT's path_initial_model_for_weight_"
                            "conversion (which makes it a plain LoRA of the original base), or merge it with PEFT")
        self._check_types(cfg)
        return cfg

    def _check_types(self, cfg: dict) -> None:
        def number(v, key):
            if type(v) not in (int, float) or not math.isfinite(v):
                raise self._bad(f"{CONFIG_NAME}: {key} must be a number, not {v!r}")

        def rank(v, key):
            if type(v) is not int or v < 1:
                raise self._bad(f"{CONFIG_NAME}: {key} must be a positive integer, not {v!r}")

        rank(cfg.setdefault("r", 8), "r")  # missing keys take PEFT's LoraConfig defaults
        number(cfg.setdefault("lora_alpha", 8), "lora_alpha")
        for key in ("use_rslora", "fan_in_fan_out", "lora_bias"):
            if type(cfg.setdefault(key, False)) is not bool:
                raise self._bad(f"{CONFIG_NAME}: {key} must be true or false, not {cfg[key]!r}")
        if cfg.setdefault("bias", "none") not in ("none", "all", "lora_only"):
            raise self._bad(f"{CONFIG_NAME}: bias must be 'none', 'all' or 'lora_only', not {cfg['bias']!r}")
        for key, check in (("rank_pattern", rank), ("alpha_pattern", number)):
            pattern = cfg.get(key) or {}
            if not isinstance(pattern, dict):
                raise self._bad(f"{CONFIG_NAME}: {key} must be an object, not {pattern!r}")
            for k, v in pattern.items():
                check(v, f"{key}[{k!r}]")
                try:
                    re.compile(rf"(.*\.)?({k})$")
                except re.error as exc:
                    raise self._bad(f"{CONFIG_NAME}: {key} key {k!r} is not a valid regular expression: {exc}")
            cfg[key] = pattern

    def _dora(self) -> InvalidCheckpoint:
        return self._bad("it is a DoRA adapter (use_dora / lora_magnitude_vector): DoRA rescales every weight "
                         "row by a learned magnitude over the norm of W + scale * B @ A, so its change is not "
                         "the task vector scale * B @ A and npmerge refuses it rather than merge something else",
                         hint="merge it into its base with PEFT (merge_and_unload) and merge that full model")

    def _pattern(self, key: str, module: str, default):
        for k, v in self.config[key].items():
            if re.match(rf"(.*\.)?({k})$", module):
                return v
        return default

    # -- adapter_model.safetensors ------------------------------------------------
    def _open_weights(self) -> SafetensorsFile:
        weights = self.path / WEIGHTS_NAME
        if not os.path.lexists(weights):
            if os.path.lexists(self.path / PICKLE_NAME):
                raise self._bad(f"it holds {PICKLE_NAME} (pickle), not {WEIGHTS_NAME}",
                                hint="npmerge reads safetensors only and never unpickles; " + _HINT_RESAVE)
            raise self._bad(f"no {WEIGHTS_NAME}", hint="the adapter directory is incomplete; fetch it again")
        return SafetensorsFile(weights)

    def _read_targets(self) -> dict[str, LoraTarget]:
        tensors = self.file.header.tensors
        if not tensors:
            raise self._bad(f"{WEIGHTS_NAME} holds no tensors")
        lora: dict[str, dict[str, TensorRef]] = {}
        full: dict[str, TensorRef] = {}
        for key, info in tensors.items():
            if not key.startswith(KEY_PREFIX):
                raise self._bad(f"tensor '{key}' is not a PEFT LoRA key (expected '{KEY_PREFIX}<module>.lora_A"
                                ".weight' and similar)", hint="npmerge reads adapters saved by PEFT's save_pretrained")
            ref = TensorRef(self.file, info)
            rest = key[len(KEY_PREFIX):]
            segments = rest.split(".")
            if "lora_magnitude_vector" in segments:
                raise self._dora()
            m = _KEY_RE.match(rest)
            if m:
                kind = "embedding" if m["part"].startswith("lora_embedding") else "linear"
                parts = lora.setdefault(m["module"], {})
                if parts.setdefault("kind", kind) != kind:
                    raise self._bad(f"module '{m['module']}' has both lora_A/B and lora_embedding_A/B")
                parts[_PARTS[m["part"]]] = ref
                continue
            odd = _LORA_SEGMENTS.intersection(segments) or {"modules_to_save", "original_module",
                                                             "token_adapter"}.intersection(segments)
            if odd:
                raise self._bad(f"unexpected tensor '{key}' (a '{sorted(odd)[0]}' key PEFT does not save)",
                                hint=_HINT_RESAVE)
            name = ".".join(s for s in segments if s != "base_layer")
            if name in full:
                raise self._bad(f"tensors '{full[name].info.name}' and '{key}' both replace '{name}'")
            if info.dtype.name not in DECODABLE:
                raise self._bad(f"tensor '{key}' has dtype {info.dtype.name}; replacements must be one of "
                                f"{', '.join(DECODABLE)}")
            full[name] = ref
        targets: dict[str, LoraTarget] = {}
        for module, parts in lora.items():
            for t in self._lowrank_targets(module, parts):
                targets[t.name] = t
        for name, ref in full.items():
            t = targets.get(name)
            shape = tuple(ref.info.shape)
            targets[name] = replace(t, full=ref) if t else LoraTarget(name, name.rpartition(".")[0], shape, full=ref)
        return dict(sorted(targets.items()))

    def _lowrank_targets(self, module: str, parts: dict) -> list[LoraTarget]:
        a, b, bias = parts.get("a"), parts.get("b"), parts.get("bias")
        if a is None or b is None:
            have, miss = ("lora_A", "lora_B") if a is not None else ("lora_B", "lora_A")
            raise self._bad(f"module '{module}' has {have} but no {miss}", hint="the adapter file is incomplete")
        for ref in (a, b) + ((bias,) if bias else ()):
            if ref.info.dtype.name not in FACTOR_DTYPES:
                raise self._bad(f"tensor '{ref.info.name}' has dtype {ref.info.dtype.name}; LoRA factors must be "
                                f"{', '.join(FACTOR_DTYPES)}")
        if len(a.info.shape) != 2 or len(b.info.shape) != 2:
            conv = len(a.info.shape) > 2
            raise self._bad(f"module '{module}': lora_A {_shape(a.info.shape)}, lora_B {_shape(b.info.shape)}"
                            + (" is a convolution LoRA, which npmerge does not support" if conv
                               else " must be matrices"))
        r = a.info.shape[0]
        if r < 1 or b.info.shape[1] != r:
            raise self._bad(f"module '{module}': lora_B {_shape(b.info.shape)} does not fit "
                            f"lora_A {_shape(a.info.shape)} (need lora_B [out, r] and lora_A [r, in])")
        want = self._pattern("rank_pattern", module, self.config["r"])
        if want != r:
            raise self._bad(f"module '{module}' has rank {r} (lora_A {_shape(a.info.shape)}) but "
                            f"{CONFIG_NAME} gives r = {want} for it", hint=_HINT_RESAVE)
        alpha = self._pattern("alpha_pattern", module, self.config["lora_alpha"])
        scale = alpha / math.sqrt(r) if self.config["use_rslora"] else alpha / r
        embedding = parts["kind"] == "embedding"
        transposed = embedding or self.config["fan_in_fan_out"]
        t = LoraTarget(module + ".weight", module, (0, 0), scale, a, b, transposed, embedding)
        out = [replace(t, shape=t.lowrank_shape(transposed))]
        if bias is not None:
            if not self.config["lora_bias"]:
                raise self._bad(f"module '{module}' has lora_B.bias but {CONFIG_NAME} says lora_bias false")
            if bias.info.shape != (b.info.shape[0],):
                raise self._bad(f"module '{module}': lora_B.bias {_shape(bias.info.shape)} does not fit "
                                f"lora_B {_shape(b.info.shape)}")
            out.append(LoraTarget(module + ".bias", module, bias.info.shape, scale, bias=bias))
        return out

    # -- against a base model -------------------------------------------------------
    def check_against(self, base_shapes: dict[str, tuple[int, ...]], model_type: str | None = None) -> list[str]:
        """Check every target against the base model's tensor shapes (no data read); the
        notes to show.

        Raises IncompatibleModels for a target the base does not have, or whose shape
        differs (naming the module and both shapes). Orientation as PEFT decides it, by
        layer type and whatever the config says: with the base's config.json
        `model_type` known, Conv1D for CONV1D_MODULES and nn.Linear for the rest; a
        non-square weight whose shape shows the other type (custom model code) follows
        its shape; without a model_type a square weight keeps the config's flag.
        """
        other = self.base_model_name_or_path
        hint = ("the adapter belongs to another base model" + (f" (adapter_config.json names '{other}')"
                                                                 if other else "") + "; merge it with that base")
        missing = [n for n in self.targets if n not in base_shapes]
        if missing:
            t = self.targets[missing[0]]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            why = " (PEFT cannot merge lora_bias into a layer without bias either)" if t.bias else ""
            raise IncompatibleModels(f"adapter '{self.path}' changes '{t.name}' of module '{t.module}', which the "
                                     f"base model does not have{why}{more}", hint=hint)
        conv1d = CONV1D_MODULES.get(model_type, ()) if model_type else None
        flag = self.config["fan_in_fan_out"]
        overridden = []
        for name, t in self.targets.items():
            shape = tuple(base_shapes[name])
            if t.a is not None and not t.embedding:
                kind = t.transposed if conv1d is None else t.module.rsplit(".", 1)[-1] in conv1d
                if shape != t.lowrank_shape(kind) and shape == t.lowrank_shape(not kind):
                    kind = not kind
                if kind != t.transposed:
                    t = self.targets[name] = replace(t, transposed=kind, shape=t.lowrank_shape(kind))
                if kind != flag:
                    overridden.append(t.module)
            if shape != t.shape or (t.full is not None and tuple(t.full.info.shape) != shape):
                raise IncompatibleModels(f"adapter '{self.path}' does not fit the base model: module '{t.module}' "
                                         f"changes '{name}' by {self._describe(t)}, but the base tensor is "
                                         f"{_shape(shape)}", hint=hint)
        if not overridden:
            return []
        kind = "Conv1D" if not flag else "nn.Linear"
        listed = ", ".join(overridden[:4]) + (f" and {len(overridden) - 4} more" if len(overridden) > 4 else "")
        return [f"adapter '{self.path}': {CONFIG_NAME} says fan_in_fan_out: {str(flag).lower()}, but {listed} "
                + (f"is a {kind} layer" if len(overridden) == 1 else f"are {kind} layers")
                + f": applied as {'(B @ A)^T' if not flag else 'B @ A'}, as PEFT does"]

    @staticmethod
    def _describe(t: LoraTarget) -> str:
        if t.full is not None:
            return f"a replacement {_shape(t.full.info.shape)}"
        if t.bias is not None:
            return f"lora_B.bias {_shape(t.shape)}"
        a, b = ("lora_embedding_A", "lora_embedding_B") if t.embedding else ("lora_A", "lora_B")
        prod = f"{b} {_shape(t.b.info.shape)} x {a} {_shape(t.a.info.shape)}"
        return f"({prod})^T = {_shape(t.shape)}" if t.transposed else f"{prod} = {_shape(t.shape)}"

    # -- npmerge info -------------------------------------------------------------------
    def summary(self) -> dict:
        """What `npmerge info ADAPTER` shows: the adapter, not its raw tensors."""
        c = self.config
        lowrank = [t for t in self.targets.values() if t.a is not None]
        default_scale = c["lora_alpha"] / (math.sqrt(c["r"]) if c["use_rslora"] else c["r"])
        return {
            "type": "rsLoRA" if c["use_rslora"] else "LoRA",
            "r": c["r"],
            "lora_alpha": c["lora_alpha"],
            "scale": default_scale,
            "use_rslora": c["use_rslora"],
            "ranks": sorted({t.rank for t in lowrank}),
            "scales": sorted({t.scale for t in lowrank}),
            "rank_pattern": c["rank_pattern"],
            "alpha_pattern": c["alpha_pattern"],
            "target_modules": c.get("target_modules"),
            "adapted_modules": sorted({t.module for t in lowrank}),
            "modules_to_save": c.get("modules_to_save"),
            "replaced_tensors": [n for n, t in self.targets.items() if t.full is not None],
            "bias": c["bias"],
            "lora_bias": c["lora_bias"],
            "fan_in_fan_out": c["fan_in_fan_out"],
            "base_model_name_or_path": self.base_model_name_or_path,
            "peft_version": c.get("peft_version"),
            "dtypes": sorted({i.dtype.name for i in self.file.header.tensors.values()}),
            "tensors": len(self.file.header.tensors),
            "parameters": sum(i.numel for i in self.file.header.tensors.values()),
        }

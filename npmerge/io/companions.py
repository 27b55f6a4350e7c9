"""The non-tensor files of the output model directory.

A merged model must load like its base: same tokenizer, generation defaults,
processor and custom code, so those are copied byte for byte from the base model
directory. config.json is the one file we rewrite, because its dtype key must
name the dtype we actually wrote (transformers loads in that dtype by default), and
the planner's updates (layer count, vocab_size, tie_word_embeddings) must hold. With a
tokenizer source the tokenizer files are the output vocabulary's (io/vocab.py).
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from ..dtypes import TORCH_NAMES, parse_user_dtype
from ..errors import InvalidCheckpoint
from .writer import OutputWriter

# Copied byte for byte from the base model directory (top level only).
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    # Custom code (trust_remote_code): configuration_*.py, modeling_*.py,
    # tokenization_*.py and the helper modules they import, so every top-level .py.
    "*.py",
)

DTYPE_KEYS = ("torch_dtype", "dtype")


def _load_config(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
        config = json.loads(text)
    except OSError as e:
        raise InvalidCheckpoint(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidCheckpoint(f"{path} is not valid JSON: {e}",
                                hint="fix or remove the base model's config.json") from e
    if not isinstance(config, dict):
        raise InvalidCheckpoint(f"{path} is not a JSON object", hint="fix or remove the base model's config.json")
    return config


def updated_config(path: Path, out_dtype: str, updates: dict | None = None) -> bytes:
    """config.json with its dtype key(s) naming `out_dtype`, key order kept.

    Sets `torch_dtype` and/or `dtype`, whichever are present (adds `torch_dtype`
    when neither is). Sub-configs (text_config, vision_config, ...) that already
    carry a dtype key get it updated too, so they never contradict the weights.
    `updates`: key path (a tuple) -> value, e.g. ("num_hidden_layers",) -> 48 after
    a recipe's slices changed the layer count.
    """
    code = out_dtype if out_dtype in TORCH_NAMES else parse_user_dtype(out_dtype)
    torch_name = TORCH_NAMES[code]
    config = _load_config(path)
    present = [k for k in DTYPE_KEYS if k in config]
    for key in present or ["torch_dtype"]:
        config[key] = torch_name
    for value in config.values():
        if isinstance(value, dict):
            for key in DTYPE_KEYS:
                if isinstance(value.get(key), str):
                    value[key] = torch_name
    for keys, value in (updates or {}).items():
        scope = config
        for key in keys[:-1]:
            scope = scope[key]
        scope[keys[-1]] = value
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


def write_companions(writer: OutputWriter, source_dir: Path | None, out_dtype: str, config_updates: dict | None = None,
                     tokenizer_files: dict[str, bytes] | None = None) -> list[str]:
    """Write config.json (dtype updated) and copy the other companion files; return their names.

    `source_dir` is the base model's directory, None for a single-file base (nothing to copy).
    `config_updates`: see updated_config. `tokenizer_files`: the output's tokenizer files
    (name -> bytes, io/tokenizer.py write_tokenizer_files) when a tokenizer source made them;
    then no tokenizer file of `source_dir` is copied.
    """
    written = []
    if tokenizer_files is not None:
        from .tokenizer import TOKENIZER_FILES

        for name in sorted(tokenizer_files):
            writer.add_bytes(name, tokenizer_files[name])
            written.append(name)
        skipped = set(TOKENIZER_FILES)
    else:
        skipped = set()
    if source_dir is None:
        return written
    source_dir = Path(source_dir)
    config = source_dir / "config.json"
    if config.is_file():
        writer.add_bytes("config.json", updated_config(config, out_dtype, config_updates))
        written.append("config.json")
    try:
        names = sorted(os.listdir(source_dir))
    except OSError as e:
        raise InvalidCheckpoint(f"cannot list the base model directory {source_dir}: {e.strerror or e}") from e
    for name in names:
        if name == "config.json" or name in skipped or not any(fnmatch.fnmatchcase(name, p) for p in COPIED_FILES):
            continue
        path = source_dir / name
        if path.is_file():  # follows symlinks, as in the Hugging Face cache
            writer.copy_file(name, path)
            written.append(name)
    return written

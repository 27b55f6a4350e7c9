"""A model's tokenizer files: read (`read_tokenizer`: the vocabulary and added tokens
transformers would load, checked for consistency) and written for a merge's output
(`write_tokenizer_files`). The vocabulary rules live in io/vocab.py, the permuted rows
in io/vocab_rows.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Mapping

from ..errors import InvalidCheckpoint, shown

# Files that describe the tokenizer. With a tokenizer source these come from
# `write_tokenizer_files`, not from the plain base-model copy.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)

_ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class AddedToken:
    """One entry of tokenizer.json `added_tokens` (settings as the tokenizers library stores them)."""

    id: int
    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True
    special: bool = False

    def settings(self) -> dict:
        """The transformers `added_tokens_decoder` entry (no id)."""
        return {"content": self.content, "lstrip": self.lstrip, "normalized": self.normalized,
                "rstrip": self.rstrip, "single_word": self.single_word, "special": self.special}

    def entry(self) -> dict:
        """The tokenizer.json `added_tokens` entry."""
        return {"id": self.id, "content": self.content, "single_word": self.single_word, "lstrip": self.lstrip,
                "rstrip": self.rstrip, "normalized": self.normalized, "special": self.special}


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A model's vocabulary: token -> id (model vocab and added tokens) and its embedding row count.

    `rows` is the number of rows of the model's vocabulary-sized tensors; tokens with
    ids >= rows have no row. `assumed_from` is set when the model ships no tokenizer and
    the base's vocabulary is assumed (as mergekit does).
    """

    path: Path | None
    vocab: Mapping[str, int]
    added: tuple[AddedToken, ...]
    rows: int
    model_type: str = "WordLevel"
    model_size: int = 0  # len(model.vocab): transformers' `vocab_size` (no added tokens)
    assumed_from: Path | None = None
    chat_template: object = field(default=None, compare=False)

    @cached_property
    def by_id(self) -> dict[int, str]:
        """id -> token; for an id given to several tokens, the added token, else the first in file order."""
        out: dict[int, str] = {}
        for tok, i in self.vocab.items():
            out.setdefault(i, tok)
        for a in self.added:
            out[a.id] = a.content
        return out

    @cached_property
    def added_by_content(self) -> dict[str, AddedToken]:
        return {a.content: a for a in self.added}

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "<memory>"


def _load_json(path: Path, what: str):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise InvalidCheckpoint(f"cannot read {what} '{path}': {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidCheckpoint(f"{what} '{path}' is not valid JSON: {e}",
                                hint="the tokenizer files are damaged; fetch the model again") from None


def _is_id(v) -> bool:
    return type(v) is int and v >= 0


def _added_from_json(entry, where: str, key_id=None) -> AddedToken:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise InvalidCheckpoint(f"{where}: an added token is not an object with a string 'content'",
                                hint="the tokenizer files are damaged; fetch the model again")
    tid = entry.get("id", key_id)
    if not _is_id(tid):
        raise InvalidCheckpoint(f"{where}: added token {entry['content']!r} has no valid id ({tid!r})",
                                hint="the tokenizer files are damaged; fetch the model again")
    flags = {}
    for k in _ADDED_FLAGS:
        if k in entry:
            if not isinstance(entry[k], bool):
                raise InvalidCheckpoint(f"{where}: '{k}' of added token {entry['content']!r} is not a boolean")
            flags[k] = entry[k]
    flags.setdefault("normalized", not flags.get("special", False))
    return AddedToken(tid, entry["content"], **flags)


def _add_once(added: dict[int, AddedToken], ids: dict[str, int], a: AddedToken, where: str) -> None:
    """Add `a` to `added` (by id) and `ids` (by content), refusing a token listed at two ids:
    the tokenizers library encodes it as one of them, so a model sized for the other breaks."""
    other = ids.setdefault(a.content, a.id)
    if other != a.id:
        raise InvalidCheckpoint(f"{where}: added token {shown(a.content)} is listed at two ids, {other} and {a.id}",
                                hint="keep one entry per token (re-save the tokenizer with transformers)")
    added[a.id] = a


def read_tokenizer(model_dir, rows: int | None = None, *, fallback: Tokenizer | None = None) -> Tokenizer:
    """Read `model_dir`'s tokenizer.json (+ tokenizer_config.json's added_tokens_decoder).

    `rows`: the model's vocabulary-sized tensor row count (default: config.json
    `vocab_size`, else max id + 1). Without tokenizer.json: `fallback` (the base's
    tokenizer) is assumed with this model's rows, as mergekit does; with no fallback,
    InvalidCheckpoint saying what to add.
    """
    root = Path(model_dir)
    tj = root / "tokenizer.json"
    if rows is None:
        rows = _config_vocab_size(root)
    if not tj.is_file():
        if fallback is not None:
            return replace(fallback, path=root, rows=rows if rows is not None else fallback.rows,
                           assumed_from=fallback.path)
        slow = [n for n in ("tokenizer.model", "spiece.model", "vocab.json", "vocab.txt") if (root / n).is_file()]
        hint = (f"this model ships only a slow tokenizer ({', '.join(slow)}); write tokenizer.json with "
                "transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)") if slow else (
            "copy the model's tokenizer files (tokenizer.json) into its directory, or merge without a tokenizer source")
        raise InvalidCheckpoint(f"no tokenizer.json in '{root}': npmerge needs it to map embedding rows to tokens",
                                hint=hint)
    data = _load_json(tj, "tokenizer file")
    where = str(tj)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise InvalidCheckpoint(f"{where} has no 'model.vocab'", hint="the tokenizer file is damaged; fetch it again")
    mtype = model.get("type") if isinstance(model.get("type"), str) else "?"
    raw = model["vocab"]
    if isinstance(raw, dict):  # BPE, WordLevel, WordPiece
        vocab = dict(raw)
        if not all(_is_id(v) for v in vocab.values()):
            bad = next(k for k, v in vocab.items() if not _is_id(v))
            raise InvalidCheckpoint(f"{where}: token {bad!r} has an invalid id {vocab[bad]!r}")
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...], id = position
        vocab = {}
        for i, item in enumerate(raw):
            if not isinstance(item, list) or not item or not isinstance(item[0], str):
                raise InvalidCheckpoint(f"{where}: Unigram vocab entry {i} is not [piece, score]")
            vocab.setdefault(item[0], i)
    else:
        raise InvalidCheckpoint(f"{where}: 'model.vocab' is neither an object nor a list")
    model_size = len(vocab)
    entries = data.get("added_tokens") or []
    if not isinstance(entries, list):
        raise InvalidCheckpoint(f"{where}: 'added_tokens' is not a list")
    added: dict[int, AddedToken] = {}
    ids: dict[str, int] = {}
    for a in (_added_from_json(e, where) for e in entries):
        _add_once(added, ids, a, where)
    tc_path = root / "tokenizer_config.json"
    chat_template = None
    if tc_path.is_file():
        tc = _load_json(tc_path, "tokenizer config")
        if isinstance(tc, dict):
            chat_template = tc.get("chat_template")
            decoder = tc.get("added_tokens_decoder") or {}
            if not isinstance(decoder, dict):
                raise InvalidCheckpoint(f"{tc_path}: 'added_tokens_decoder' is not an object")
            for key, entry in decoder.items():
                if not key.isdigit():
                    raise InvalidCheckpoint(f"{tc_path}: added_tokens_decoder key {key!r} is not a token id")
                a = _added_from_json(entry, str(tc_path), int(key))
                known = added.get(a.id)
                if known is not None and known.content != a.content:
                    raise InvalidCheckpoint(
                        f"tokenizer files of '{root}' disagree: id {a.id} is {known.content!r} in tokenizer.json "
                        f"and {a.content!r} in tokenizer_config.json",
                        hint="re-save the tokenizer with transformers so both files agree")
                if known is None:  # transformers adds these on load
                    _add_once(added, ids, a, f"{where} and {tc_path}")
    for a in added.values():
        vocab[a.content] = a.id
    if rows is None:
        rows = max(vocab.values(), default=-1) + 1
    return Tokenizer(root, vocab, tuple(sorted(added.values(), key=lambda a: a.id)), rows, mtype, model_size,
                     chat_template=chat_template)


def _config_vocab_size(root: Path) -> int | None:
    cfg = root / "config.json"
    if not cfg.is_file():
        return None
    data = _load_json(cfg, "config")
    if not isinstance(data, dict):
        return None
    for holder in (data, data.get("text_config")):
        if isinstance(holder, dict) and _is_id(holder.get("vocab_size")):
            return holder["vocab_size"]
    return None


# ------------------------------------------------------------------- tokenizer files


def write_tokenizer_files(source_dir, added: tuple[AddedToken, ...], strip_at: int | None = None) -> dict[str, bytes]:
    """An output's tokenizer files, built from `source_dir` (the source tokenizer's model
    directory) for an output vocabulary with the `added` tokens and model-vocab tokens
    from id `strip_at` on dropped (io/vocab.py OutputVocab gives both).

    Files the output vocabulary leaves unchanged are copied byte for byte. tokenizer.json
    is rewritten when tokens were stripped (ids >= the base's rows) or added (union);
    tokenizer_config.json's `added_tokens_decoder` (and added_tokens.json, if present)
    then follow; the source's chat template is kept. Slow-tokenizer files
    (tokenizer.model, vocab.json, merges.txt) are copied as they are, as mergekit's
    save_pretrained does.
    """
    root = Path(source_dir)
    out: dict[str, bytes] = {}
    for name in TOKENIZER_FILES:
        p = root / name
        if p.is_file():
            out[name] = p.read_bytes()
    if "tokenizer.json" not in out:
        raise InvalidCheckpoint(f"no tokenizer.json in '{root}' to build the output tokenizer from",
                                hint="copy the source model's tokenizer files into its directory")
    data = json.loads(out["tokenizer.json"].decode("utf-8"))
    source_added = sorted((_added_from_json(e, str(root / "tokenizer.json")) for e in data.get("added_tokens") or []),
                          key=lambda a: a.id)
    changed = strip_at is not None or [a.entry() for a in source_added] != [a.entry() for a in added]
    if not changed:
        return out
    model = data["model"]
    if strip_at is not None:
        _strip_model(model, strip_at)
    data["added_tokens"] = [a.entry() for a in added]
    out["tokenizer.json"] = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    decoder = {str(a.id): a.settings() for a in added}
    if "tokenizer_config.json" in out:
        tc = json.loads(out["tokenizer_config.json"].decode("utf-8"))
        tc["added_tokens_decoder"] = decoder
        out["tokenizer_config.json"] = (json.dumps(tc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    if "added_tokens.json" in out:  # slow-tokenizer convention: the added tokens beyond the model vocab
        base_size = len(model["vocab"])
        extra = {a.content: a.id for a in added if a.id >= base_size}
        out["added_tokens.json"] = (json.dumps(extra, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return out


def _strip_model(model: dict, limit: int) -> None:
    """Drop model-vocab tokens with id >= limit (and BPE merges that name them), in place."""
    raw = model["vocab"]
    if isinstance(raw, list):  # Unigram: ids are positions, the dropped ones are the tail
        gone = {item[0] for item in raw[limit:]}
        model["vocab"] = raw[:limit]
    else:
        gone = {t for t, i in raw.items() if i >= limit}
        model["vocab"] = {t: i for t, i in raw.items() if i < limit}
    merges = model.get("merges")
    if gone and isinstance(merges, list):
        def keep(m) -> bool:
            parts = m.split(" ") if isinstance(m, str) else list(m)
            return not any(p in gone for p in parts) and "".join(parts) not in gone
        model["merges"] = [m for m in merges if keep(m)]

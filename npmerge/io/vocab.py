"""Vocabularies: a model's tokenizer, the output vocabulary of a merge, and the row maps
that turn each model's embedding / head rows into output-vocabulary order.

Fine-tunes that added tokens have embedding and head tensors with other row counts or
other row orders than their base. mergekit (`tokenizer_source: base | union | <model>`)
builds one output vocabulary and permutes every model's rows to it before merging; this
module does the same in plain Python/NumPy so that the planner can plan it and the
engine can read permuted rows in bounded memory (`PermutedRows`).

The rules, as mergekit 0.1.5 applies them (tokenizer/build.py `build_tokenizer`,
`build_union_tokenizer`, `get_stripped_tokenizer`; tokenizer/embed.py
`PermutedEmbeddings`):

- A model's vocabulary is `tokenizer.json`'s `model.vocab` plus its `added_tokens` (an
  added token's id wins), as transformers' `get_vocab()`. A token whose id is >= the
  model's row count has no row ("padding").
- `base` (the first model without a base): the base's vocabulary less its tokens >= its
  row count. `<model>`: that model's whole vocabulary (not stripped). `union`: the
  stripped base vocabulary, then every other plain token of every model (base first,
  then recipe order; ids ascending within a model), then every added token the same way
  (first model's settings win); a token not yet in the vocabulary gets the next id.
- Output rows: one per id, `size = max id + 1`, rounded up to `pad_to_multiple_of`.
- Row of output id t for model i: the model's own row if it has the token, else the
  fill rule, the same for every model lacking t. P = the models having t:
  no model: zero; one model: its row; the base among them: the base's row; else the
  mean of P's rows. Rows above the last token (padding): the mean over the model's own
  output rows. See `OutputVocab` for the exact arithmetic.

Where npmerge differs on purpose: new union tokens are numbered in id order (mergekit
walks a hash map, so its order changes from run to run); a token listed at an id >= the
model's rows counts as absent (mergekit fails with a KeyError), as do ids no token
names (zero rows; mergekit fails on the index); means are float64 sums rounded once
(mergekit: the working dtype, set order); stripping works for every tokenizer model
(mergekit: BPE only) and also drops BPE merges whose result is stripped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..constants import BLOCK, VOCAB_SLACK
from ..errors import IncompatibleModels, InvalidCheckpoint, RecipeError, shown
from ..reduction import combine_lanes, exact_sum
from .sources import TensorSource

# Fill rules for an output row a model lacks (OutputVocab.fill).
OWN, ZERO, COPY, MEAN, PAD = 0, 1, 2, 3, 4
FILL_NAMES = {OWN: "own", ZERO: "zero", COPY: "copy", MEAN: "mean", PAD: "pad"}

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
_LANES = 8


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


# ----------------------------------------------------------------------- the output


@dataclass(frozen=True, eq=False)
class OutputVocab:
    """The merge's vocabulary and, per input model, where each output row comes from.

    - `tokens`: output token -> id; `by_id`: the token naming each id (an added token,
      else the first in file order); `added`: the output's added tokens (ascending id).
    - `size`: rows of every vocabulary-sized output tensor and config.json `vocab_size`;
      ids in [n_tokens, size) are padding rows (pad_to_multiple_of).
    - `rows[i][t]`: model i's row for output id t, or -1 when it lacks the token.
    - `fill[t]`, `donor[t]`: the value a -1 row takes (the same for every model):
      ZERO: 0. COPY: row `rows[donor][t]` of model `donor`. MEAN: over the models j
      having t, ascending j, fl32((x_j1 + x_j2 + ...) / |P|), the sum in float64 from +0
      and the division in float64. PAD: the model's own column mean over output rows
      [0, n_tokens): per column the docs/semantics.md §A reduction over rows (blocks of 16384
      rows, lane = row mod 8), divided by n_tokens in float64, rounded once to float32.
      OWN: no model lacks t.
    """

    source: str
    source_index: int
    base_index: int
    labels: tuple[str, ...]
    in_rows: tuple[int, ...]
    tokens: dict[str, int]
    by_id: dict[int, str]
    added: tuple[AddedToken, ...]
    n_tokens: int
    size: int
    rows: tuple[np.ndarray, ...]
    fill: np.ndarray
    donor: np.ndarray
    strip_at: int | None
    source_dir: Path | None
    notes: tuple[str, ...]

    def identity(self, model: int) -> bool:
        """True when model's rows need no permutation (same rows, same order, same count)."""
        r = self.rows[model]
        return self.in_rows[model] == self.size and bool(np.array_equal(r, np.arange(self.size)))

    def missing(self, model: int) -> list[int]:
        """Output ids the model has no row for (filled by `fill`)."""
        return [int(t) for t in np.nonzero(self.rows[model] < 0)[0]]

    def fill_rule(self, out_id: int) -> str:
        kind = int(self.fill[out_id])
        if kind == COPY:
            return f"copy from {self.labels[int(self.donor[out_id])]}"
        if kind == MEAN:
            have = [self.labels[j] for j in range(len(self.rows)) if self.rows[j][out_id] >= 0]
            return "mean of " + ", ".join(have)
        return FILL_NAMES[kind]


def _resolve_source(source, labels: Sequence[str], base_index: int) -> tuple[str, int]:
    if source == "base":
        return "base", base_index
    if source == "union":
        return "union", base_index
    if type(source) is int and 0 <= source < len(labels):
        return labels[source], source
    if isinstance(source, str) and source in labels:
        return source, list(labels).index(source)
    raise RecipeError(f"unknown tokenizer source {source!r}",
                      hint="use 'base', 'union' or the name of one of the merged models: " + ", ".join(labels))


def build_output_vocab(source, tokenizers: Sequence[tuple[str, Tokenizer]], base_index: int | None = None,
                       pad_to_multiple_of: int | None = None) -> OutputVocab:
    """The output vocabulary for `source` ('base', 'union', a model label or index) and every model's row map.

    `tokenizers`: (label, Tokenizer) per input model in recipe order, the base included;
    `base_index`: the base's position (None: the first model plays the base, as mergekit).
    """
    if not tokenizers:
        raise RecipeError("no models to build a vocabulary from")
    labels = tuple(label for label, _ in tokenizers)
    toks = [t for _, t in tokenizers]
    base = 0 if base_index is None else base_index
    if not 0 <= base < len(toks):
        raise ValueError(f"base_index {base_index} out of range")
    if pad_to_multiple_of is not None and (type(pad_to_multiple_of) is not int or pad_to_multiple_of < 1):
        raise RecipeError(f"pad_to_multiple_of must be a positive integer, not {pad_to_multiple_of!r}")
    name, src = _resolve_source(source, labels, base)
    notes: list[str] = []
    for label, t in tokenizers:
        if t.assumed_from is not None:
            notes.append(f"{label} has no tokenizer.json: its vocabulary is assumed to be the base's "
                         f"({t.assumed_from})")

    base_tok = toks[base]
    strip_at = None
    if name == "union" or name == "base":
        tokens = {t: i for t, i in base_tok.vocab.items() if i < base_tok.rows}
        added = {a.content: a for a in base_tok.added if a.id < base_tok.rows}
        if len(tokens) < len(base_tok.vocab):
            strip_at = base_tok.rows
            dropped = sorted((i, t) for t, i in base_tok.vocab.items() if i >= base_tok.rows)
            notes.append(f"{len(dropped)} token(s) of the base's tokenizer have ids beyond its {base_tok.rows} "
                         f"embedding rows and are left out: " + _some(f"{i} {t!r}" for i, t in dropped))
    else:
        tokens = dict(toks[src].vocab)
        added = {a.content: a for a in toks[src].added}
    if name == "union":
        _union(tokens, added, toks, base, notes)

    # One token names each id: an added token, else the first in file order (a renamed
    # reserved token can leave its old name in model.vocab at the same id).
    names: dict[int, str] = {}
    for tok, i in tokens.items():
        names.setdefault(i, tok)
    for content in added:
        names[tokens[content]] = content
    n_tokens = max(names, default=-1) + 1
    size = n_tokens
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    _check_size(names, n_tokens, size, pad_to_multiple_of, toks[src])
    holes = n_tokens - len(names)
    if holes:
        notes.append(f"{holes} id(s) below {n_tokens} name no token of the output vocabulary: their rows are zero")

    rows = []
    for t in toks:
        r = np.full(size, -1, dtype=np.int64)
        for oid, tok in names.items():
            mid = t.vocab.get(tok)
            if mid is not None and mid < t.rows:
                r[oid] = mid
        r.flags.writeable = False
        rows.append(r)
    present = np.stack(rows) >= 0
    count = present.sum(axis=0)
    fill = np.full(size, OWN, dtype=np.int8)
    donor = np.full(size, -1, dtype=np.int64)
    lacking = count < len(toks)
    fill[lacking & (count == 0)] = ZERO
    single = lacking & (count == 1)
    fill[single] = COPY
    donor[single] = np.argmax(present[:, single], axis=0)
    with_base = lacking & (count > 1) & present[base]
    fill[with_base] = COPY
    donor[with_base] = base
    fill[lacking & (count > 1) & ~present[base]] = MEAN
    fill[n_tokens:] = PAD
    fill.flags.writeable = False
    donor.flags.writeable = False

    added_out = tuple(sorted((replace(a, id=tokens[c]) for c, a in added.items()), key=lambda a: a.id))
    vocab = OutputVocab(name, src, base, labels, tuple(t.rows for t in toks), tokens, names, added_out, n_tokens,
                        size, tuple(rows), fill, donor, strip_at, toks[src].assumed_from or toks[src].path, ())
    return replace(vocab, notes=tuple(notes + _summary(vocab, toks)))


def _check_size(names: dict[int, str], n_tokens: int, size: int, pad: int | None, source: Tokenizer) -> None:
    """Refuse, before any table of `size` entries exists, an output vocabulary that is
    mostly rows without a token: an id far beyond the others (10**9 would be an 8 GB row
    map per model, and an output that large) or a padding multiple larger than the vocabulary."""
    if n_tokens - len(names) > len(names) + VOCAB_SLACK:
        far = max(names)
        raise InvalidCheckpoint(
            f"{source.label}/tokenizer.json: token {shown(names[far])} has id {far:,}, far beyond the other {len(names) - 1:,} "
            f"tokens: the output vocabulary would have {n_tokens:,} rows",
            hint="the tokenizer file is damaged, or not this model's; fetch it again or choose another tokenizer source")
    if size - n_tokens > n_tokens + VOCAB_SLACK:
        raise RecipeError(f"tokenizer.pad_to_multiple_of {pad:,} would pad {n_tokens:,} token rows to {size:,}",
                          hint="padding is for hardware alignment: a multiple such as 64 or 128")


def _union(tokens: dict, added: dict, toks: Sequence[Tokenizer], base: int, notes: list) -> None:
    """mergekit's build_union_tokenizer on top of the (stripped) base vocabulary, in place.

    Models in order base first, then the others in recipe order; within a model, ids
    ascending (mergekit walks a hash map here, so its order for new tokens is arbitrary;
    this order is npmerge's, deterministic). New plain tokens come first, added tokens
    after; a token gets `1 + the largest id in use` (the tokenizers library's rule when
    ids are contiguous).
    """
    order = [base] + [i for i in range(len(toks)) if i != base]
    union_added: dict[str, AddedToken] = {}
    plain: dict[str, None] = {}
    for i in order:
        t = toks[i]
        if t.assumed_from is not None:
            continue  # mergekit skips a model whose tokenizer it could not load
        for tok, tid in sorted(t.vocab.items(), key=lambda kv: (kv[1], kv[0])):
            if tid < t.rows and tok not in t.added_by_content:
                plain.setdefault(tok)
        for a in t.added:
            if a.id < t.rows:
                union_added.setdefault(a.content, a)
    next_id = max(tokens.values(), default=-1) + 1
    new: list[str] = []
    for tok in plain:
        if tok in union_added or tok in tokens:
            continue
        tokens[tok] = next_id
        added[tok] = AddedToken(next_id, tok)  # transformers' add_tokens(str): normalized, not special
        next_id += 1
        new.append(tok)
    for content, a in union_added.items():
        if content in tokens:
            if content not in added:  # a plain token of the base is an added token elsewhere
                added[content] = replace(a, id=tokens[content])
            continue
        tokens[content] = next_id
        added[content] = replace(a, id=next_id)
        next_id += 1
        new.append(content)
    if new:
        notes.append(f"union vocabulary: {len(new)} token(s) beyond the base's: " + _some(repr(t) for t in new))


def _some(items, limit: int = 8) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _summary(v: OutputVocab, toks: Sequence[Tokenizer]) -> list[str]:
    """One note per model whose rows are not used as they are."""
    out = [f"output vocabulary ({v.source}): {v.n_tokens} token ids, {v.size} rows"
           + (f" (padded from {v.n_tokens})" if v.size != v.n_tokens else "")]
    for i, label in enumerate(v.labels):
        if v.identity(i):
            continue
        miss = [t for t in v.missing(i) if t < v.n_tokens and t in v.by_id]
        moved = int(np.count_nonzero((v.rows[i] >= 0) & (v.rows[i] != np.arange(v.size))))
        unused = v.in_rows[i] - int(np.count_nonzero(v.rows[i] >= 0))
        parts = []
        if moved:
            parts.append(f"{moved} row(s) move to other ids")
        if miss:
            parts.append(f"lacks {len(miss)} token(s), filled per mergekit's rule: "
                         + _some(f"{v.by_id[t]!r} ({v.fill_rule(t)})" for t in miss))
        if unused > 0:
            parts.append(f"{unused} of its {v.in_rows[i]} rows are not in the output")
        if parts:
            out.append(f"{label}: " + "; ".join(parts))
    return out


# ---------------------------------------------------------------- comparing (no source)


@dataclass(frozen=True)
class VocabDiff:
    """How a model's tokenizer differs from the output's over the shared row range [0, rows)."""

    label: str
    in_padding: tuple[tuple[int, str], ...]  # (id, model token): the output has no token there (padded row)
    conflicts: tuple[tuple[int, str, str], ...]  # (id, output token, model token): different tokens, same id
    unused: tuple[tuple[int, str], ...]  # (id, output token): the model has no token there

    def __bool__(self) -> bool:
        return bool(self.in_padding or self.conflicts or self.unused)

    def note(self) -> str | None:
        """The report / stderr line for tokens that differ inside padded rows (None if none)."""
        if not self.in_padding:
            return None
        return (f"{self.label} uses {len(self.in_padding)} padded row(s) for tokens the output tokenizer lacks: "
                + _some(f"{i} {t!r}" for i, t in self.in_padding)
                + "; these rows are merged by position and the tokens are not in the output tokenizer "
                  "(--tokenizer-source / tokenizer_source: union keeps them)")

    def error(self) -> IncompatibleModels | None:
        """The refusal when both use an id for different tokens (merging by position would mix tokens)."""
        if not self.conflicts:
            return None
        return IncompatibleModels(
            f"{self.label} has other tokens at the same ids as the output vocabulary: "
            + _some(f"{i} {a!r} vs {b!r}" for i, a, b in self.conflicts),
            hint="match rows by token, not by position: --tokenizer-source (tokenizer_source: in a recipe) base, "
                 "union or a model")


def compare_vocabs(output: Tokenizer, model: Tokenizer, label: str, rows: int | None = None) -> VocabDiff:
    """Compare by id over [0, rows) (default: both row counts' minimum): equal shapes, different tokens."""
    n = min(output.rows, model.rows) if rows is None else rows
    a = {i: t for i, t in output.by_id.items() if i < n}
    b = {i: t for i, t in model.by_id.items() if i < n}
    pad, conflicts, unused = [], [], []
    for i in sorted(a.keys() | b.keys()):
        x, y = a.get(i), b.get(i)
        if x == y:
            continue
        if x is None:
            pad.append((i, y))
        elif y is None:
            unused.append((i, x))
        else:
            conflicts.append((i, x, y))
    return VocabDiff(label, tuple(pad), tuple(conflicts), tuple(unused))


# ------------------------------------------------------------------- tokenizer files


def write_tokenizer_files(vocab: OutputVocab, source_dir=None) -> dict[str, bytes]:
    """The output's tokenizer files, built from `source_dir` (the source tokenizer's model directory).

    `source_dir` defaults to the directory the source tokenizer was read from. Files the
    output vocabulary leaves unchanged are copied byte for byte. tokenizer.json
    is rewritten when tokens were stripped (ids >= the base's rows) or added (union);
    tokenizer_config.json's `added_tokens_decoder` (and added_tokens.json, if present)
    then follow; the source's chat template is kept. Slow-tokenizer files
    (tokenizer.model, vocab.json, merges.txt) are copied as they are, as mergekit's
    save_pretrained does.
    """
    root = Path(source_dir if source_dir is not None else vocab.source_dir)
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
    changed = vocab.strip_at is not None or [a.entry() for a in source_added] != [a.entry() for a in vocab.added]
    if not changed:
        return out
    model = data["model"]
    if vocab.strip_at is not None:
        _strip_model(model, vocab.strip_at)
    data["added_tokens"] = [a.entry() for a in vocab.added]
    out["tokenizer.json"] = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    decoder = {str(a.id): a.settings() for a in vocab.added}
    if "tokenizer_config.json" in out:
        tc = json.loads(out["tokenizer_config.json"].decode("utf-8"))
        tc["added_tokens_decoder"] = decoder
        out["tokenizer_config.json"] = (json.dumps(tc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    if "added_tokens.json" in out:  # slow-tokenizer convention: the added tokens beyond the model vocab
        base_size = len(model["vocab"])
        extra = {a.content: a.id for a in vocab.added if a.id >= base_size}
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


# ----------------------------------------------------------------- the tensor source


class PermutedRows:
    """One model's vocabulary-sized tensor in output-vocabulary row order: a tensor source.

    `tensors[j]` = (raw, code): input j's copy of the same tensor as a 2-D raw storage
    view [in_rows[j], hidden] (as `SafetensorsFile.view` returns it) and its safetensors
    dtype; None for inputs never read (only the model itself and the donors of its
    COPY/MEAN rows are). `read` touches only the rows it returns.
    """

    def __init__(self, vocab: OutputVocab, model: int, tensors: Sequence[tuple[np.ndarray, str] | None],
                 chunk: int = 1 << 20):
        if len(tensors) != len(vocab.rows):
            raise ValueError(f"need one tensor entry per input model ({len(vocab.rows)}), got {len(tensors)}")
        self.vocab = vocab
        self.model = model
        self.map = vocab.rows[model]
        hidden = None
        for j, t in enumerate(tensors):
            if t is None:
                continue
            raw, _code = t
            if not raw.flags.c_contiguous:
                raise ValueError(f"tensor of {vocab.labels[j]} must be a C-contiguous view (as the file maps it)")
            if raw.ndim != 2 or raw.shape[0] != vocab.in_rows[j]:
                raise ValueError(f"tensor of {vocab.labels[j]} has shape {raw.shape}, expected "
                                 f"[{vocab.in_rows[j]}, hidden]")
            if hidden is not None and raw.shape[1] != hidden:
                raise ValueError(f"tensor of {vocab.labels[j]} has {raw.shape[1]} columns, expected {hidden}")
            hidden = raw.shape[1]
        if tensors[model] is None:
            raise ValueError(f"the tensor of {vocab.labels[model]} itself is required")
        self.tensors = list(tensors)
        self.hidden = int(hidden)
        self.shape = (vocab.size, self.hidden)
        self.numel = vocab.size * self.hidden
        self.chunk = max(1, int(chunk))  # elements per step of the padding-row pass (its scratch: see work_bytes)
        self._pad: np.ndarray | None = None

    # -- public ------------------------------------------------------------
    def read(self, start: int, n: int, out: np.ndarray, minus: np.ndarray | None = None) -> None:
        """out[:n] = elements [start, start+n) of the permuted tensor (flat, row-major), minus `minus` if given.

        One float32 subtraction per element for `minus` (a float32 array of length n).
        Runs of consecutive input rows are decoded straight into `out`; filled rows go
        through a temporary of at most n + 2 * hidden floats.
        """
        if start < 0 or n < 0 or start + n > self.numel:
            raise ValueError(f"elements [{start}, {start + n}) outside the tensor's {self.numel}")
        if out.dtype != np.float32 or out.ndim != 1 or out.shape[0] != n:
            raise ValueError("out must be a 1-D float32 array of length n")
        if n == 0:
            return
        from ..dtypes import decode

        h = self.hidden
        r0, r1 = start // h, (start + n - 1) // h + 1
        idx = self.map[r0:r1]
        own = idx >= 0
        # runs of output rows that are consecutive input rows (one slice of the input), or filled rows
        cut = np.nonzero((own[1:] != own[:-1]) | (own[1:] & (idx[1:] != idx[:-1] + 1)))[0] + 1
        bounds = [0, *cut.tolist(), len(idx)]
        raw, code = self.tensors[self.model]
        flat = raw.reshape(-1)
        for a, b in zip(bounds[:-1], bounds[1:]):
            e0, e1 = max(start, (r0 + a) * h), min(start + n, (r0 + b) * h)
            o0, o1 = e0 - start, e1 - start
            base = None if minus is None else minus[o0:o1]
            if own[a]:
                s0 = int(idx[a]) * h + e0 - (r0 + a) * h
                decode(flat[s0:s0 + (e1 - e0)], code, out[o0:o1], base)
            else:
                block = self.rows(r0 + a, r0 + b).reshape(-1)
                piece = block[e0 - (r0 + a) * h:e1 - (r0 + a) * h]
                if base is None:
                    out[o0:o1] = piece
                else:
                    np.subtract(piece, base, out=out[o0:o1])

    def rows(self, a: int, b: int) -> np.ndarray:
        """Output rows [a, b) as a new float32 array [b - a, hidden]."""
        res = np.empty((b - a, self.hidden), dtype=np.float32)
        idx = self.map[a:b]
        own = idx >= 0
        if own.all():
            res[:] = self._decode(self.model, idx)
            return res
        if own.any():
            res[own] = self._decode(self.model, idx[own])
        where = np.nonzero(~own)[0]
        ids = where + a
        kinds = self.vocab.fill[ids]
        for kind in np.unique(kinds):
            sel = kinds == kind
            pos, tid = where[sel], ids[sel]
            if kind == ZERO:
                res[pos] = 0.0
            elif kind == COPY:
                donors = self.vocab.donor[tid]
                for j in np.unique(donors):
                    d = donors == j
                    res[pos[d]] = self._decode(int(j), self.vocab.rows[j][tid[d]])
            elif kind == MEAN:
                res[pos] = self._mean(tid)
            elif kind == PAD:
                res[pos] = self.pad_row()
            else:  # OWN cannot reach here: the model has the row
                raise AssertionError(f"fill kind {kind} for a missing row")
        return res

    def fingerprint(self) -> str:
        """Identifies the row mapping (not the input bytes): resume must not mix two vocabularies."""
        return row_map_fingerprint(self.vocab, self.model, self.hidden)

    def pad_row(self) -> np.ndarray:
        """The value of padding rows: per column, the docs/semantics.md §A mean over output rows [0, n_tokens)
        (computed once, `chunk` elements at a time)."""
        if self._pad is None:
            self._pad = _column_mean(self, self.vocab.n_tokens)
        return self._pad

    @staticmethod
    def work_bytes(vocab: OutputVocab, hidden: int, n: int, chunk: int) -> int:
        """Scratch one read() of n elements may allocate, the padding-row pass (with `chunk`) included.

        Filled rows (at most n + 2 * hidden elements) cost up to ~40 bytes per element
        (the float32 rows, a raw copy and its float32 decode, a MEAN row's float64 sum and
        its temporaries); decoding in place costs nothing beyond a possible copy of an
        unaligned raw range (8 bytes per element at most).
        """
        read = 40 * (n + 2 * hidden) + 8 * n
        if vocab.size == vocab.n_tokens:
            return read
        blocks = -(-vocab.n_tokens // BLOCK)
        step = max(chunk, _LANES * hidden) + 2 * hidden
        return read + 40 * step + 16 * hidden * (blocks + 6)

    # -- internals ------------------------------------------------------------
    def _decode(self, j: int, row_idx: np.ndarray) -> np.ndarray:
        from ..dtypes import decode

        t = self.tensors[j]
        if t is None:
            who = self.vocab.labels[self.model]
            raise ValueError(f"the tensor of {self.vocab.labels[j]} is needed for {who}'s rows")
        raw, code = t
        picked = np.ascontiguousarray(raw[np.asarray(row_idx, dtype=np.int64)])
        out = np.empty(picked.size, dtype=np.float32)
        decode(picked.reshape(-1), code, out)
        return out.reshape(len(row_idx), self.hidden)

    def _mean(self, tid: np.ndarray) -> np.ndarray:
        acc = np.zeros((len(tid), self.hidden), dtype=np.float64)
        count = np.zeros(len(tid), dtype=np.int64)
        for j, r in enumerate(self.vocab.rows):
            have = r[tid] >= 0
            if have.any():
                acc[have] += self._decode(j, r[tid[have]])
                count += have
        return (acc / count[:, None]).astype(np.float32)


class VocabRowsSource(TensorSource):
    """A model's vocabulary-sized tensor as the engine reads it (a computed source): its
    rows in output-vocabulary order, `PermutedRows` over the inputs' feeding tensors.

    `inputs[j]`: input j's source of the same output tensor (a tied model's embeddings
    for `lm_head`), or None. Only the model itself and the donors of the rows it lacks
    are read. The row reader is built at the first read, with the engine's span as the
    padding pass's step, and dropped on release().
    """

    def __init__(self, vocab: OutputVocab, model: int, inputs: Sequence[TensorSource | None], label: str):
        own = inputs[model]
        self.vocab, self.model, self.inputs = vocab, model, list(inputs)
        self.label = label
        self.name = own.name
        self.dtype = own.dtype
        self.hidden = int(own.shape[1])
        self.shape = (vocab.size, self.hidden)
        lacking = vocab.rows[model] < 0
        need = {model}
        need.update(int(j) for j in np.unique(vocab.donor[lacking & (vocab.fill == COPY)]))
        if (lacking & (vocab.fill == MEAN)).any():
            mean = lacking & (vocab.fill == MEAN)
            need.update(j for j, r in enumerate(vocab.rows) if (r[mean] >= 0).any())
        self.needed = tuple(sorted(need))
        missing = [j for j in self.needed if self.inputs[j] is None]
        if missing:
            raise ValueError(f"rows of {label} need the tensors of " + ", ".join(vocab.labels[j] for j in missing))
        computed = next((self.inputs[j] for j in self.needed if self.inputs[j].raw() is None), None)
        if computed is not None:
            raise IncompatibleModels(f"'{computed.name}' of {computed.label} is computed, not stored (a LoRA "
                                     "adapter?): its rows cannot be mapped to the output vocabulary",
                                     hint="merge the adapter into its model first, or merge without a tokenizer "
                                          "source")
        self._rows: PermutedRows | None = None

    @property
    def nbytes(self) -> int:
        return self.inputs[self.model].nbytes

    def read(self, start: int, n: int, out: np.ndarray) -> None:
        if self._rows is None:
            views = [self._view(j) if j in self.needed else None for j in range(len(self.inputs))]
            self._rows = PermutedRows(self.vocab, self.model, views, chunk=max(n, out.shape[0]))
        self._rows.read(start, n, out[:n])

    def work_bytes(self, n: int) -> int:
        return PermutedRows.work_bytes(self.vocab, self.hidden, n, n)

    def fingerprint(self) -> str:
        return row_map_fingerprint(self.vocab, self.model, self.hidden)

    def prefetch(self) -> None:
        for j in self.needed:
            self.inputs[j].prefetch()

    def release(self) -> None:
        self._rows = None
        for j in self.needed:
            self.inputs[j].release()

    def _view(self, j: int) -> tuple[np.ndarray, str]:
        src = self.inputs[j]
        return src.raw().reshape(src.shape), src.dtype


def row_map_fingerprint(vocab: OutputVocab, model: int, hidden: int) -> str:
    """sha256 of model's row map, the fill rules and the sizes (PermutedRows.fingerprint)."""
    h = hashlib.sha256(f"{model}:{vocab.size}:{vocab.n_tokens}:{hidden}".encode())
    for a in (*vocab.rows, vocab.fill, vocab.donor):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _column_mean(src: PermutedRows, n: int) -> np.ndarray:
    """Per column of output rows [0, n): fl32(sum / n), the sum by the docs/semantics.md §A rule over rows."""
    h = src.hidden
    if n == 0:
        return np.zeros(h, dtype=np.float32)
    step = max(_LANES, src.chunk // max(h, 1) // _LANES * _LANES)  # rows per decoded piece, a multiple of 8
    block_sums = []
    for b0 in range(0, n, BLOCK):
        b1 = min(n, b0 + BLOCK)
        acc = np.zeros((_LANES, h), dtype=np.float64)
        for p0 in range(b0, b1, step):
            x = src.rows(p0, min(b1, p0 + step))
            for k in range(0, x.shape[0], _LANES):
                m = min(_LANES, x.shape[0] - k)
                acc[:m] += x[k:k + m]
        block_sums.append(combine_lanes(acc.T))
    sums = np.stack(block_sums, axis=1)
    total = np.array([exact_sum(col) for col in sums], dtype=np.float64)
    return (total / n).astype(np.float32)

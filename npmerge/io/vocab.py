"""The vocabulary rules: a merge's output vocabulary and the row maps that turn each
model's embedding / head rows into output-vocabulary order.

Fine-tunes that added tokens have embedding and head tensors with other row counts or
other row orders than their base. mergekit (`tokenizer_source: base | union | <model>`)
builds one output vocabulary and permutes every model's rows to it before merging; this
module decides the same in plain Python/NumPy so that the planner can plan it; the
tokenizers come from io/tokenizer.py and the engine reads the permuted rows in bounded
memory through io/vocab_rows.py.

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

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..constants import VOCAB_SLACK
from ..errors import IncompatibleModels, InvalidCheckpoint, RecipeError, shown
from .tokenizer import AddedToken, Tokenizer

# Fill rules for an output row a model lacks (OutputVocab.fill).
OWN, ZERO, COPY, MEAN, PAD = 0, 1, 2, 3, 4
FILL_NAMES = {OWN: "own", ZERO: "zero", COPY: "copy", MEAN: "mean", PAD: "pad"}


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

"""npmerge.io.tokenizer, .vocab and .vocab_rows: reading tokenizers, the output vocabulary (mergekit's tokenizer_source),
row maps, the permuted-rows tensor source, tokenizer files and the padded-rows check.

Expected tables are written out by hand from the fixtures (scripts/fixtures_vocab.py);
permuted tensors are checked bit for bit against tests/reference.py's whole-tensor
permutation, which reads the tokenizers and builds the output vocabulary on its own; the union's ids and the
written files are checked with the `tokenizers` library (the Rust implementation
transformers and mergekit use).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from npmerge.constants import VOCAB_SLACK
from npmerge.errors import IncompatibleModels, InvalidCheckpoint, RecipeError
from npmerge.io.safetensors import SafetensorsFile
from npmerge.io.tokenizer import TOKENIZER_FILES, AddedToken, Tokenizer, read_tokenizer, write_tokenizer_files
from npmerge.io.vocab import COPY, MEAN, OWN, PAD, ZERO, build_output_vocab, compare_vocabs
from npmerge.io.vocab_rows import PermutedRows, row_map_fingerprint

import reference as ref
from conftest import FIXTURES

VOCAB = FIXTURES / "tiny-vocab"
MODELS = ("base", "ft-chat", "ft-tool")
NEW = ("zorba", "<|im_start|>", "<|im_end|>", "<tool>")


def _toks(family=VOCAB, models=MODELS):
    return [(m, read_tokenizer(family / m)) for m in models]


def _mem(tokens, rows=None, added=()):
    """An in-memory tokenizer: `tokens` in id order (None leaves a hole); `added` = contents among them."""
    vocab = {t: i for i, t in enumerate(tokens) if t is not None}
    adds = tuple(AddedToken(vocab[c], c, normalized=False, special=True) for c in added)
    return Tokenizer(None, vocab, adds, len(tokens) if rows is None else rows, "WordLevel", len(vocab))


# ----------------------------------------------------------------------------- reading


def test_read_fixture_tokenizers():
    base, chat, tool = (t for _, t in _toks())
    assert (len(base.vocab), base.rows, base.model_type) == (80, 80, "WordLevel")
    assert [(a.id, a.content, a.special) for a in base.added] == [(0, "<unk>", True), (1, "<s>", True),
                                                                   (2, "</s>", True)]
    assert (chat.rows, chat.vocab["<|im_start|>"], chat.vocab["<|im_end|>"]) == (82, 80, 81)
    assert (tool.rows, tool.vocab["zorba"], tool.vocab["<tool>"], tool.vocab["<|im_start|>"]) == (83, 80, 81, 82)
    assert tool.model_size == 81 and "zorba" not in tool.added_by_content
    assert chat.chat_template.startswith("{% for message in messages %}") and "<|im_end|>" in chat.chat_template
    assert base.chat_template is None
    assert read_tokenizer(VOCAB / "ft-chat", rows=90).rows == 90


def test_missing_tokenizer_is_a_clear_error_or_assumes_the_fallback(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"vocab_size": 77}')
    with pytest.raises(InvalidCheckpoint, match="no tokenizer.json in") as e:
        read_tokenizer(d)
    assert str(d) in e.value.message and "tokenizer.json" in e.value.hint
    (d / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(InvalidCheckpoint) as e:
        read_tokenizer(d)
    assert "slow tokenizer (tokenizer.model)" in e.value.hint
    base = read_tokenizer(VOCAB / "base")
    assumed = read_tokenizer(d, fallback=base)
    assert assumed.assumed_from == VOCAB / "base" and assumed.rows == 77 and assumed.vocab == base.vocab
    v = build_output_vocab("union", [("base", base), ("bare", assumed)], 0)
    assert any("bare has no tokenizer.json" in n for n in v.notes)
    assert v.rows[1].tolist() == list(range(77)) + [-1, -1, -1]
    assert build_output_vocab("bare", [("base", base), ("bare", assumed)], 0).source_dir == VOCAB / "base"


def test_read_rejects_damaged_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InvalidCheckpoint, match="not valid JSON"):
        read_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(InvalidCheckpoint, match="no 'model.vocab'"):
        read_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": -1}}}))
    with pytest.raises(InvalidCheckpoint, match="invalid id"):
        read_tokenizer(tmp_path)


def test_read_unigram_and_tokenizer_config_added_tokens(tmp_path):
    tj = {"added_tokens": [{"id": 0, "content": "<pad>", "special": True}],
          "model": {"type": "Unigram", "vocab": [["<pad>", 0.0], ["a", -1.5], ["b", -2.0]]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tc = {"added_tokens_decoder": {"0": {"content": "<pad>", "special": True},
                                   "3": {"content": "<extra>", "special": True, "normalized": False}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    t = read_tokenizer(tmp_path)
    assert t.vocab == {"<pad>": 0, "a": 1, "b": 2, "<extra>": 3}
    assert (t.rows, t.model_type, [a.content for a in t.added]) == (4, "Unigram", ["<pad>", "<extra>"])
    assert t.added[0].normalized is False  # absent flag: not special -> normalized, special -> not
    tc["added_tokens_decoder"]["0"]["content"] = "<other>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(InvalidCheckpoint, match="disagree: id 0 is '<pad>' in tokenizer.json and '<other>'"):
        read_tokenizer(tmp_path)


# ------------------------------------------------------------------ output vocabulary

BASE_IDS = list(range(80))
EXPECTED = {
    # source: (n_tokens, {id: token} beyond 79, rows of base / ft-chat / ft-tool beyond 77, fill beyond 79, donors)
    "base": (80, {}, [[78, 79], [78, 79], [78, 79]], [], []),
    "union": (84, {80: "zorba", 81: "<|im_start|>", 82: "<|im_end|>", 83: "<tool>"},
              [[78, 79, -1, -1, -1, -1], [78, 79, -1, 80, 81, -1], [78, 79, 80, 82, -1, 81]],
              [COPY, MEAN, COPY, COPY], [2, -1, 1, 2]),
    "ft-chat": (82, {80: "<|im_start|>", 81: "<|im_end|>"},
                [[78, 79, -1, -1], [78, 79, 80, 81], [78, 79, 82, -1]], [MEAN, COPY], [-1, 1]),
    "ft-tool": (83, {80: "zorba", 81: "<tool>", 82: "<|im_start|>"},
                [[78, 79, -1, -1, -1], [78, 79, -1, -1, 80], [78, 79, 80, 81, 82]], [COPY, COPY, MEAN], [2, 2, -1]),
}


@pytest.mark.parametrize("source", list(EXPECTED))
def test_output_vocab_against_hand_written_tables(source):
    n, new, tail_rows, fill, donors = EXPECTED[source]
    v = build_output_vocab(source, _toks(), base_index=0)
    base = read_tokenizer(VOCAB / "base")
    assert (v.n_tokens, v.size) == (n, n)
    assert {i: v.by_id[i] for i in range(80)} == {i: base.by_id[i] for i in range(80)}
    assert {i: v.by_id[i] for i in range(80, n)} == new
    assert len(v.tokens) == n and sorted(v.tokens.values()) == list(range(n))
    for i, expected in enumerate(tail_rows):
        assert v.rows[i][:78].tolist() == BASE_IDS[:78]
        assert v.rows[i][78:].tolist() == expected, v.labels[i]
    assert v.fill[:80].tolist() == [OWN] * 80
    assert v.fill[80:].tolist() == fill and v.donor[80:].tolist() == donors
    assert v.donor[:80].tolist() == [-1] * 80
    # a union adds a new plain word as a normal added token (transformers' add_tokens(str))
    plain = {"zorba"} if source != "union" else set()
    assert [a.content for a in v.added] == ["<unk>", "<s>", "</s>"] + [t for t in new.values() if t not in plain]
    assert [a.content for a in v.added if not a.special] == (["zorba"] if source == "union" else [])
    assert v.source_dir == (VOCAB / (source if source.startswith("ft") else "base"))


def test_union_ids_match_the_tokenizers_library():
    """Replay mergekit's build_union_tokenizer with the Rust tokenizers library on the base's tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    res = tokenizers.Tokenizer.from_file(str(VOCAB / "base" / "tokenizer.json"))
    res.add_tokens(["zorba"])  # plain tokens not in the base (mergekit: res.add_tokens(tok))
    for m in ("ft-chat", "ft-tool"):  # then every model's added tokens, first settings win
        for a in json.loads((VOCAB / m / "tokenizer.json").read_text())["added_tokens"]:
            res.add_tokens([tokenizers.AddedToken(a["content"], special=a["special"], normalized=a["normalized"])])
    v = build_output_vocab("union", _toks(), 0)
    assert res.get_vocab(with_added_tokens=True) == v.tokens
    assert res.get_vocab_size(with_added_tokens=True) == v.size == 84


def test_base_source_strips_tokens_beyond_the_rows_and_union_skips_them():
    # mergekit's tests/test_tokenizer.py: a "padded" tokenizer lists tokens past config vocab_size
    base = _mem(["<unk>", "a", "b", "c", "<U0>", "<U1>"], rows=4, added=("<unk>", "<U0>", "<U1>"))
    chat = _mem(["<unk>", "a", "b", "c", "<im>"], added=("<unk>", "<im>"))
    padded = _mem(["<unk>", "a", "b", "c", "<X0>", "<X1>"], rows=4, added=("<unk>", "<X0>", "<X1>"))
    toks = [("base", base), ("chat", chat), ("padded", padded)]
    v = build_output_vocab("base", toks, 0)
    assert (v.size, v.strip_at, v.by_id) == (4, 4, {0: "<unk>", 1: "a", 2: "b", 3: "c"})
    assert any("left out: 4 '<U0>', 5 '<U1>'" in n for n in v.notes)
    u = build_output_vocab("union", toks, 0)
    assert u.by_id == {0: "<unk>", 1: "a", 2: "b", 3: "c", 4: "<im>"}
    assert [a.content for a in u.added] == ["<unk>", "<im>"]
    assert u.rows[2].tolist() == [0, 1, 2, 3, -1] and (u.fill[4], u.donor[4]) == (COPY, 1)
    m = build_output_vocab("padded", toks, 0)  # a model source is not stripped
    assert (m.size, m.strip_at) == (6, None)
    assert m.rows[2].tolist() == [0, 1, 2, 3, -1, -1] and m.fill[4:].tolist() == [ZERO, ZERO]


def test_fill_rules_zero_copy_base_mean_and_no_base():
    a = _mem(["x", "y", None, None, None])  # rows 5, tokens x y
    b = _mem(["x", "y", "p", "q", None])
    c = _mem(["x", "y", "q", "p", "r"])
    d = _mem(["x", "y", "r"])
    toks = [("a", a), ("b", b), ("c", c), ("d", d)]
    v = build_output_vocab("c", toks, base_index=1)
    # p: b, c -> b is the base: copy b. q: b, c -> copy b. r: c, d (no base) -> mean.
    assert [v.by_id[i] for i in range(5)] == ["x", "y", "q", "p", "r"]
    assert v.fill.tolist() == [OWN, OWN, COPY, COPY, MEAN] and v.donor.tolist() == [-1, -1, 1, 1, -1]
    w = build_output_vocab("c", toks, base_index=0)  # base a has none of p, q, r
    assert w.fill.tolist() == [OWN, OWN, MEAN, MEAN, MEAN]
    assert w.fill_rule(4) == "mean of c, d" and w.fill_rule(2) == "mean of b, c"
    n = build_output_vocab("c", toks, base_index=None)  # no base: the first model plays it
    assert n.base_index == 0 and n.fill.tolist() == w.fill.tolist()
    single = build_output_vocab("c", [("a", a), ("c", c)], 0)
    assert single.fill.tolist() == [OWN, OWN, COPY, COPY, COPY] and single.donor.tolist()[2:] == [1, 1, 1]


def test_pad_to_multiple_of_holes_and_errors():
    t = _mem(["a", "b", None, "d"])  # id 2 is a hole
    v = build_output_vocab("base", [("m", t)], 0, pad_to_multiple_of=3)
    assert (v.n_tokens, v.size) == (4, 6)
    assert v.fill.tolist() == [OWN, OWN, ZERO, OWN, PAD, PAD]
    assert any("1 id(s) below 4 name no token" in n for n in v.notes)
    assert build_output_vocab("base", [("m", t)], 0, pad_to_multiple_of=2).size == 4
    with pytest.raises(RecipeError, match="unknown tokenizer source 'nope'") as e:
        build_output_vocab("nope", [("m", t)], 0)
    assert "base, union" not in e.value.hint and "m" in e.value.hint
    with pytest.raises(RecipeError, match="pad_to_multiple_of"):
        build_output_vocab("base", [("m", t)], 0, pad_to_multiple_of=0)


def test_vocabulary_mostly_without_tokens_is_refused_before_any_table():
    """Rows naming no token may exceed those that do by VOCAB_SLACK: the bound is accepted,
    one more refused (an id far beyond the others, or a padding multiple)."""
    def source_with_far_id(far: int):
        return _mem(["a", "b"], rows=2), Tokenizer(None, {"a": 0, "b": 1, "far": far}, (), 2, "WordLevel", 3)

    ok = 3 + VOCAB_SLACK + 2  # 3 tokens, ids 0, 1 and ok: 3 + VOCAB_SLACK holes
    base, src = source_with_far_id(ok)
    assert build_output_vocab("src", [("base", base), ("src", src)], 0).size == ok + 1
    base, src = source_with_far_id(ok + 1)
    with pytest.raises(InvalidCheckpoint, match=f"token 'far' has id {ok + 1:,}, far beyond the other 2 tokens"):
        build_output_vocab("src", [("base", base), ("src", src)], 0)
    base, src = source_with_far_id(10**20)
    with pytest.raises(InvalidCheckpoint, match="would have 100,000,000,000,000,000,001 rows"):
        build_output_vocab("src", [("base", base), ("src", src)], 0)
    t = _mem(["a", "b", "c", "d"])
    assert build_output_vocab("base", [("m", t)], 0, pad_to_multiple_of=2 * 4 + VOCAB_SLACK).size == 2 * 4 + VOCAB_SLACK
    with pytest.raises(RecipeError, match=f"pad_to_multiple_of {2 * 4 + VOCAB_SLACK + 1:,} would pad 4 token rows"):
        build_output_vocab("base", [("m", t)], 0, pad_to_multiple_of=2 * 4 + VOCAB_SLACK + 1)


def test_added_token_at_two_ids_is_refused(tmp_path):
    """Listed twice in tokenizer.json, or at one id there and another in tokenizer_config.json."""
    tj = {"added_tokens": [{"id": 2, "content": "<end>", "special": True}, {"id": 1, "content": "<end>", "special": True}],
          "model": {"type": "WordLevel", "vocab": {"a": 0}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InvalidCheckpoint, match="tokenizer.json: added token '<end>' is listed at two ids, 2 and 1"):
        read_tokenizer(tmp_path)
    tj["added_tokens"].pop()
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert read_tokenizer(tmp_path).vocab == {"a": 0, "<end>": 2}
    tc = {"added_tokens_decoder": {"2": {"content": "<end>"}, "5": {"content": "<end>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(InvalidCheckpoint, match="tokenizer_config.json: added token '<end>' is listed at two ids, 2 and 5"):
        read_tokenizer(tmp_path)


def test_renamed_reserved_token_keeps_one_row():
    """A fine-tune renamed a reserved added token; its old name stays in model.vocab at the same id."""
    base = _mem(["<unk>", "a", "<r0>"], added=("<unk>", "<r0>"))
    vocab = {"<unk>": 0, "a": 1, "<r0>": 2, "<im>": 2}
    ft = Tokenizer(None, vocab, (AddedToken(0, "<unk>", special=True), AddedToken(2, "<im>", special=True)), 3)
    v = build_output_vocab("ft", [("base", base), ("ft", ft)], 0)
    assert v.by_id == {0: "<unk>", 1: "a", 2: "<im>"} and v.size == 3
    assert v.rows[0].tolist() == [0, 1, -1] and (v.fill[2], v.donor[2]) == (COPY, 1)
    u = build_output_vocab("union", [("base", base), ("ft", ft)], 0)
    assert u.by_id == {0: "<unk>", 1: "a", 2: "<r0>", 3: "<im>"}
    assert u.rows[1].tolist() == [0, 1, 2, 2]  # both names are row 2 of ft


def test_plain_base_token_added_elsewhere_takes_the_other_settings():
    base = _mem(["<unk>", "a", "<sep>"], added=("<unk>",))
    ft = _mem(["<unk>", "a", "<sep>"], added=("<unk>", "<sep>"))
    u = build_output_vocab("union", [("base", base), ("ft", ft)], 0)
    assert u.size == 3 and [(a.id, a.content, a.special) for a in u.added] == [(0, "<unk>", True), (2, "<sep>", True)]


# -------------------------------------------------------------------- PermutedRows


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _raw(model: str, name: str):
    f = SafetensorsFile(VOCAB / model / "model.safetensors")
    return f.view(name), f.header.tensors[name].dtype.name


def _rule_a_column_mean(x: np.ndarray) -> np.ndarray:
    """docs/semantics.md §A per column, written plainly: lanes e mod 8, 16384-row blocks, exact block total."""
    n, h = x.shape
    out = np.empty(h, dtype=np.float32)
    for c in range(h):
        col = [float(v) for v in x[:, c]]
        blocks = []
        for b0 in range(0, n, 16384):
            lanes = [0.0] * 8
            for e, value in enumerate(col[b0:b0 + 16384]):
                lanes[e % 8] += value
            a = lanes
            blocks.append(((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])))
        out[c] = np.float32(math.fsum(blocks) / n)
    return out


def _splits(total: int, rng) -> list[tuple[int, int]]:
    cuts = sorted(set(rng.integers(0, total, size=int(rng.integers(1, 40))).tolist()) | {0, total})
    return list(zip(cuts[:-1], np.diff(cuts).tolist()))


@pytest.mark.parametrize("source,pad", [("union", None), ("base", None), ("ft-chat", None), ("ft-tool", 64)])
@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_permuted_rows_match_a_whole_tensor_permutation(source, pad, name):
    """Against tests/reference.py, which reads the tokenizers and builds the vocabulary on its own."""
    toks = _toks()
    v = build_output_vocab(source, toks, 0, pad_to_multiple_of=pad)
    vocabs = []
    for m, (_, t) in zip(MODELS, toks):
        vocabs.append(ref.read_vocabulary(VOCAB / m, t.rows, vocabs[0] if vocabs else None))
    which = source if source in ("base", "union") else MODELS.index(source)
    names, n_tokens, size = ref.output_vocabulary(which, vocabs, 0, pad)
    assert (names, n_tokens, size) == (v.by_id, v.n_tokens, v.size)
    raws = [_raw(m, name) for m in MODELS]
    # ft-chat read through an F32 copy: mixed storage dtypes across models
    raws[1] = (_bf16_to_f32(raws[1][0]).copy(), "F32")
    full = [_bf16_to_f32(r) if code == "BF16" else r for r, code in raws]
    rng = np.random.default_rng(hash((source, name)) % 2**32)
    for model in range(3):
        expected = ref.permuted_rows(names, n_tokens, size, vocabs, 0, model, full)
        src = PermutedRows(v, model, raws)
        assert src.shape == expected.shape == (v.size, 32)
        got = np.empty(src.numel, dtype=np.float32)
        for start, n in _splits(src.numel, rng):
            src.read(start, n, got[start:start + n])
        assert np.array_equal(got.view(np.uint32), expected.reshape(-1).view(np.uint32)), (source, name, model)


def test_permuted_rows_padding_mean_over_several_blocks():
    n, hidden = 40000, 3
    t = _mem([f"t{i}" for i in range(n)])
    v = build_output_vocab("base", [("m", t)], 0, pad_to_multiple_of=40008)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((n, hidden)) * np.array([1e-3, 1.0, 1e4])).astype(np.float32)
    # cancellation the order decides: +-1e30 in one lane (rows 0, 8) swallow the small terms
    # between them only in a row-by-row sum; +-1e20 in blocks 1 and 2 cancel only in an
    # exact block total
    x[[0, 8, 16384, 32768], 0] = [1e30, -1e30, 1e20, -1e20]
    x[[1, 16385], 0] = [3.0, 5.0]
    src = PermutedRows(v, 0, [(x, "F32")], chunk=5000)  # the padding pass in pieces of 5000 // 3 // 8 * 8 rows
    expected = _rule_a_column_mean(x)
    assert np.array_equal(src.pad_row().view(np.uint32), expected.view(np.uint32))
    plain = {"vocab": dict(t.vocab), "added": [], "rows": n, "assumed": False}
    full = ref.permuted_rows(v.by_id, n, v.size, [plain], 0, 0, [x])
    assert np.array_equal(full[n:].view(np.uint32), np.broadcast_to(expected, (8, hidden)).view(np.uint32))
    tail = np.empty(8 * hidden, dtype=np.float32)
    src.read(n * hidden, 8 * hidden, tail)
    assert np.array_equal(tail.reshape(8, hidden), np.broadcast_to(expected, (8, hidden)))


def test_padding_mean_of_non_finite_columns_follows_ieee():
    """+Inf and -Inf in one padding column (different blocks) give NaN, +Inf alone +Inf: the
    IEEE sum of the non-finite block sums, as the reference (math.fsum alone raised)."""
    n, hidden = 40000, 3
    t = _mem([f"t{i}" for i in range(n)])
    v = build_output_vocab("base", [("m", t)], 0, pad_to_multiple_of=40008)
    x = np.ones((n, hidden), np.float32)
    x[[0, 20000], 0] = [np.inf, -np.inf]
    x[5, 1] = np.inf
    got = PermutedRows(v, 0, [(x, "F32")]).pad_row()
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == 1.0
    plain = {"vocab": dict(t.vocab), "added": [], "rows": n, "assumed": False}
    want = ref.permuted_rows(v.by_id, n, v.size, [plain], 0, 0, [x])[n]
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[1:], want[1:])


def test_mean_of_three_models_is_a_float64_sum_rounded_once():
    base = _mem(["a", None])
    others = [(f"m{i}", _mem(["a", "t"])) for i in range(3)]
    v = build_output_vocab("m0", [("base", base)] + others, 0)
    assert (v.fill[1], v.fill_rule(1)) == (MEAN, "mean of m0, m1, m2")
    vals = [np.array([[0.0, 0.0], [1.0, 2.0]], np.float32), np.array([[0.0, 0.0], [2.0**-24, 3.0]], np.float32),
            np.array([[0.0, 0.0], [2.0**-24, -1.0]], np.float32)]
    tensors = [(np.zeros((2, 2), np.float32), "F32")] + [(x, "F32") for x in vals]
    got = np.empty(2, np.float32)
    PermutedRows(v, 0, tensors).read(2, 2, got)
    expected = np.array([(1.0 + 2.0**-24 + 2.0**-24) / 3, (2.0 + 3.0 - 1.0) / 3], np.float32)
    assert np.array_equal(got, expected)
    assert got[0] != np.float32((np.float32(1.0) + np.float32(2.0**-24) + np.float32(2.0**-24)) / np.float32(3))


def test_permuted_rows_argument_checks():
    toks = _toks()
    v = build_output_vocab("union", toks, 0)
    raws = [_raw(m, "model.embed_tokens.weight") for m in MODELS]
    with pytest.raises(ValueError, match="one tensor entry per input"):
        PermutedRows(v, 0, raws[:2])
    with pytest.raises(ValueError, match="C-contiguous"):
        PermutedRows(v, 0, [raws[0], (np.zeros((32, 82), np.float32).T, "F32"), raws[2]])
    with pytest.raises(ValueError, match="expected \\[82, hidden\\]"):
        PermutedRows(v, 0, [raws[0], raws[0], raws[2]])
    src = PermutedRows(v, 0, [raws[0], None, raws[2]])  # base lacks <|im_end|>: donor ft-chat is needed
    with pytest.raises(ValueError, match="tensor of ft-chat is needed"):
        src.read(0, src.numel, np.empty(src.numel, np.float32))
    with pytest.raises(ValueError, match="outside the tensor"):
        src.read(src.numel - 1, 2, np.empty(2, np.float32))
    assert v.identity(0) is False and build_output_vocab("base", toks, 0).identity(0) is True
    again = build_output_vocab("union", toks, 0)
    assert row_map_fingerprint(again, 0, 32) == row_map_fingerprint(v, 0, 32)
    assert row_map_fingerprint(v, 1, 32) != row_map_fingerprint(again, 0, 32)
    assert row_map_fingerprint(build_output_vocab("ft-tool", toks, 0), 2, 32) != row_map_fingerprint(v, 2, 32)


# ------------------------------------------------------------------ tokenizer files


def _materialise(files: dict[str, bytes], d, vocab_size: int):
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "config.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return d


@pytest.mark.parametrize("source", ["base", "ft-chat", "ft-tool"])
def test_unchanged_tokenizer_files_are_copied(source):
    v = build_output_vocab(source, _toks(), 0)
    files = write_tokenizer_files(v.source_dir, v.added, v.strip_at)
    d = VOCAB / source
    assert set(files) == {p.name for p in d.iterdir() if p.name in TOKENIZER_FILES}
    assert all(files[n] == (d / n).read_bytes() for n in files)


def test_union_tokenizer_files_agree_with_the_rows(tmp_path):
    v = build_output_vocab("union", _toks(), 0)
    files = write_tokenizer_files(VOCAB / "base", v.added, v.strip_at)
    assert files["special_tokens_map.json"] == (VOCAB / "base" / "special_tokens_map.json").read_bytes()
    back = read_tokenizer(_materialise(files, tmp_path / "out", v.size))
    assert back.vocab == v.tokens and back.rows == v.size == 84
    assert [(a.id, a.content, a.special, a.normalized) for a in back.added][-3:] == [
        (81, "<|im_start|>", True, False), (82, "<|im_end|>", True, False), (83, "<tool>", True, False)]
    tc = json.loads(files["tokenizer_config.json"])
    assert list(tc["added_tokens_decoder"]) == ["0", "1", "2", "80", "81", "82", "83"]
    assert tc["added_tokens_decoder"]["80"] == {"content": "zorba", "lstrip": False, "normalized": True,
                                                "rstrip": False, "single_word": False, "special": False}
    assert "chat_template" not in tc  # union keeps the base's tokenizer config (the base has no template)
    tj = json.loads(files["tokenizer.json"])
    assert tj["model"] == json.loads((VOCAB / "base" / "tokenizer.json").read_text())["model"]


def test_model_source_keeps_its_chat_template(tmp_path):
    v = build_output_vocab("ft-chat", _toks(), 0)
    files = write_tokenizer_files(v.source_dir, v.added, v.strip_at)
    tc = json.loads(files["tokenizer_config.json"])
    assert tc["chat_template"] == read_tokenizer(VOCAB / "ft-chat").chat_template
    assert read_tokenizer(_materialise(files, tmp_path / "out", v.size)).vocab == v.tokens


def test_written_files_load_in_the_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    v = build_output_vocab("union", _toks(), 0)
    tok = tokenizers.Tokenizer.from_str(write_tokenizer_files(v.source_dir, v.added, v.strip_at)["tokenizer.json"].decode())
    assert tok.get_vocab(with_added_tokens=True) == v.tokens
    assert tok.get_vocab_size(with_added_tokens=True) == v.size
    assert tok.encode("<|im_start|> zorba <tool> <|im_end|>").ids == [81, 80, 83, 82]


def test_stripped_bpe_tokenizer_is_rewritten_consistently(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "c": 4, "bc": 5, "<U0>": 6}
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True},
                           {"id": 6, "content": "<U0>", "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True}],
          "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
          "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab, "merges": ["a b", "b c"]}}
    src = tmp_path / "base"
    src.mkdir()
    (src / "tokenizer.json").write_text(json.dumps(tj))
    (src / "added_tokens.json").write_text(json.dumps({"<U0>": 6}))
    base = read_tokenizer(src, rows=5)  # the model has 5 rows: "bc" and "<U0>" have none
    v = build_output_vocab("base", [("base", base)], 0)
    files = write_tokenizer_files(v.source_dir, v.added, v.strip_at)
    out = json.loads(files["tokenizer.json"])
    assert out["model"]["vocab"] == {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "c": 4}
    assert out["model"]["merges"] == ["a b"] and [a["id"] for a in out["added_tokens"]] == [0]
    assert json.loads(files["added_tokens.json"]) == {}
    tok = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode())
    assert tok.get_vocab_size(with_added_tokens=True) == v.size == 5
    assert tok.encode("ab c").ids == [3, 4]


def test_source_without_tokenizer_json_is_an_error(tmp_path):
    v = build_output_vocab("union", _toks(), 0)
    with pytest.raises(InvalidCheckpoint, match="no tokenizer.json in"):
        write_tokenizer_files(tmp_path, v.added, v.strip_at)


# ----------------------------------------------------------------- padded rows check


def test_padded_rows_note_names_the_differing_tokens():
    base = read_tokenizer(FIXTURES / "tiny-padded" / "base")
    ft = read_tokenizer(FIXTURES / "tiny-padded" / "ft-pad")
    assert (base.rows, ft.rows, len(base.vocab), len(ft.vocab)) == (80, 80, 76, 78)
    diff = compare_vocabs(base, ft, "ft-pad")
    assert diff.in_padding == ((76, "<|im_start|>"), (77, "<|im_end|>"))
    assert diff.conflicts == () and diff.unused == () and diff.error() is None
    note = diff.note()
    assert note.startswith("ft-pad uses 2 padded row(s)") and "76 '<|im_start|>', 77 '<|im_end|>'" in note
    assert not compare_vocabs(base, base, "base") and compare_vocabs(base, base, "base").note() is None
    back = compare_vocabs(ft, base, "base")  # the other way round: the model lacks tokens the output has
    assert back.unused == ((76, "<|im_start|>"), (77, "<|im_end|>")) and back.note() is None


def test_conflicting_ids_are_refused():
    a = _mem(["<unk>", "x", "y", "z"])
    b = _mem(["<unk>", "x", "q", "z", "w"])
    diff = compare_vocabs(a, b, "model 2 'b'")
    assert diff.conflicts == ((2, "y", "q"),) and diff.in_padding == ()  # over min(rows) = 4 ids
    err = diff.error()
    assert isinstance(err, IncompatibleModels)
    assert "model 2 'b' has other tokens at the same ids" in err.message and "2 'y' vs 'q'" in err.message
    assert "tokenizer_source" in err.hint
    assert compare_vocabs(a, b, "b", rows=5).in_padding == ((4, "w"),)


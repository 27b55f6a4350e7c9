"""Fuzzing the formats npmerge parses itself besides safetensors headers (issue 26):
recipe YAML and tokenizer files. Hypothesis builds structured garbage (the right keys
with wrong, huge, nested or aliased values; mangled text) and every case must end in a
valid result or a clean error: an exit code 2-5 with an `Error:` line and no traceback
through the CLI, or npmerge's own exception types from the vocabulary builder, within a
bounded time and memory.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import FIXTURES, LLAMA_F32
from npmerge.errors import NpmergeError
from npmerge.io.tokenizer import read_tokenizer
from npmerge.io.vocab import build_output_vocab
from safety_helpers import run

MODELS = [str(LLAMA_F32 / m) for m in ("base", "ft-a", "ft-b")]
VOCAB = FIXTURES / "tiny-vocab"
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
SECONDS = 20  # per case: far above a real parse (milliseconds), far below a hang
PEAK_BYTES = 256 << 20  # per case, Python allocations: a runaway table would blow it

# ----------------------------------------------------------------------------- values

scalars = st.one_of(
    st.integers(0, 120), st.sampled_from([10**9, 10**20, 2**63, 80, 81]), st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 10**12, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 1e-300, 1e300]),
    st.text(max_size=12), st.sampled_from(MODELS + ["base", "union", "*", "layers.0", "bfloat16", "float32", "ties"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                         st.dictionaries(st.text(max_size=8) | st.sampled_from(
                                                             ["filter", "value", "weight", "density"]), inner,
                                                             max_size=4)), max_leaves=20)
B, A, C = MODELS
V = [str(VOCAB / m) for m in ("base", "ft-chat", "ft-tool")]
VALID = [  # real recipes over the fixtures; the fuzzer damages one to three places of one
    {"merge_method": "ties", "base_model": B,
     "models": [{"model": A, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": C, "parameters": {"weight": [0.2, 0.8], "density": [{"filter": "mlp", "value": 0.3},
                                                                               {"value": 0.7}]}}],
     "parameters": {"normalize": True}, "dtype": "bfloat16"},
    {"merge_method": "linear", "models": [{"model": A, "parameters": {"weight": 1.0}},
                                          {"model": C, "parameters": {"weight": 0.5}}], "out_dtype": "float16"},
    {"merge_method": "slerp", "base_model": A, "models": [{"model": A}, {"model": C}],
     "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]}},
    {"merge_method": "passthrough", "slices": [{"sources": [{"model": A, "layer_range": [0, 2]}]},
                                               {"sources": [{"model": C, "layer_range": [1, 2]}]}]},
    {"merge_method": "dare_ties", "base_model": B, "slices": [{"sources": [
        {"model": B, "layer_range": [0, 2]}, {"model": A, "layer_range": [0, 2], "parameters": {"weight": 1, "density": 0.4}}]}],
     "parameters": {"lambda": 1.1, "rescale": True, "seed": 7}},
    {"merge_method": "task_arithmetic", "base_model": V[0],
     "models": [{"model": V[1], "parameters": {"weight": 0.5}}, {"model": V[2], "parameters": {"weight": 0.5}}],
     "tokenizer": {"source": "union", "pad_to_multiple_of": 8}},
]
KEYS = ["weight", "density", "epsilon", "lambda", "normalize", "t", "gamma", "select_topk", "rescale", "seed",
        "filter", "value", "model", "layer_range", "sources", "source", "pad_to_multiple_of", "densty", "<<"]


@st.composite
def damaged(draw, documents: list, keys: list[str]):
    """One of `documents` with one to three places replaced, removed or added (the places
    chosen uniformly: Hypothesis' own choices lean to the first, simplest option)."""
    rnd = draw(st.randoms(use_true_random=False))
    doc = json.loads(json.dumps(rnd.choice(documents)))
    for _ in range(rnd.randint(1, 3)):
        node = doc
        while True:  # walk down to a container, then act on one of its places
            places = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not places:
                break
            place = rnd.choice(places)
            if isinstance(node[place], (dict, list)) and rnd.random() < 0.7:
                node = node[place]
                continue
            action = rnd.choice(["replace", "replace", "remove", "add"])
            if action == "replace":
                node[place] = draw(values)
            elif action == "remove":
                del node[place]
            elif isinstance(node, dict):
                node[rnd.choice(keys)] = draw(values)
            else:
                node.append(draw(values))
            break
    return doc


def mangle(text: str, data) -> str:
    """A few character-level edits: what a hand-edited or truncated file looks like."""
    for _ in range(data.draw(st.integers(0, 3), label="edits")):
        at = data.draw(st.integers(0, len(text)), label="at")
        cut = data.draw(st.integers(0, 4), label="cut")
        new = data.draw(st.sampled_from(["", "&a ", "*a", "<<: ", "[", "{", "}", ":", "- ", "\n  ", "\t", "'", "!!python/object:os.system ",
                                         "\ufeff", "\x00", "? ", "%YAML 1.1\n"]), label="insert")
        text = text[:at] + new + text[at + cut:]
    return text


def bounded(call):
    """call() within SECONDS and PEAK_BYTES of Python allocations; its result."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < SECONDS
    assert peak < PEAK_BYTES, f"{peak:,} bytes"
    return result


# ----------------------------------------------------------------------------- recipes

@FUZZ
@given(recipe=damaged(VALID, KEYS), data=st.data())
def test_recipe_fuzz_through_the_cli(tmp_path_factory, recipe, data):
    """npmerge run on a fuzzed recipe (--dry-run: it plans, so the values are used)."""
    work = tmp_path_factory.mktemp("r")
    text = yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False)
    if data.draw(st.integers(0, 3), label="mangled") == 0:
        text = mangle(text, data)
    (work / "r.yml").write_text(text, encoding="utf-8", errors="surrogatepass")
    res = bounded(lambda: run("run", work / "r.yml", "-o", work / "out", "--dry-run", "--max-memory", "64MiB"))
    assert "Traceback" not in res.err, res.err
    if res.code != 0:
        assert res.code in (2, 3, 4, 5) and res.err.startswith("Error: "), (res.code, res.err)
        assert max(map(len, res.err.splitlines())) <= 1100
    assert not (work / "out").exists()


# ----------------------------------------------------------------------------- tokenizers

TOKENIZERS = [json.loads((VOCAB / m / "tokenizer.json").read_text()) for m in ("ft-chat", "ft-tool")]
for t in TOKENIZERS:  # a short vocabulary: more of the damage lands on ids and added tokens
    t["model"]["vocab"] = dict(list(t["model"]["vocab"].items())[:6] + list(t["model"]["vocab"].items())[-3:])
    t["model"].pop("merges", None)
TOKENIZER_KEYS = ["id", "content", "special", "normalized", "vocab", "added_tokens", "model", "type", "<|im_end|>", "a"]
ids = st.integers(0, 120) | st.sampled_from([-1, 10**9, 10**20, 2**63, 80, 81])
decoder = st.dictionaries(st.integers(0, 130).map(str) | st.text(max_size=4),
                          st.fixed_dictionaries({"content": st.sampled_from(["<|im_end|>", "<|im_start|>", "x"]) | scalars},
                                                optional={"special": st.booleans()}), max_size=3)


@FUZZ
@given(tj=damaged(TOKENIZERS, TOKENIZER_KEYS), dec=decoder | st.none(), rows=st.none() | st.integers(0, 300),
       source=st.sampled_from(["base", "union", "fuzzed"]), pad=st.none() | st.integers(-1, 130) | st.sampled_from([10**6, 10**13]), data=st.data())
def test_vocabulary_builder_fuzz(tmp_path_factory, tj, dec, rows, source, pad, data):
    """A fuzzed tokenizer next to the real fixture's, in every source role."""
    d = tmp_path_factory.mktemp("t")
    text = json.dumps(tj)
    if data.draw(st.booleans(), label="mangled"):
        text = mangle(text, data)
    (d / "tokenizer.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    if dec is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": dec}))
    base = read_tokenizer(VOCAB / "base")
    fuzzed_first = data.draw(st.booleans(), label="fuzzed is the base")

    def build():
        try:
            fuzzed = read_tokenizer(d, rows)
            toks = [("fuzzed", fuzzed), ("base", base)] if fuzzed_first else [("base", base), ("fuzzed", fuzzed)]
            return build_output_vocab(source, toks, 0, pad_to_multiple_of=pad)
        except NpmergeError as e:  # a clean error names a file or a value
            assert str(e) and len(str(e)) < 2000
            return None

    vocab = bounded(build)
    if vocab is not None:  # a valid result is consistent
        assert vocab.n_tokens <= vocab.size and all(len(r) == vocab.size for r in vocab.rows)
        assert all(0 <= i < vocab.n_tokens for i in vocab.by_id)
        assert vocab.size - len(vocab.by_id) <= len(vocab.by_id) + (1 << 16) + (pad or 0)


@pytest.mark.parametrize("text", ["", "null", "[]", '{"model": {"vocab": {"a": 0}}, "added_tokens": {"a": 1}}',
                                  '{"model": {"vocab": [[1, 2]]}}', "{" * 100_000])
def test_vocabulary_builder_hand_picked(tmp_path, text):
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(NpmergeError):
        read_tokenizer(tmp_path)

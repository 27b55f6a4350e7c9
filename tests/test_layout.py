"""npmerge.io.layout: heads (tied / untied / dead copies) and non-persistent buffers, on the
fixtures of scripts/fixtures_vocab.py and on GPT-2-style name sets."""

from __future__ import annotations

import numpy as np
import pytest

from npmerge.io.checkpoint import Checkpoint
from npmerge.io.layout import (ModelLayout, apply_config, embedding_name, is_buffer, is_vocab_tensor,
                               plan_layout)
from npmerge.io.tokenizer import read_tokenizer
from npmerge.io.vocab import build_output_vocab
from npmerge.io.vocab_rows import PermutedRows

from conftest import FIXTURES

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
INV_FREQ = "model.layers.0.self_attn.rotary_emb.inv_freq"


def _layouts(family: str, models) -> list[ModelLayout]:
    out = []
    for m in models:
        c = Checkpoint(FIXTURES / family / m)
        out.append(ModelLayout(m, tuple(c.tensors), c.config))
        c.close()
    return out


def test_tied_base_untied_and_dead_head_finetunes():
    plan = plan_layout(_layouts("tiny-tied", ["base", "ft-untied", "ft-deadhead"]), base_index=0)
    head = plan.get(HEAD)
    assert head.inputs == (EMBED, HEAD, EMBED) and head.copy_from is None
    assert plan.tensors[-1].name == HEAD  # after the base's tensors
    assert plan.ignored == ((2, HEAD),)
    assert plan.tie_word_embeddings is False
    assert plan.unresolved() == []
    assert any(n.startswith("ft-deadhead stores 'lm_head.weight' but its config ties it") for n in plan.notes)
    assert any("'lm_head.weight' is merged, with the embeddings 'model.embed_tokens.weight' as the head of "
               "base, ft-deadhead; config.json gets tie_word_embeddings: false" in n for n in plan.notes)
    others = [t for t in plan.tensors if t.name != HEAD]
    assert all(t.inputs == (t.name,) * 3 and t.copy_from is None for t in others)


def test_all_tied_output_stays_tied_and_drops_dead_copies():
    plan = plan_layout(_layouts("tiny-tied", ["base", "ft-deadhead"]), base_index=0)
    assert HEAD not in [t.name for t in plan.tensors]
    assert plan.ignored == ((1, HEAD),) and plan.tie_word_embeddings is None and plan.unresolved() == []
    assert len(plan.notes) == 1


def test_untied_base_with_tied_finetune_uses_its_embeddings():
    plan = plan_layout(_layouts("tiny-tied", ["ft-untied", "base"]), base_index=0)
    assert plan.get(HEAD).inputs == (HEAD, EMBED)
    assert plan.tie_word_embeddings is None  # the reference already says tie_word_embeddings: false
    assert plan.ignored == ()


def test_same_layout_changes_nothing():
    layouts = _layouts("tiny-llama", ["base", "ft-a", "ft-b"])
    plan = plan_layout(layouts, base_index=0)
    assert [t.name for t in plan.tensors] == list(layouts[0].names)
    assert all(t.inputs == (t.name,) * 3 and t.copy_from is None for t in plan.tensors)
    assert (plan.ignored, plan.notes, plan.tie_word_embeddings) == ((), (), None)


def test_missing_key_judges_by_storage_and_extra_tensors_stay_unresolved():
    a = ModelLayout("a", ("model.embed_tokens.weight", "x.weight", "lm_head.weight"), {})
    b = ModelLayout("b", ("model.embed_tokens.weight", "x.weight", "y.weight"), None)
    plan = plan_layout([a, b])
    assert plan.get(HEAD).inputs == (HEAD, EMBED) and plan.tie_word_embeddings is False
    assert plan.unresolved() == [("y.weight", 0)]


def test_rotary_buffer_copied_from_base_when_present():
    plan = plan_layout(_layouts("tiny-rope", ["base", "ft-new", "ft-old"]), base_index=0)
    t = plan.get(INV_FREQ)
    assert (t.inputs, t.copy_from) == ((INV_FREQ, None, INV_FREQ), 0)
    assert plan.ignored == ((2, INV_FREQ),) and plan.unresolved() == []
    assert plan.notes == (f"buffer '{INV_FREQ}' (recomputed by the model, not trained) is only in base, ft-old: "
                          "copied from base",)


def test_rotary_buffer_dropped_when_the_base_lacks_it():
    plan = plan_layout(_layouts("tiny-rope", ["ft-new", "base", "ft-old"]), base_index=0)
    assert INV_FREQ not in [t.name for t in plan.tensors]
    assert plan.ignored == ((1, INV_FREQ), (2, INV_FREQ)) and plan.unresolved() == []
    assert plan.notes[0].endswith("is only in base, ft-old: left out of the output")


def test_buffer_in_every_model_is_copied_without_a_note():
    plan = plan_layout(_layouts("tiny-rope", ["base", "ft-old"]), base_index=0)
    assert plan.get(INV_FREQ).copy_from == 0 and plan.notes == ()


def test_gpt2_style_buffers():
    old = ModelLayout("old", ("wte.weight", "h.0.attn.bias", "h.0.attn.masked_bias", "h.0.attn.c_attn.bias",
                              "h.0.attn.c_attn.weight"), {"tie_word_embeddings": True})
    new = ModelLayout("new", ("wte.weight", "h.0.attn.c_attn.bias", "h.0.attn.c_attn.weight"), {})
    plan = plan_layout([new, old], base_index=0)
    assert [t.name for t in plan.tensors] == ["wte.weight", "h.0.attn.c_attn.bias", "h.0.attn.c_attn.weight"]
    assert set(plan.ignored) == {(1, "h.0.attn.bias"), (1, "h.0.attn.masked_bias")}
    assert len(plan.notes) == 2 and plan.tie_word_embeddings is None


@pytest.mark.parametrize("name,expected", [
    ("model.layers.3.self_attn.rotary_emb.inv_freq", True), ("model.rotary_emb.inv_freq", True),
    ("rotary_emb.inv_freq", True), ("gpt_neox.layers.0.attention.rotary_emb.cos_cached", True),
    ("h.11.attn.masked_bias", True), ("transformer.h.0.attn.bias", True), ("h.0.attn.c_attn.bias", False),
    ("model.layers.0.self_attn.q_proj.bias", False), ("encoder.layer.0.crossattn.bias", False),
    ("inv_freq_scale", False),
])
def test_is_buffer(name, expected):
    assert is_buffer(name) is expected


def test_vocab_tensor_and_embedding_names():
    assert is_vocab_tensor("model.embed_tokens.weight", (80, 32), 80)
    assert is_vocab_tensor("lm_head.weight", (82, 32), 82) and is_vocab_tensor("transformer.wte.weight", (5, 2), 5)
    assert not is_vocab_tensor("lm_head.weight", (82, 32), 80)
    assert not is_vocab_tensor("model.layers.0.mlp.up_proj.weight", (80, 32), 80)
    assert not is_vocab_tensor("model.embed_tokens.weight", (80,), 80)
    assert embedding_name(["a.weight", "model.embed_tokens.weight"]) == "model.embed_tokens.weight"
    assert embedding_name(["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]) is None


def test_apply_config():
    cfg = {"a": 1, "vocab_size": 80, "tie_word_embeddings": True}
    out = apply_config(cfg, vocab_size=84, tie_word_embeddings=False)
    assert out == {"a": 1, "vocab_size": 84, "tie_word_embeddings": False} and list(out) == list(cfg)
    assert cfg["vocab_size"] == 80
    nested = {"text_config": {"vocab_size": 80, "tie_word_embeddings": True}, "tie_word_embeddings": True}
    out = apply_config(nested, vocab_size=84, tie_word_embeddings=False)
    assert out["text_config"] == {"vocab_size": 84, "tie_word_embeddings": False} and "vocab_size" not in out
    assert nested["text_config"]["vocab_size"] == 80
    assert apply_config({"x": 0}) == {"x": 0}


def test_untied_head_of_a_tied_base_reads_its_embeddings_permuted():
    """The plan's feeding names plug into PermutedRows: the base's lm_head rows are its embedding rows."""
    models = ["base", "ft-untied"]
    plan = plan_layout(_layouts("tiny-tied", models), base_index=0)
    toks = [(m, read_tokenizer(FIXTURES / "tiny-tied" / m)) for m in models]
    v = build_output_vocab("base", toks, 0, pad_to_multiple_of=64)
    ckpts = [Checkpoint(FIXTURES / "tiny-tied" / m) for m in models]
    views = [(c.tensors[name].file.view(name), c.tensors[name].info.dtype.name)
             for c, name in zip(ckpts, plan.get(HEAD).inputs)]
    got = np.empty(v.size * 32, np.float32)
    PermutedRows(v, 0, views).read(0, got.size, got)
    emb = (views[0][0].astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(got.reshape(v.size, 32)[:80], emb)
    for c in ckpts:
        c.close()

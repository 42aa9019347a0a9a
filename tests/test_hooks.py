"""Every registered hook appears with its declared axes; capture never changes the logits."""

import re

import numpy as np
import pytest

import grokviz as gv
from grokviz.hooks import REGISTRY, select


def axis_sizes(cfg, tokens, spec):
    b, t = tokens.shape
    return {"layer": cfg.num_layers, "batch": b, "seq": t, "kv_seq": t, "d_model": cfg.d_model,
            "head": cfg.num_q_heads, "kv_head": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "expert": cfg.num_experts, "k": cfg.top_k, "ffn": cfg.ffn_size, "vocab": cfg.vocab_size,
            "query": len(spec.queries), "rank": spec.top_keys}


@pytest.fixture(scope="module")
def full_run(golden_model, golden):
    return golden_model.run(golden[2]["tokens"], capture=["*"])


#: hooks of a part Grok-1 does not have (Qwen1.5-MoE's shared expert): checked on a model of that family
SHARED_EXPERT_HOOKS = ("blocks.moe.shared_gate", "blocks.moe.shared_out")


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n not in SHARED_EXPERT_HOOKS))
def test_every_hook_has_declared_axes(full_run, golden, name):
    cfg, _, z = golden
    sizes = axis_sizes(cfg, z["tokens"], gv.AttentionSpec())
    hook = REGISTRY[name]
    value = np.asarray(full_run.cache[name])
    assert value.shape == tuple(sizes[a] for a in hook.axes), (name, hook.axes)
    assert str(value.dtype) == hook.dtype


def test_shared_expert_hooks_have_declared_axes():
    import jax

    from grokviz.families import preset

    cfg = preset("qwen2_moe", vocab_size=64, d_model=16, num_layers=2, num_q_heads=2, num_kv_heads=1, head_dim=8,
                 ffn=8, num_experts=4, top_k=2, shared_expert_ffn=12, sequence_len=16, pad_token=0)
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(0)), bucket=False)
    tokens = np.arange(3, 9, dtype=np.int32)[None]
    run = model.run(tokens, capture=list(SHARED_EXPERT_HOOKS))
    sizes = axis_sizes(cfg, tokens, gv.AttentionSpec())
    for name in SHARED_EXPERT_HOOKS:
        value = np.asarray(run.cache[name])
        assert value.shape == tuple(sizes[a] for a in REGISTRY[name].axes), name
        assert str(value.dtype) == REGISTRY[name].dtype


def test_capture_does_not_change_logits(golden_model, golden, full_run):
    plain = golden_model.run(golden[2]["tokens"])
    assert np.array_equal(np.asarray(plain.logits), np.asarray(full_run.logits))
    np.testing.assert_array_equal(full_run.cache["unembed.logits"], plain.logits)


def test_layer_indexing_and_hook_consistency(full_run, golden):
    cfg, _, z = golden
    np.testing.assert_array_equal(full_run.cache["blocks.moe.router_probs", 1],
                                  np.asarray(full_run.cache["blocks.moe.router_probs"])[1])
    probs = "blocks.moe.router_probs"
    np.testing.assert_array_equal(full_run.cache[probs, -1], full_run.cache[probs, 1])
    # out-of-range layers are errors (jax used to clamp them to the last layer)
    for layer in (2, 100, -3):
        with pytest.raises(IndexError, match=re.escape(f"layer {layer} is outside the model's 2 layers [-2, 2)")):
            full_run.cache["blocks.moe.router_probs", layer]
    with pytest.raises(TypeError, match="layer must be an int"):
        full_run.cache["blocks.moe.router_probs", 0.0]
    # the expert load hook counts real tokens only (row 1 has 7 pad positions)
    load = np.asarray(full_run.cache["blocks.moe.expert_load"])
    assert load.sum(axis=1).tolist() == [(24 + 17) * 2] * 2
    # reduced attention summaries agree with the full pattern
    pattern = np.asarray(full_run.cache["blocks.attn.pattern"])
    np.testing.assert_allclose(full_run.cache["blocks.attn.pattern_at"], pattern[:, :, :, [-1], :])
    ent = -np.sum(np.where(pattern > 0, pattern * np.log(np.where(pattern > 0, pattern, 1)), 0), -1)
    np.testing.assert_allclose(full_run.cache["blocks.attn.entropy"], ent, atol=1e-5)
    top = np.asarray(full_run.cache["blocks.attn.top_keys"])
    np.testing.assert_allclose(np.take_along_axis(pattern, top, -1), full_run.cache["blocks.attn.top_key_weights"])
    # capped scores are 30 tanh(logits / 30)
    np.testing.assert_allclose(full_run.cache["blocks.attn.scores"],
                               30 * np.tanh(np.asarray(full_run.cache["blocks.attn.logits"]) / 30), atol=1e-4)


def test_unknown_names_suggest_closest(golden_model):
    with pytest.raises(KeyError, match=re.escape("Unknown hook name 'blocks.moe.router_prob'. Did you mean: "
                                                 "blocks.moe.router_probs")):
        golden_model.run(np.ones((1, 3), np.int32), capture=["blocks.moe.router_prob"])
    with pytest.raises(KeyError, match="Did you mean: blocks.attn.pattern"):
        select("blocks.attention.pattern")
    with pytest.raises(KeyError, match="Unknown hook name 'blocks.mlp.\\*'"):
        select("blocks.mlp.*")
    run = golden_model.run(np.ones((1, 3), np.int32), capture=["blocks.moe.router_probs"])
    with pytest.raises(KeyError, match="was not captured in this run"):
        run.cache["blocks.attn.pattern"]


def test_globs_select_registered_names():
    assert select("blocks.moe.top_k_*") == {"blocks.moe.top_k_experts", "blocks.moe.top_k_weights"}
    assert select(["*"]) == set(REGISTRY)


@pytest.mark.parametrize("unroll", [False, True])
def test_attention_for_selected_layers_and_heads_only(golden_model, golden, full_run, unroll):
    z = golden[2]
    spec = gv.AttentionSpec(layers=(1,), heads=(0, 3))
    run = golden_model.run(z["tokens"], capture=["blocks.attn.pattern", "blocks.attn.entropy"], attention=spec,
                           unroll=unroll)
    full = np.asarray(full_run.cache["blocks.attn.pattern"])
    assert run.cache["blocks.attn.pattern"].shape == (1, 2, 2, 24, 24)  # memory ~ 1 layer x 2 heads
    same = np.testing.assert_allclose if unroll else np.testing.assert_array_equal  # scan vs loop: fp rounding
    kw = {"atol": 1e-5} if unroll else {}
    same(run.cache["blocks.attn.pattern", 1], full[1][:, [0, 3]], **kw)
    assert run.cache["blocks.attn.entropy"].shape[0] == 2  # reduced summaries keep every layer
    with pytest.raises(KeyError, match="captured for layers \\[1\\] only"):
        run.cache["blocks.attn.pattern", 0]
    same(run.cache["blocks.attn.pattern", -1], full[1][:, [0, 3]], **kw)  # -1 = the last layer, which was kept
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        run.cache["blocks.attn.pattern", 2]
    same(run.logits, full_run.logits, **kw)
    with pytest.raises(ValueError, match="AttentionSpec.heads contains 9"):
        golden_model.run(z["tokens"], capture=["blocks.attn.pattern"], attention=gv.AttentionSpec(heads=(9,)))


def test_python_callback_hook(golden_model, golden, full_run):
    z = golden[2]
    seen = []

    def double_attn(value, layer):
        seen.append(layer)
        return value * 2.0

    run = golden_model.run(z["tokens"], callbacks={"blocks.attn.post_norm": double_attn},
                           capture=["blocks.attn.post_norm"])
    assert len(seen) >= 1  # traced (once per compile)
    # the capture records the callback's output; layer 0's input is untouched, so it is exactly twice the plain one
    np.testing.assert_allclose(run.cache["blocks.attn.post_norm", 0], 2 * full_run.cache["blocks.attn.post_norm", 0],
                               rtol=1e-6)
    assert not np.allclose(run.logits, golden_model.run(z["tokens"]).logits)
    with pytest.raises(KeyError, match="Unknown hook name"):
        golden_model.run(z["tokens"], callbacks={"blocks.attn.postnorm": double_attn})

"""The family formulas of the one forward pass, on their edge cases, against slow obvious computations (random
weights; the faithfulness to transformers on real checkpoints is tests/test_hf_loading.py)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokviz as gv
from grokviz.families import preset
from grokviz.hooks import Point
from grokviz.model import KVCache, forward
from grokviz.model.layers import rope_frequencies
from grokviz.model.moe import route, shared_expert

SIZES = dict(vocab_size=96, d_model=32, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, ffn=24,
             num_experts=8, top_k=2, sequence_len=64, pad_token=0, eos_token=2, rms_eps=1e-6)
EXTRA = {"qwen2_moe": dict(shared_expert_ffn=16, moe_layers=(1,), dense_ffn=40),
         "gpt_oss": dict(sliding_window=3, layer_types=("sliding", "full"), rope_type="yarn", rope_factor=4.0,
                         rope_original_max=16, rope_truncate=False),
         "granitemoe": dict(embedding_multiplier=12.0, residual_multiplier=0.22, output_multiplier=1 / 6,
                            attn_logit_multiplier=0.0625)}


def family_model(family, seed=0, **over):
    cfg = preset(family, **{**SIZES, **EXTRA.get(family, {}), **over})
    params = gv.init_params(cfg, jax.random.key(seed))
    # non-trivial norms, biases and sinks so that each one matters
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        name = path[-1].key
        if name in ("sinks", "b_q", "b_k", "b_v", "b_o", "router_b", "b_gate", "b_up", "b_down"):
            leaf = 0.3 * jax.random.normal(k, leaf.shape)
        elif "norm" in name:
            leaf = 1 + 0.2 * jax.random.normal(k, leaf.shape)
        out.append(leaf)
    return cfg, jax.tree_util.tree_unflatten(tree, out)


def tokens(cfg, b=2, t=12, seed=0, left_pad=5):
    toks = np.random.default_rng(seed).integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
    toks[1, :left_pad] = cfg.pad_token
    return toks


@pytest.mark.parametrize("family", ["grok", "gpt_oss", "qwen2_moe", "qwen3_moe"])
def test_prefill_then_decode_equals_the_full_forward(family):
    """The KV cache through the same forward: prefill 7 tokens, decode the rest one at a time, with a left-padded
    row, against one full forward (real positions; fp32). The families cover what the cache touches: index and
    real-count positions, soft cap, sinks, sliding windows, YaRN, biases, per-head QK norm, dense layers (generation
    tests every family end to end)."""
    cfg, params = family_model(family)
    toks = tokens(cfg)
    real = toks != cfg.pad_token
    fwd = jax.jit(functools.partial(forward, expert_impl="dense"), static_argnames=("cfg",))  # a compile per shape
    full = np.asarray(fwd(params, jnp.asarray(toks), cfg).logits)
    out = fwd(params, jnp.asarray(toks[:, :7]), cfg, kv=KVCache.empty(cfg, 2, 16))
    got = [np.asarray(out.logits)]
    kv = out.kv
    for t in range(7, toks.shape[1]):
        out = fwd(params, jnp.asarray(toks[:, t:t + 1]), cfg, kv=kv)
        kv = out.kv
        got.append(np.asarray(out.logits))
    got = np.concatenate(got, axis=1)
    assert np.abs(got - full)[real].max() < 1e-5
    np.testing.assert_array_equal(np.asarray(kv.step), [12, 12])
    expected_next = [12, 7] if cfg.position_rule == "real_count" else [12, 12]
    np.testing.assert_array_equal(np.asarray(kv.next_pos), expected_next)


def test_left_padded_row_equals_its_unpadded_run_in_hf_families():
    """Positions counted from the first real token: a left-padded row gives the logits of the row alone."""
    cfg, params = family_model("qwen3_moe")
    toks = tokens(cfg)
    both = np.asarray(forward(params, jnp.asarray(toks), cfg).logits)
    alone = np.asarray(forward(params, jnp.asarray(toks[1:, 5:]), cfg).logits)
    np.testing.assert_allclose(both[1, 5:], alone[0], atol=2e-5)


def _route(cfg, logits_like, iv=None):
    """route() on inputs whose router logits are ``x @ I`` = x itself (d_model = experts)."""
    p = {"router": jnp.eye(cfg.num_experts)}
    point = Point(frozenset({"blocks.moe.router_probs"}), prefix="blocks.")
    return route(jnp.asarray(logits_like)[None, None], p, cfg, point, iv)


@pytest.mark.parametrize("family,renorm", [("grok", False), ("olmoe", False), ("mixtral", True),
                                           ("qwen3_moe", True), ("granitemoe", True), ("gpt_oss", True)])
def test_removing_an_expert_applies_the_familys_gate_rule_to_the_survivors(family, renorm):
    cfg = preset(family, **{**SIZES, "d_model": 8, "top_k": 2, "router_bias": False})
    logits = np.array([3.0, 2.5, 1.0, 0.2, -1.0, -2.0, 0.0, 0.5], np.float32)
    iv = gv.Interventions.none(dataclasses.replace(cfg, num_layers=1)).remove_expert(0, 0)
    layer_iv = jax.tree_util.tree_map(lambda a: a[0], iv.split()[0])
    gates, experts = _route(cfg, logits, layer_iv)
    assert list(np.asarray(experts)[0, 0]) == [1, 2]  # the next-best expert takes the removed one's slot
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    want = probs[[1, 2]] / probs[[1, 2]].sum() if renorm else probs[[1, 2]]
    np.testing.assert_allclose(np.asarray(gates)[0, 0], want, rtol=1e-6)


def test_topk_softmax_gates_are_the_softmax_of_the_k_logits():
    cfg = preset("granitemoe", **{**SIZES, "d_model": 8, "top_k": 3})
    logits = np.array([0.1, 4.0, -3.0, 2.0, 2.5, 0.0, 1.0, -1.0], np.float32)
    gates, experts = _route(cfg, logits)
    assert list(np.asarray(experts)[0, 0]) == [1, 4, 3]
    top = logits[[1, 4, 3]]
    np.testing.assert_allclose(np.asarray(gates)[0, 0], np.exp(top) / np.exp(top).sum(), rtol=1e-6)


@pytest.mark.parametrize("sign,expect", [(1.0, 1.0), (-1.0, 0.0)])
def test_shared_expert_gate_near_one_and_near_zero(sign, expect):
    cfg, params = family_model("qwen2_moe")
    p = jax.tree_util.tree_map(lambda a: a[0], {k: v for k, v in params["blocks"].items() if k.startswith("s_")})
    x = jnp.abs(jax.random.normal(jax.random.key(3), (1, 5, cfg.d_model))) + 0.5  # every feature positive
    p["s_router"] = sign * 50.0 * jnp.ones(cfg.d_model)
    point = Point(frozenset({"blocks.moe.shared_out", "blocks.moe.shared_gate"}), prefix="blocks.")
    y = np.asarray(shared_expert(p, x, cfg, point))
    np.testing.assert_allclose(np.asarray(point.values["blocks.moe.shared_gate"]), expect, atol=1e-6)
    np.testing.assert_allclose(y, expect * np.asarray(point.values["blocks.moe.shared_out"]), atol=1e-6)


def test_moe_out_is_routed_plus_gated_shared_expert():
    cfg, params = family_model("qwen2_moe", moe_layers=None, dense_ffn=0)
    toks = tokens(cfg)
    out = forward(params, jnp.asarray(toks), cfg, capture=["blocks.moe.*"])
    c = {k: np.asarray(v) for k, v in out.cache.items()}
    routed = np.einsum("lbtk,lbtkd->lbtd", c["blocks.moe.top_k_weights"], c["blocks.moe.expert_out"])
    pre = c["blocks.moe.pre_norm"]
    gate = 1 / (1 + np.exp(-np.einsum("lbtd,ld->lbt", pre, np.asarray(params["blocks"]["s_router"]))))
    np.testing.assert_allclose(c["blocks.moe.shared_gate"], gate, atol=1e-6)
    np.testing.assert_allclose(c["blocks.moe.out"], routed + gate[..., None] * c["blocks.moe.shared_out"], atol=1e-5)


def _reference_pattern(q, k, sinks, scale, allowed):
    """softmax over keys (and the sink) of scaled q.k, masked keys excluded, sink weight dropped; numpy."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    kk = np.repeat(k, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kk) * scale
    s = np.where(allowed[:, None], s, -np.inf)
    sink = sinks[None, :, None, None]
    m = np.maximum(s.max(-1, keepdims=True), sink)
    e = np.exp(s - m)
    return e / (e.sum(-1, keepdims=True) + np.exp(sink - m))


def test_sliding_window_shorter_than_the_prompt_and_sinks():
    cfg, params = family_model("gpt_oss")
    toks = tokens(cfg, t=12)
    out = forward(params, jnp.asarray(toks), cfg, capture=["blocks.attn.q", "blocks.attn.k", "blocks.attn.pattern"])
    q, k, pat = (np.asarray(out.cache[n]) for n in ("blocks.attn.q", "blocks.attn.k", "blocks.attn.pattern"))
    real = toks != cfg.pad_token
    pos = np.maximum(np.cumsum(real, 1) - 1, 0)
    causal = np.tril(np.ones((12, 12), bool))
    for layer, sliding in enumerate(cfg.layer_is_sliding):
        allowed = real[:, None, :] & causal[None]
        if sliding:
            allowed &= (pos[:, :, None] - pos[:, None, :]) < cfg.sliding_window
        sinks = np.asarray(params["blocks"]["sinks"][layer])
        want = _reference_pattern(q[layer], k[layer], sinks, cfg.attn_logit_multiplier, allowed)
        np.testing.assert_allclose(pat[layer], want, atol=2e-6)
    assert np.all(pat[0][:, :, 6:, :3] == 0)  # keys 3+ positions behind are outside the window of 3


def test_sinks_with_a_fully_masked_row_give_zero_weight_not_nan():
    cfg, params = family_model("gpt_oss")
    toks = tokens(cfg)  # row 1 starts with 5 pads: its pad queries have no allowed key at all
    out = forward(params, jnp.asarray(toks), cfg, capture=["blocks.attn.pattern", "blocks.attn.head_out"])
    pat, head = np.asarray(out.cache["blocks.attn.pattern"]), np.asarray(out.cache["blocks.attn.head_out"])
    assert np.isfinite(np.asarray(out.logits)).all()
    assert np.all(pat[:, 1, :, :5] == 0) and np.all(head[:, 1, :5] == 0)
    assert np.all(pat[:, 0].sum(-1) < 1)  # the sink takes some weight from every real row


def test_dense_layers_have_no_routing_and_run_their_mlp():
    cfg, params = family_model("qwen2_moe")  # layer 0 dense, layer 1 MoE
    model = gv.Model(cfg, params, bucket=False)
    toks = tokens(cfg)
    run = model.run(toks, capture=["blocks.moe.router_logits", "blocks.moe.pre_norm", "blocks.moe.out"])
    assert run.cache.layers_of("blocks.moe.router_logits") == (1,)
    assert run.cache["blocks.moe.router_logits"].shape[0] == 1
    with pytest.raises(KeyError, match="dense MLP layer"):
        run.cache["blocks.moe.router_logits", 0]
    x = run.cache["blocks.moe.pre_norm", 0]
    b = {k: np.asarray(v[0]) for k, v in params["blocks"].items() if k.startswith("mlp_")}
    g, u = x @ b["mlp_gate"], x @ b["mlp_up"]
    want = (g / (1 + np.exp(-g)) * u) @ b["mlp_down"]
    np.testing.assert_allclose(run.cache["blocks.moe.out", 0], want, atol=1e-5)
    unrolled = model.run(toks, unroll=True, expert_impl="dense")
    np.testing.assert_allclose(unrolled.logits, run.logits, atol=2e-5)
    iv = gv.Interventions.none(cfg).remove_expert(0, 3)
    with pytest.raises(ValueError, match="layer 0, a dense MLP layer"):
        model.run(toks, interventions=iv)
    model.run(toks, interventions=gv.Interventions.none(cfg).remove_expert(1, 3))


def test_yarn_frequencies_match_transformers():
    """inv_freq and attention factor of the gpt-oss golden config (head_dim 16, theta 150000, factor 4,
    original 64, beta 32/1), as transformers 5.24 computes them (values recorded from it)."""
    cfg = dataclasses.replace(preset("gpt_oss", **{**SIZES, "head_dim": 16}), rope_base=150000.0, rope_type="yarn",
                              rope_factor=4.0, rope_original_max=64, rope_truncate=False)
    inv, att = rope_frequencies(cfg, 16)
    np.testing.assert_allclose(att, 1.138629436111989, rtol=1e-12)
    want = [1.0, 0.11690013855695724, 0.012703318148851395, 0.0028635566122829914, 0.0006454972317442298,
            0.00014550669584423304, 3.2799827749840915e-05, 7.3936716944444925e-06]
    np.testing.assert_allclose(inv, want, rtol=2e-6)
    inv_t, _ = rope_frequencies(dataclasses.replace(cfg, rope_truncate=True), 16)
    np.testing.assert_allclose(inv_t[1], 0.14088624715805054, rtol=2e-6)


def test_chunked_long_attention_keeps_sinks_and_windows():
    """Sequences of 1024+ run attention in query chunks: same result as the full map."""
    cfg, params = family_model("gpt_oss", num_layers=1, layer_types=("sliding",), sequence_len=2048, d_model=16,
                               num_q_heads=2, num_kv_heads=1, sliding_window=100, num_experts=4, ffn=8)
    toks = np.random.default_rng(1).integers(3, cfg.vocab_size, (1, 1024)).astype(np.int32)
    toks[0, :20] = 0
    fwd = jax.jit(forward, static_argnames=("cfg", "capture"))
    chunked = fwd(params, jnp.asarray(toks), cfg)
    full = fwd(params, jnp.asarray(toks), cfg, capture=frozenset({"blocks.attn.logits"}))  # forces the full map
    np.testing.assert_allclose(np.asarray(chunked.logits)[0, 20:], np.asarray(full.logits)[0, 20:], atol=2e-5)


def test_dla_and_zero_sweep_with_a_dense_layer_and_a_shared_expert():
    """The analysis helpers re-form writes with the model's own parts: DLA sums to the logit with a dense layer,
    a shared expert and the MoE captures stacked over the MoE layers only; an expert sweep skips dense layers."""
    from grokviz import analysis as A
    from grokviz.analysis.attribution import DLA_CAPTURE, dla_components

    cfg, params = family_model("qwen2_moe")  # layer 0 dense, layer 1 MoE with a shared expert
    model = gv.Model(cfg, params, bucket=False)
    toks = tokens(cfg)
    run = model.run(toks, capture=DLA_CAPTURE)
    comp = dla_components(params, cfg, run.cache, 7)
    real = toks != cfg.pad_token
    np.testing.assert_allclose(comp["total"][real], run.logits[..., 7][real], atol=1e-4)
    assert comp["experts"].shape[0] == 1 and np.abs(comp["other"][0]).max() > 0  # the dense MLP's share
    df = A.ablation_sweep(model, toks, mode="zero", chunk=4)
    assert sorted(set(df.layer)) == [1]
    iv = gv.Interventions.none(cfg).zero_expert(1, 2)
    want = A.next_token_loss(model.run(toks, interventions=iv).logits, toks, cfg.pad_token)
    got = df[df.expert == 2].loss.iloc[0]
    assert got == pytest.approx(float(want), rel=1e-4)
    with pytest.raises(ValueError, match="dense MLP layer"):
        A.ablation_sweep(model, toks, layers=[0])

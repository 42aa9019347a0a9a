"""Dense vs sparse vs a per-slot loop oracle; Grok routing semantics; padding behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokviz as gv
from grokviz.hooks import Point
from grokviz.model.moe import experts_dense, experts_sparse, route
from grokviz.testing import random_tokens


def loop_oracle(p, x, experts):
    """numpy, one (token, slot) at a time."""
    x = np.asarray(x)
    wg, wu, wd = (np.asarray(p[n]) for n in ("w_gate", "w_up", "w_down"))
    out = np.zeros(experts.shape + (x.shape[-1],), np.float32)
    for b, t, j in np.ndindex(*experts.shape):
        e = int(experts[b, t, j])
        u = x[b, t] @ wg[e]
        g = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        out[b, t, j] = (g * (x[b, t] @ wu[e])) @ wd[e]
    return out


@pytest.mark.parametrize("n_exp,k,b,t", [(8, 2, 2, 24), (4, 3, 1, 7), (16, 1, 3, 5), (8, 8, 1, 3)])
def test_sparse_equals_dense_equals_oracle(n_exp, k, b, t):
    cfg = gv.GrokConfig.golden(num_experts=n_exp, top_k=k, num_layers=1)
    params = gv.init_params(cfg, jax.random.key(1))
    p = jax.tree_util.tree_map(lambda a: a[0], params["blocks"])
    x = jax.random.normal(jax.random.key(2), (b, t, cfg.d_model))
    _, experts = route(x, p, cfg, Point(prefix="blocks."))
    dense = np.asarray(experts_dense(p, x, experts, cfg))
    sparse = np.asarray(experts_sparse(p, x, experts, cfg))
    oracle = loop_oracle(p, x, np.asarray(experts))
    np.testing.assert_allclose(dense, oracle, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(sparse, dense, atol=2e-5, rtol=1e-5)


def test_sparse_handles_all_tokens_on_one_expert():
    cfg = gv.GrokConfig.golden(num_layers=1)
    p = jax.tree_util.tree_map(lambda a: a[0], gv.init_params(cfg, jax.random.key(3))["blocks"])
    x = jax.random.normal(jax.random.key(4), (2, 9, cfg.d_model))
    experts = jnp.stack([jnp.full((2, 9), 5), jnp.full((2, 9), 0)], axis=-1).astype(jnp.int32)
    np.testing.assert_allclose(experts_sparse(p, x, experts, cfg, block=8), experts_dense(p, x, experts, cfg),
                               atol=2e-5)


def test_route_is_grok_semantics():
    cfg = gv.GrokConfig.golden(num_layers=1)
    w = jax.random.normal(jax.random.key(5), (cfg.d_model, cfg.num_experts))
    x = jax.random.normal(jax.random.key(6), (1, 4, cfg.d_model))
    point = Point(frozenset({"blocks.moe.router_probs"}), prefix="blocks.")
    gates, experts = route(x, {"router": w}, cfg, point)
    probs = np.asarray(point.values["blocks.moe.router_probs"])
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(experts), np.argsort(-probs, -1, kind="stable")[..., :2])
    np.testing.assert_allclose(gates, np.take_along_axis(probs, np.asarray(experts), -1))  # not renormalised
    assert np.all(np.asarray(gates).sum(-1) < 1)


@pytest.mark.parametrize("impl", ["dense", "sparse"])
def test_right_padding_does_not_change_real_positions(impl):
    cfg, params = gv.GrokConfig.golden(), gv.init_params(gv.GrokConfig.golden(), jax.random.key(7))
    model = gv.Model(cfg, params)
    toks = random_tokens(cfg, 1, 12, seed=1)
    padded = np.concatenate([toks, np.zeros((1, 5), np.int32)], axis=1)
    a = np.asarray(model.run(toks, expert_impl=impl).logits)
    b = np.asarray(model.run(padded, expert_impl=impl).logits)
    np.testing.assert_allclose(b[:, :12], a, atol=2e-5)
    assert np.all(np.isfinite(b))


def test_left_padding_is_finite_and_pad_rows_attend_uniformly():
    cfg, params = gv.GrokConfig.golden(), gv.init_params(gv.GrokConfig.golden(), jax.random.key(8))
    model = gv.Model(cfg, params)
    toks = random_tokens(cfg, 2, 10, seed=2)
    toks[0, :4] = 0  # left padding
    run = model.run(toks, capture=["blocks.attn.pattern"], expert_impl="sparse")
    assert np.all(np.isfinite(run.logits))
    pattern = np.asarray(run.cache["blocks.attn.pattern"])
    # a query with no real key at or before it is uniform over all T keys (reference semantics, -1e30 mask)
    np.testing.assert_allclose(pattern[:, 0, :, :4, :], 1 / 10, rtol=1e-6)
    # the real queries never attend to the pad keys
    assert np.abs(pattern[:, 0, :, 4:, :4]).max() == 0


@pytest.mark.parametrize("quantized", [False, True])
def test_gathered_experts_for_few_tokens_equal_dense(quantized):
    """Decoding (fewer slots than experts) runs each slot on its own expert's gathered weights only."""
    from grokviz.model.moe import experts_gathered
    from grokviz.params import Int8Weight

    cfg = gv.GrokConfig.golden(num_layers=1, num_experts=8, top_k=2)
    p = jax.tree_util.tree_map(lambda a: a[0], gv.init_params(cfg, jax.random.key(9))["blocks"])
    if quantized:  # int8 experts with per-column scales, as the release stores them
        for n in ("w_gate", "w_up", "w_down"):
            w = p[n]
            scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127
            p[n] = Int8Weight(weight=jnp.round(w / scale).astype(jnp.int8), scales=scale)
    x = jax.random.normal(jax.random.key(10), (1, 1, cfg.d_model))
    experts = jnp.asarray([[[5, 2]]], jnp.int32)
    want = experts_dense(p, x, experts, cfg)
    np.testing.assert_allclose(experts_gathered(p, x, experts, cfg), want, atol=1e-5)
    np.testing.assert_allclose(experts_sparse(p, x, experts, cfg), want, atol=1e-5)  # takes the gathered path

"""Cases shared by the attention-implementation tests (test_tiled_attention, test_fused_attention): each fast form
is checked against the reference form on the same inputs, built here once."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

import grokviz as gv
from grokviz.families import preset
from grokviz.model import forward

A = importlib.import_module("grokviz.model.attention")


def rel(a, b):
    """max |a - b| / max |b|, in fp32 (bf16 inputs compared as fp32)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tokens(cfg, b, t, seed=0):
    toks = np.random.default_rng(seed).integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
    toks[0, :5] = cfg.pad_token       # left padding: queries with no allowed key
    toks[-1, t - 3:] = cfg.pad_token  # right padding
    return toks


def core_case(cfg, t=21, s=None, seed=0):
    """q [b kv g t d], k, v [b s kv d], the mask and the sinks: padding and a bucket length (s == t), or a chunk of t
    queries at slots s - t .. s - 1 of a buffer of s (causal over the buffer, a few slots not real)."""
    b, kv, g, d = 2, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    s = s or t
    r = np.random.default_rng(seed)
    qg = jnp.asarray(3 * r.standard_normal((b, kv, g, t, d)), jnp.float32)
    k = jnp.asarray(3 * r.standard_normal((b, s, kv, d)), jnp.float32)
    v = jnp.asarray(r.standard_normal((b, s, kv, d)), jnp.float32)
    if s == t:
        toks = jnp.asarray(tokens(cfg, b, t, seed))
        allowed, fill = A.attention_mask(toks, cfg.pad_token, length=jnp.int32(t - 2))
        pos = A.positions_of(toks, cfg)
        k_pos = pos
    else:
        real = np.ones((b, s), bool)
        real[0, :3] = False
        q_slot = np.arange(s - t, s)
        allowed = jnp.asarray(real[:, None, None, :] & (np.arange(s)[None, :] <= q_slot[:, None])[None, None])
        fill, pos, k_pos = jnp.float32(A.MASK_VALUE), jnp.broadcast_to(jnp.asarray(q_slot), (b, t)), \
            jnp.broadcast_to(jnp.arange(s), (b, s))
    if cfg.sliding_window:
        allowed = A.window_allowed(allowed, pos, k_pos, cfg.sliding_window)
    sinks = jnp.asarray(r.standard_normal((kv, g)), jnp.float32) if cfg.attn_sinks else None
    return qg, k, v, (allowed, fill), sinks


def reference_and(impl, params, toks, cfg, **kw):
    """(reference, ``impl``) forwards of the same tokens, each in a fresh jit (tile sizes are read at trace)."""
    out = {}
    for name in ("reference", impl):
        out[name] = jax.jit(functools.partial(forward, cfg=cfg, attn_impl=name, **kw))(params, jnp.asarray(toks))
    return out["reference"], out[impl]


def grad_rel_to_reference(cfg, params, impl):
    """rel(grad, reference grad) of sum(logits^2) with respect to w_q through ``impl`` (the reference grad is
    checked non-zero first)."""
    toks = jnp.asarray(tokens(cfg, 2, 13, seed=5))

    def loss(w_q, name):
        p = {**params, "blocks": {**params["blocks"], "w_q": w_q}}
        return jnp.sum(forward(p, toks, cfg, attn_impl=name).logits ** 2)

    w = params["blocks"]["w_q"]
    g_ref = jax.jit(jax.grad(functools.partial(loss, name="reference")))(w)
    g = jax.jit(jax.grad(functools.partial(loss, name=impl)))(w)
    assert np.abs(np.asarray(g_ref)).max() > 0
    return rel(g, g_ref)


#: small configs for the core cases: Grok's 30·tanh soft cap; gpt-oss sinks with a sliding window
CORE_CFGS = {
    "grok": lambda: gv.GrokConfig.golden(),
    "gpt_oss": lambda: preset("gpt_oss", vocab_size=96, d_model=32, num_layers=2, num_q_heads=4, num_kv_heads=2,
                              head_dim=8, ffn=24, num_experts=4, top_k=2, sequence_len=64, pad_token=0,
                              sliding_window=5, layer_types=("sliding", "full")),
}

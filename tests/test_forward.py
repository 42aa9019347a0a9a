"""The forward pass in parts (embed -> run_blocks -> unembed), its capture validation, layout and callback contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokviz as gv
from grokviz.model import embed, forward, run_blocks, unembed


@pytest.fixture(scope="module")
def parts(golden):
    cfg, params, z = golden
    return cfg, params, jnp.asarray(z["tokens"])  # row 1 ends in padding


def test_capture_is_validated_like_model_run(parts):
    cfg, params, toks = parts
    with pytest.raises(KeyError, match="Did you mean: blocks.moe.router_probs"):
        forward(params, toks, cfg, capture=["blocks.moe.router_prob"])
    with pytest.raises(KeyError, match="Unknown hook name 'blocks.attn.postnorm'"):
        forward(params, toks, cfg, callbacks={"blocks.attn.postnorm": lambda v, layer: v})
    # a list and a glob select the same names as in Model.run (shapes only: nothing is compiled)
    out = jax.eval_shape(lambda p, t: forward(p, t, cfg, capture=["blocks.moe.top_k_*", "embed.out"]), params, toks)
    assert set(out.cache) == {"blocks.moe.top_k_experts", "blocks.moe.top_k_weights", "embed.out"}


def test_output_carries_the_cache_layout(parts):
    cfg, params, toks = parts
    spec = gv.AttentionSpec(layers=(-1,), heads=(0, 3))
    fn = lambda p, t: forward(p, t, cfg, capture={"blocks.attn.pattern", "blocks.attn.entropy"}, attn_spec=spec)  # noqa: E731
    out = jax.eval_shape(fn, params, toks)
    assert dict(out.layout) == {"blocks.attn.pattern": ((1,), (0, 3))}
    assert out.cache["blocks.attn.pattern"].shape == (1, 2, 2, 24, 24)
    assert out.cache["blocks.attn.entropy"].shape == (2, 2, 4, 24)  # reduced hooks keep every layer and head
    heads_only = jax.eval_shape(lambda p, t: forward(p, t, cfg, capture={"blocks.attn.scores"},
                                                     attn_spec=gv.AttentionSpec(heads=(1,))), params, toks)
    assert dict(heads_only.layout) == {"blocks.attn.scores": (None, (1,))}
    assert jax.eval_shape(lambda p, t: forward(p, t, cfg), params, toks).layout == ()


@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("hook", ["blocks.resid_post", "blocks.attn.q"])  # maps recomputed / kept in the scan
def test_callbacks_run_once_per_trace_of_the_block(parts, unroll, hook):
    cfg, params, toks = parts
    calls = []

    def cb(value, layer):
        calls.append(layer)
        return value

    spec = gv.AttentionSpec(layers=(1,))
    fn = lambda p, t: forward(p, t, cfg, capture={"blocks.attn.pattern"}, attn_spec=spec, unroll=unroll,  # noqa: E731
                              callbacks={hook: cb})
    jax.jit(fn).lower(params, toks)  # one trace, no compile
    assert len(calls) == (cfg.num_layers if unroll else 1)


def test_callback_must_keep_shape_and_dtype(parts):
    cfg, params, toks = parts
    with pytest.raises(ValueError, match=r"callback for blocks.resid_mid returned bfloat16\[2, 24, 64\]"):
        jax.eval_shape(lambda p, t: forward(p, t, cfg, callbacks={
            "blocks.resid_mid": lambda v, layer: v.astype(jnp.bfloat16)}), params, toks)


def test_forward_is_embed_run_blocks_unembed(parts):
    cfg, params, toks = parts
    capture = frozenset({"blocks.resid_pre", "blocks.resid_post", "blocks.moe.top_k_experts"})
    full = jax.jit(lambda p, t: forward(p, t, cfg, capture=capture))(params, toks)

    @jax.jit
    def composed(p, t):
        blocks = run_blocks(p, embed(p, t, cfg), t, cfg, capture=capture)
        return unembed(p, blocks.h, cfg), blocks.cache

    logits, cache = composed(params, toks)
    np.testing.assert_array_equal(logits, full.logits)
    for name in capture:
        np.testing.assert_array_equal(cache[name], full.cache[name])

    # from a given layer on: static start (captures cover the layers run) and traced start (one program)
    h1 = full.cache["blocks.resid_pre"][1]
    late = jax.jit(lambda p, h, t: run_blocks(p, h, t, cfg, start_layer=1, capture=capture))(params, h1, toks)
    assert late.cache["blocks.resid_post"].shape[0] == cfg.num_layers - 1
    np.testing.assert_allclose(late.cache["blocks.resid_post"], full.cache["blocks.resid_post"][1:], atol=1e-5)
    np.testing.assert_array_equal(late.cache["blocks.moe.top_k_experts"], full.cache["blocks.moe.top_k_experts"][1:])
    traced = jax.jit(lambda p, h, t, s: run_blocks(p, h, t, cfg, start_layer=s).h)(params, h1, toks, jnp.int32(1))
    np.testing.assert_allclose(traced, late.h, atol=1e-5)
    first = jax.jit(lambda p, t: run_blocks(p, embed(p, t, cfg), t, cfg, stop_layer=1).h)(params, toks)
    np.testing.assert_allclose(first, h1, atol=1e-5)


def test_run_blocks_rejects_bad_arguments(parts):
    cfg, params, toks = parts
    h = jnp.zeros(toks.shape + (cfg.d_model,), jnp.float32)
    with pytest.raises(ValueError, match=r"start_layer must be in \[0, 2\], got 3"):
        run_blocks(params, h, toks, cfg, start_layer=3)
    with pytest.raises(ValueError, match=r"stop_layer must be in \[0, 2\], got 5"):
        run_blocks(params, h, toks, cfg, stop_layer=5)
    with pytest.raises(ValueError, match="blocks.\\* patches only"):
        run_blocks(params, h, toks, cfg, patches={"embed.out": (h, jnp.ones(toks.shape, bool))})
    with pytest.raises(ValueError, match="need a Python int start_layer"):
        jax.eval_shape(lambda s: run_blocks(params, h, toks, cfg, start_layer=s, capture={"blocks.resid_post"}),
                       jnp.int32(1))


def test_maps_kept_in_the_scan_equal_maps_recomputed_after_it(parts):
    cfg, params, toks = parts
    spec = gv.AttentionSpec(layers=(1,), heads=(2,))
    capture = frozenset({"blocks.attn.pattern", "blocks.attn.logits"})
    identity = (("blocks.attn.k", lambda v, layer: v),)  # a callback on k keeps the maps from inside the scan

    def both(p, t, impl):
        a = forward(p, t, cfg, capture=capture, attn_spec=spec, attn_impl=impl)
        b = forward(p, t, cfg, capture=capture, attn_spec=spec, callbacks=dict(identity), attn_impl=impl)
        return a, b

    for impl in ("reference", "tiled"):
        recomputed, kept = jax.jit(both, static_argnums=2)(params, toks, impl)
        assert recomputed.layout == kept.layout
        for name in capture:
            assert kept.cache[name].shape == (1, 2, 1, 24, 24)
            np.testing.assert_allclose(kept.cache[name], recomputed.cache[name], atol=1e-5, err_msg=name)
        if impl == "reference":
            np.testing.assert_array_equal(kept.logits, recomputed.logits)
        else:  # the maps beside the tiled loop read the called-back k: XLA fuses the loop's inputs differently
            np.testing.assert_allclose(kept.logits, recomputed.logits, rtol=0, atol=2e-6)


def test_parts_refuse_bad_tokens_and_shapes(parts):
    """Concrete out-of-range ids would be clamped by the gather: an error, as are empty or non-integer tokens
    and a residual of the wrong width."""
    cfg, params, toks = parts
    with pytest.raises(ValueError, match=rf"token id {cfg.vocab_size + 3} is outside the vocabulary"):
        forward(params, toks.at[0, 2].set(cfg.vocab_size + 3), cfg)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        embed(params, toks.at[0, 0].set(-1), cfg)
    with pytest.raises(ValueError, match=r"seq > 0, got shape \(2, 0\)"):
        forward(params, toks[:, :0], cfg)
    with pytest.raises(ValueError, match="integer ids"):
        embed(params, toks.astype(jnp.float32), cfg)
    with pytest.raises(ValueError, match=rf"d_model={cfg.d_model}\], got \(2, 3, 7\)"):
        unembed(params, jnp.zeros((2, 3, 7)), cfg)

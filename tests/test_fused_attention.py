"""The fused CPU attention kernel (grokviz.kernels, called through jax.ffi) equals the reference form to fp32
rounding: the core (soft cap, left/right padding, bucket length, sinks + sliding window, lengths not a multiple
of the tiles, bf16, a chunk over a longer KV buffer, the pattern with the reference's exact zeros), whole
forwards of the golden Grok and of Hugging Face families, prefill into a KV cache, captured maps (logits
bit-identical with and without them), gradients, vmap, and the fallback to the tiled form without a kernel."""

import functools
import importlib
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _attention_cases import CORE_CFGS as CFGS
from _attention_cases import core_case as _core_case
from _attention_cases import grad_rel_to_reference, reference_and
from _attention_cases import rel as _rel
from _attention_cases import tokens as _tokens

import grokviz as gv
from grokviz import kernels
from grokviz.kernels import build as B
from grokviz.kernels.fused import attend_fused
from grokviz.model import KVCache, forward

A = importlib.import_module("grokviz.model.attention")
HF = os.path.join(os.path.dirname(__file__), "data", "hf")

if not kernels.available():
    pytest.skip(f"the fused attention kernel is unavailable here: {kernels.reason()}", allow_module_level=True)


def _reference(qg, k, v, mask, cfg, sinks):
    _, _, pat = A._probs(qg, k, *mask, cfg, sinks)
    b, kv, g, t, s = pat.shape
    return jnp.einsum("bhgts,bshd->bthgd", pat, v), pat.reshape(b, kv * g, t, s)


@pytest.mark.parametrize("family", sorted(CFGS))
def test_core_and_pattern_equal_the_reference(family):
    cfg = CFGS[family]()
    for t, s, tiles in ((21, None, ((8, 4), (64, 128))), (7, 30, ((4, 8),))):  # never a multiple of the tiles
        qg, k, v, mask, sinks = _core_case(cfg, t, s)
        o_ref, p_ref = _reference(qg, k, v, mask, cfg, sinks)
        for tq, tk in tiles:
            fn = functools.partial(attend_fused, cfg=cfg, dt=jnp.float32, tq=tq, tk=tk)
            o = jax.jit(fn)(qg, k, v, mask, sinks=sinks)
            o_p, pat = jax.jit(functools.partial(fn, pattern=True))(qg, k, v, mask, sinks=sinks)
            assert _rel(o, o_ref) < 2e-6, (t, s, tq, tk)  # scores up to the cap of 30: a few ulp of exp(s - m)
            np.testing.assert_array_equal(o_p, o)  # the pattern variant runs the same arithmetic
            np.testing.assert_allclose(pat, p_ref, atol=1e-6, err_msg=str((t, s, tq, tk)))
            np.testing.assert_array_equal(np.asarray(pat) == 0, np.asarray(p_ref) == 0)  # the reference's zeros
    if sinks is None:  # left-padded queries (first case): the mean of v over the keys before the bucket length
        qg, k, v, mask, _ = _core_case(cfg)
        o = attend_fused(qg, k, v, mask, cfg, jnp.float32)
        mean = jnp.mean(v[0, :19], axis=0)[None, :, None, :]
        np.testing.assert_allclose(o[0, :5], jnp.broadcast_to(mean, o[0, :5].shape), rtol=1e-5, atol=1e-7)


def test_bf16_inputs_and_vmap():
    cfg = CFGS["grok"]()
    qg, k, v, mask, _ = _core_case(cfg, 13)
    o_ref, _ = _reference(qg, k, v, mask, cfg, None)
    bf = [a.astype(jnp.bfloat16) for a in (qg, k, v)]
    o16 = attend_fused(*bf, mask, cfg, jnp.bfloat16)
    o16_ref, _ = _reference(*[a.astype(jnp.float32) for a in bf], mask, cfg, None)
    assert o16.dtype == jnp.bfloat16 and _rel(o16, o16_ref) < 1e-2  # bf16 output rounding
    many = jax.vmap(lambda q: attend_fused(q, k, v, mask, cfg, jnp.float32))(jnp.stack([qg, 2 * qg]))
    assert _rel(many[0], o_ref) < 2e-6
    assert _rel(many[1], _reference(2 * qg, k, v, mask, cfg, None)[0]) < 2e-6


def _both(params, toks, cfg, **kw):
    return reference_and("fused", params, toks, cfg, **kw)


def test_golden_forward_fused_equals_reference(golden):
    cfg, params, z = golden
    toks = np.asarray(z["tokens"])
    ref, fused = _both(params, toks, cfg, length=jnp.int32(toks.shape[1] - 1))
    assert _rel(fused.logits, ref.logits) < 1e-6
    assert _rel(fused.logits, z["logits"]) < 1.2e-6  # the golden itself
    ref, fused = _both(params, _tokens(cfg, 2, 27, seed=3), cfg)  # left + right padding
    assert _rel(fused.logits, ref.logits) < 1e-6


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])  # sinks + sliding window + YaRN; QK norm per head
def test_hf_family_forward_fused_equals_reference(family):
    model = gv.load(os.path.join(HF, family))
    ref, fused = _both(model.params, _tokens(model.cfg, 2, 19, seed=4), model.cfg)
    assert _rel(fused.logits, ref.logits) < 1e-6


def test_prefill_into_a_kv_cache_uses_the_kernel(golden):
    cfg, params, _ = golden
    toks = jnp.asarray(_tokens(cfg, 2, 11, seed=6))
    out = {}
    for impl in ("reference", "fused"):
        kv = KVCache.empty(cfg, 2, 24)

        def two_chunks(p, t, kv=kv, impl=impl):
            first = forward(p, t[:, :6], cfg, kv=kv, attn_impl=impl)
            return first.logits, forward(p, t[:, 6:], cfg, kv=first.kv, attn_impl=impl).logits
        out[impl] = jax.jit(two_chunks)(params, toks)
    for ref, fused in zip(out["reference"], out["fused"]):
        assert _rel(fused, ref) < 1e-6


def test_captured_maps_equal_the_reference_and_leave_the_logits_unchanged(golden):
    cfg, params, _ = golden
    toks = jnp.asarray(_tokens(cfg, 2, 27, seed=7))
    maps = frozenset({"blocks.attn.pattern", "blocks.attn.entropy"})

    @functools.partial(jax.jit, static_argnames=("impl", "capture"))
    def run(p, t, impl, capture=frozenset()):
        return forward(p, t, cfg, capture=capture, attn_impl=impl)

    plain = run(params, toks, "fused")
    for capture in (maps, frozenset({"blocks.attn.entropy", "blocks.attn.top_keys"})):
        np.testing.assert_array_equal(run(params, toks, "fused", capture).logits, plain.logits, err_msg=str(capture))
    fused, ref = run(params, toks, "fused", maps), run(params, toks, "reference", maps)
    for name in maps:
        np.testing.assert_allclose(fused.cache[name], ref.cache[name], rtol=2e-5, atol=2e-6, err_msg=name)


def test_pattern_written_in_place_into_a_maps_buffer():
    cfg = CFGS["gpt_oss"]()  # sinks and a sliding window: rows that weigh less than 1, tiles skipped
    qg, k, v, mask, sinks = _core_case(cfg, 21)
    o, pat = attend_fused(qg, k, v, mask, cfg, jnp.float32, sinks, pattern=True)
    maps = jnp.full((3, *pat.shape), 7.0, jnp.float32)
    into = jax.jit(lambda m, s: attend_fused(qg, k, v, mask, cfg, jnp.float32, sinks, into=(m, s)))
    o2, m2 = into(maps, 1)
    np.testing.assert_array_equal(o2, o)
    np.testing.assert_array_equal(m2[1], pat)  # every element of the slot written, skipped tiles included
    assert np.all(np.asarray(m2)[[0, 2]] == 7.0)  # the other slots as they were
    with pytest.raises(Exception, match="slot outside the maps buffer"):
        into(maps, 3)
    with pytest.raises(ValueError, match="must be float32"):
        attend_fused(qg, k, v, mask, cfg, jnp.float32, sinks, into=(maps[:, :, :3], 0))

    def loss(q, m, in_place):  # gradients: those of the pattern variant, and through the untouched slots
        if in_place:
            o, m = attend_fused(q, k, v, mask, cfg, jnp.float32, sinks, into=(m, 2))
            return jnp.sum(o ** 2) + jnp.sum(m * m)
        o, p = attend_fused(q, k, v, mask, cfg, jnp.float32, sinks, pattern=True)
        return jnp.sum(o ** 2) + jnp.sum(p * p) + jnp.sum(m[:2] * m[:2])
    g_in, g_out = (jax.grad(loss, argnums=(0, 1))(qg, maps, f) for f in (True, False))
    np.testing.assert_allclose(g_in[0], g_out[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(g_in[1][2], 0.0)
    np.testing.assert_array_equal(g_in[1][:2], g_out[1][:2])


def test_every_layer_pattern_is_one_buffer_written_by_the_kernel(golden):
    cfg, params, _ = golden
    toks = jnp.asarray(_tokens(cfg, 2, 27, seed=9))
    capture = frozenset({"blocks.attn.pattern", "blocks.attn.entropy", "blocks.attn.pattern_at"})
    fn = jax.jit(functools.partial(forward, cfg=cfg, capture=capture, attn_impl="fused"))
    hlo = fn.lower(params, toks).compile().as_text()
    assert "grokviz_attention_into" in hlo and "grokviz_uninit" in hlo
    fused = fn(params, toks)
    unrolled = forward(params, toks, cfg, capture=capture, attn_impl="fused", unroll=True)
    ref = forward(params, toks, cfg, capture=capture, attn_impl="reference")
    np.testing.assert_array_equal(fused.logits, forward(params, toks, cfg, attn_impl="fused").logits)
    for name in capture:
        assert fused.cache[name].shape == ref.cache[name].shape
        np.testing.assert_allclose(fused.cache[name], ref.cache[name], rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(fused.cache[name], unrolled.cache[name], rtol=2e-5, atol=2e-6, err_msg=name)
    # a patch on the logits takes the reference path in every layer: the buffer is then filled per layer
    patched = forward(params, toks, cfg, capture=capture, attn_impl="fused",
                      callbacks={"blocks.attn.logits": lambda x, layer: x * 0.5})
    ref = forward(params, toks, cfg, capture=capture, attn_impl="reference",
                  callbacks={"blocks.attn.logits": lambda x, layer: x * 0.5})
    np.testing.assert_allclose(patched.cache["blocks.attn.pattern"], ref.cache["blocks.attn.pattern"], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(patched.cache["blocks.attn.pattern"]) == 0,
                                  np.asarray(ref.cache["blocks.attn.pattern"]) == 0)


def test_gradients_through_the_fused_path(golden):
    cfg, params, _ = golden
    assert grad_rel_to_reference(cfg, params, "fused") < 1e-5


def test_auto_is_fused_here_and_the_run_records_it(golden_model):
    assert A.resolve_impl("auto") == "fused"
    run = golden_model.run(np.arange(3, 12, dtype=np.int32)[None])
    assert run.settings()["attn_impl"] == "fused"


def test_without_the_kernel_fused_falls_back_to_tiled_with_a_message(golden, monkeypatch, caplog):
    cfg, params, _ = golden
    toks = jnp.asarray(_tokens(cfg, 1, 9, seed=8))
    monkeypatch.setattr(B, "_state", {"ok": False, "reason": "no C++ compiler found (simulated)", "path": None})
    monkeypatch.setattr(kernels, "_told", set())
    with caplog.at_level(logging.WARNING, logger="grokviz.kernels"):
        assert A.resolve_impl("auto") == "tiled"
        assert A.resolve_impl("fused") == "tiled"
        A.resolve_impl("fused")
    said = [r.getMessage() for r in caplog.records if "falls back to 'tiled'" in r.getMessage()]
    assert len(said) == 1 and "no C++ compiler found (simulated)" in said[0]  # once per process
    fallback = forward(params, toks, cfg, attn_impl="fused").logits
    np.testing.assert_array_equal(fallback, forward(params, toks, cfg, attn_impl="tiled").logits)
    with pytest.raises(RuntimeError, match="unavailable: no C"):
        attend_fused(*_core_case(cfg, 5)[:4], cfg, jnp.float32)


def test_a_failed_build_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("GROKVIZ_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setattr(B, "_state", {})
    state = B.load()
    assert not state["ok"] and "exited with 1" in state["reason"]
    assert not any(p.suffix == ".so" for p in tmp_path.rglob("*"))  # no partial library left behind
    monkeypatch.setenv("GROKVIZ_KERNELS", "0")
    assert B.load(rebuild=True)["reason"] == "disabled by GROKVIZ_KERNELS=0"

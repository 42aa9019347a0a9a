"""Tiled attention (grokviz.model.tiled: query x key tiles, online softmax, causal tiles skipped) equals the
reference form to fp32 rounding: the core on its own (soft cap, left/right padding, bucket length, sinks, sliding
window, lengths not a multiple of the tiles, the reduced summaries), whole forwards of the golden Grok and of
Hugging Face families (sinks + sliding window, QK norm), and gradients through it."""

import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _attention_cases import CORE_CFGS, grad_rel_to_reference, reference_and
from _attention_cases import core_case as _core_case
from _attention_cases import rel as _rel
from _attention_cases import tokens as _tokens

import grokviz as gv
from grokviz.model import tiled as T

A = importlib.import_module("grokviz.model.attention")
HF = os.path.join(os.path.dirname(__file__), "data", "hf")
REDUCED = frozenset({"attn.entropy", "attn.top_keys", "attn.top_key_weights"})


@pytest.mark.parametrize("family", sorted(CORE_CFGS))
def test_core_equals_reference_at_every_tiling(family):
    cfg = CORE_CFGS[family]()
    qg, k, v, mask, sinks = _core_case(cfg)
    _, _, pat = A._probs(qg, k, *mask, cfg, sinks)
    o_ref = jnp.einsum("bhgts,bshd->bthgd", pat, v)
    flat = pat.reshape(pat.shape[0], -1, *pat.shape[3:])
    ref = A._row_summaries(flat, REDUCED, 3)
    for tq, tk in ((8, 4), (4, 8), (64, 64)):  # 21 tokens: never a multiple of the tiles
        o, s = jax.jit(functools.partial(T.attend_tiled, cfg=cfg, dt=jnp.float32, want=REDUCED, top_keys=3,
                                         tq=tq, tk=tk))(qg, k, v, mask, sinks=sinks)
        assert _rel(o, o_ref) < 2e-6, (tq, tk)  # scores up to the cap of 30: a few ulp of exp(s - m)
        np.testing.assert_allclose(s["attn.entropy"], ref["attn.entropy"], atol=2e-6, err_msg=str((tq, tk)))
        np.testing.assert_allclose(s["attn.top_key_weights"], ref["attn.top_key_weights"], atol=1e-6)
        np.testing.assert_array_equal(s["attn.top_keys"], ref["attn.top_keys"])
    if sinks is None:  # left-padded queries: the mean of v over the keys before the bucket length
        mean = jnp.mean(v[0, :19], axis=0)[None, :, None, :]  # [1, kv, 1, d]
        np.testing.assert_allclose(o[0, :5], jnp.broadcast_to(mean, o[0, :5].shape), rtol=1e-5, atol=1e-7)


def test_only_tiles_at_or_below_the_diagonal_are_visited():
    qi, ki = T.tile_pairs(21, 8, 4)
    assert len(qi) == 2 + 4 + 6  # query blocks [0,8) [8,16) [16,21) need key blocks up to 7, 15, 20
    assert all(k * 4 <= min((q + 1) * 8, 21) - 1 for q, k in zip(qi, ki))
    assert len(T.tile_pairs(1024, 128, 128)[0]) == 8 * 9 // 2


def _small_tiles(monkeypatch):
    monkeypatch.setattr(T, "TILE_Q", 8)
    monkeypatch.setattr(T, "TILE_K", 4)


def _both(params, toks, cfg, **kw):
    return reference_and("tiled", params, toks, cfg, **kw)


def test_golden_forward_tiled_equals_reference(golden, monkeypatch):
    _small_tiles(monkeypatch)
    cfg, params, z = golden
    toks = np.asarray(z["tokens"])
    ref, tiled = _both(params, toks, cfg, length=jnp.int32(toks.shape[1] - 1))
    assert _rel(tiled.logits, ref.logits) < 1e-6
    assert _rel(tiled.logits, z["logits"]) < 1.2e-6  # the golden itself
    padded = _tokens(cfg, 2, 27, seed=3)  # left + right padding, 27 tokens: 4 query blocks, 7 key blocks
    ref, tiled = _both(params, padded, cfg, capture=frozenset({"blocks.moe.top_k_experts"}))
    assert _rel(tiled.logits, ref.logits) < 1e-6
    np.testing.assert_array_equal(tiled.cache["blocks.moe.top_k_experts"], ref.cache["blocks.moe.top_k_experts"])


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])  # sinks + sliding window + YaRN; QK norm per head
def test_hf_family_forward_tiled_equals_reference(family, monkeypatch):
    _small_tiles(monkeypatch)
    model = gv.load(os.path.join(HF, family))
    cfg = model.cfg
    toks = _tokens(cfg, 2, 19, seed=4)
    ref, tiled = _both(model.params, toks, cfg)
    assert _rel(tiled.logits, ref.logits) < 1e-6


def test_gradients_through_the_tiled_path(golden, monkeypatch):
    _small_tiles(monkeypatch)
    cfg, params, _ = golden
    assert grad_rel_to_reference(cfg, params, "tiled") < 1e-5


def test_attn_impl_is_checked():
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        A.with_impl(None, "flash")


@pytest.mark.parametrize("impl", ["tiled", "fused"])
def test_captured_maps_and_summaries_in_any_combination(golden, impl):
    """Every requested map and summary is recorded, whichever of them come together (logits with the chosen
    query rows but without the pattern was once dropped by the fast paths), and equals the reference's."""
    if impl == "fused" and A.resolve_impl("fused") != "fused":
        pytest.skip("the fused attention kernel is unavailable here")
    cfg, params, _ = golden
    toks = _tokens(cfg, 2, 27, seed=10)
    spec = gv.AttentionSpec(queries=(3, -1), top_keys=2)
    for names in (("logits", "pattern_at"), ("scores", "entropy", "top_keys"), ("pattern", "pattern_at", "entropy"),
                  ("logits", "pattern", "top_key_weights")):
        capture = frozenset(f"blocks.attn.{n}" for n in names)
        ref, fast = reference_and(impl, params, toks, cfg, capture=capture, attn_spec=spec)
        assert set(fast.cache.keys()) == set(ref.cache.keys()) == capture, names
        for name in capture - {"blocks.attn.top_keys"}:
            want = np.asarray(ref.cache[name])  # logits and scores: q and k from another fusion, ~1e-6 of the largest
            atol = 2e-6 * max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(fast.cache[name], want, rtol=2e-5, atol=atol, err_msg=name)

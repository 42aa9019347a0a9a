"""Parity with the official Grok-1 reference (shared/golden, copied to tests/data)."""

import numpy as np
import pytest

PATHS = [(impl, unroll) for impl in ("dense", "sparse") for unroll in (False, True)]
INTERMEDIATES = {  # golden key -> our hook
    "attn_out": "blocks.attn.out",
    "moe_in": "blocks.moe.pre_norm",
    "router_logits": "blocks.moe.router_logits",
    "router_probs": "blocks.moe.router_probs",
    "expert_gate": "blocks.moe.top_k_weights",
    "moe_out": "blocks.moe.out",
    "resid": "blocks.resid_post",
}


@pytest.fixture(scope="module", params=PATHS, ids=[f"{i}-{'unrolled' if u else 'scan'}" for i, u in PATHS])
def golden_run(request, golden_model, golden):
    impl, unroll = request.param
    _, _, z = golden
    return golden_model.run(z["tokens"], capture=["*"], expert_impl=impl, unroll=unroll), z


# Measured max |logit error| (2026-12-01, CPU): 5.96e-7 on every path as run here (bucketed to 32 tokens),
# 9.20e-7 unbucketed with lax.scan. Pinned at twice the bucketed figure, so a change that loses precision shows.
LOGIT_TOL = 1.2e-6


def test_logits_match_reference(golden_run):
    run, z = golden_run
    err = np.abs(np.asarray(run.logits) - z["logits"]).max()
    assert err < LOGIT_TOL, err
    assert np.all(np.isfinite(run.logits))


def test_selected_experts_exact(golden_run):
    run, z = golden_run
    np.testing.assert_array_equal(np.asarray(run.cache["blocks.moe.top_k_experts"]), z["expert_index"])


@pytest.mark.parametrize("key", list(INTERMEDIATES))
def test_intermediates_match_reference(golden_run, key):
    run, z = golden_run
    ref = z[key]
    ours = np.asarray(run.cache[INTERMEDIATES[key]])
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_embedding_and_final_norm_match(golden_run):
    run, z = golden_run
    for hook, ref in (("embed.out", "transformer_in"), ("final_norm.out", "final_normed")):
        np.testing.assert_allclose(run.cache[hook], z[ref], atol=1e-5 * np.abs(z[ref]).max())


def test_logits_literal_bf16_within_documented_gap(golden_model, golden):
    """Our fp32 path targets the jitted reference; the op-by-op bf16 variant differs by ~1.4e-3 (golden README)."""
    _, _, z = golden
    run = golden_model.run(z["tokens"])
    assert np.abs(np.asarray(run.logits) - z["logits_literal_bf16_moe"]).max() < 3e-3

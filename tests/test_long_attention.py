"""Long sequences: query-chunked causal attention (no full map kept) equals the full computation."""

import importlib

import jax
import numpy as np
import pytest

import grokviz as gv
from grokviz.testing import random_tokens

A = importlib.import_module("grokviz.model.attention")

REDUCED = ["blocks.attn.entropy", "blocks.attn.top_keys", "blocks.attn.top_key_weights", "blocks.attn.pattern_at"]


@pytest.fixture(scope="module")
def setup():
    cfg = gv.GrokConfig.golden(sequence_len=2048, num_layers=2)
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(11)))
    toks = random_tokens(cfg, 2, 1100, seed=12)  # bucketed to 1280: chunked path (>= 1024)
    toks[0, :5] = 0    # left padding: queries with no key
    toks[1, 1050:] = 0  # right padding
    spec = gv.AttentionSpec(queries=(0, 7, -1), top_keys=3)
    chunked = model.run(toks, capture=REDUCED + ["blocks.moe.top_k_experts"], attention=spec)
    # capturing scores forces the full-map path
    full = model.run(toks, capture=REDUCED + ["blocks.moe.top_k_experts", "blocks.attn.pattern", "blocks.attn.scores"],
                     attention=spec)
    return cfg, chunked, full


def test_pattern_assembled_from_chunks_equals_the_full_map(setup):
    _, chunked, full = setup
    run = full.model.run(full.tokens, capture=["blocks.attn.pattern"])
    pattern, ref = np.asarray(run.cache["blocks.attn.pattern"]), np.asarray(full.cache["blocks.attn.pattern"])
    np.testing.assert_allclose(pattern, ref, atol=1e-6)
    np.testing.assert_allclose(pattern[:, 0, :, :5, :1100], 1 / 1100, rtol=1e-5)  # left padding: uniform
    np.testing.assert_allclose(run.logits, full.logits, atol=2e-5)
    np.testing.assert_array_equal(run.logits, chunked.logits)  # the same chunks as without the capture


def test_chunked_path_is_taken_only_without_logits_scores_or_patched_maps():
    from grokviz.hooks import Point

    assert A.use_chunked(Point(frozenset({"blocks.attn.entropy"}), prefix="blocks."), 1024)
    assert A.use_chunked(Point(frozenset({"blocks.attn.pattern"}), prefix="blocks."), 1024)
    assert not A.use_chunked(Point(frozenset({"blocks.attn.scores"}), prefix="blocks."), 1024)
    patch = {"blocks.attn.pattern": (np.zeros(1), np.zeros(1, bool))}
    assert not A.use_chunked(Point(frozenset(), prefix="blocks.", patches=patch), 1024)
    assert not A.use_chunked(Point(frozenset(), prefix="blocks."), 512)


def test_chunked_equals_full(setup):
    _, chunked, full = setup
    np.testing.assert_allclose(chunked.logits, full.logits, atol=2e-5)
    np.testing.assert_array_equal(chunked.cache["blocks.moe.top_k_experts"], full.cache["blocks.moe.top_k_experts"])
    for name in ("blocks.attn.entropy", "blocks.attn.top_key_weights", "blocks.attn.pattern_at"):
        np.testing.assert_allclose(chunked.cache[name], full.cache[name], atol=1e-5, err_msg=name)
    top = "blocks.attn.top_keys"
    assert np.mean(np.asarray(chunked.cache[top]) == np.asarray(full.cache[top])) > 0.999


def test_left_padded_rows_stay_uniform_over_the_true_length(setup):
    _, chunked, full = setup
    ent = np.asarray(chunked.cache["blocks.attn.entropy"])[:, 0, :, :5]
    np.testing.assert_allclose(ent, np.log(1100), rtol=1e-6)
    pattern = np.asarray(full.cache["blocks.attn.pattern"])
    np.testing.assert_allclose(pattern[:, 0, :, :5, :1100], 1 / 1100, rtol=1e-5)


def test_maps_of_selected_layers_are_recomputed_exactly(setup):
    cfg, _, full = setup
    model = full.model
    spec = gv.AttentionSpec(layers=(1,), heads=(2,))
    run = model.run(full.tokens, capture=["blocks.attn.pattern", "blocks.attn.scores"], attention=spec)
    assert run.cache["blocks.attn.pattern"].shape == (1, 2, 1, 1100, 1100)
    full_map = np.asarray(full.cache["blocks.attn.pattern"])
    np.testing.assert_allclose(run.cache["blocks.attn.pattern", 1][:, 0], full_map[1][:, 2], atol=1e-6)
    np.testing.assert_allclose(run.logits, full.logits, atol=2e-5)

"""Right-padding prompts to bucketed lengths: one compile per bucket, and results as without it."""

import jax
import numpy as np

import grokviz as gv
from grokviz import api
from grokviz.api import bucket_length
from grokviz.testing import random_tokens


def test_bucket_lengths():
    assert [bucket_length(t, 8192) for t in (1, 16, 17, 100, 256, 257, 600)] == [16, 16, 32, 128, 256, 512, 768]
    assert bucket_length(30, 24) == 30 and bucket_length(20, 24) == 24  # capped at sequence_len


def test_bucketed_equals_unbucketed_including_left_padding():
    cfg = gv.GrokConfig.tiny(sequence_len=64)
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(3)))
    toks = random_tokens(cfg, 2, 11, seed=4)
    toks[0, :3] = 0  # left padding: those queries see no real key and attend uniformly over the true length
    a = model.run(toks, capture=["blocks.attn.pattern", "blocks.moe.expert_load"], bucket=False)
    b = model.run(toks, capture=["blocks.attn.pattern", "blocks.moe.expert_load"], bucket=True)
    assert b.logits.shape == a.logits.shape == (2, 11, cfg.vocab_size)
    np.testing.assert_allclose(b.logits, a.logits, atol=2e-5)
    np.testing.assert_allclose(b.cache["blocks.attn.pattern"], a.cache["blocks.attn.pattern"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(b.cache["blocks.attn.pattern"])[:, 0, :, :3], 1 / 11, rtol=1e-6)
    np.testing.assert_array_equal(b.cache["blocks.moe.expert_load"], a.cache["blocks.moe.expert_load"])


def test_prompts_in_one_bucket_share_one_compile():
    cfg = gv.GrokConfig.tiny(sequence_len=64)
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(5)))
    model.run(random_tokens(cfg, 1, 17), capture=["blocks.moe.top_k_experts"])
    start = api.TRACE_COUNT[0]
    for t in (18, 25, 32):
        run = model.run(random_tokens(cfg, 1, t), capture=["blocks.moe.top_k_experts"])
        assert run.cache["blocks.moe.top_k_experts"].shape == (cfg.num_layers, 1, t, 2)
    assert api.TRACE_COUNT[0] == start

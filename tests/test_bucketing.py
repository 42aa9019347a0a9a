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
    cfg = gv.GrokConfig.golden(sequence_len=64)
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
    cfg = gv.GrokConfig.golden(sequence_len=64)
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(5)))
    model.run(random_tokens(cfg, 1, 17), capture=["blocks.moe.top_k_experts"])
    start = api.TRACE_COUNT[0]
    for t in (18, 25, 32):
        run = model.run(random_tokens(cfg, 1, t), capture=["blocks.moe.top_k_experts"])
        assert run.cache["blocks.moe.top_k_experts"].shape == (cfg.num_layers, 1, t, 2)
    assert api.TRACE_COUNT[0] == start


class _Compiles:
    """Counts XLA backend compilations (any program, eager ops included) while active."""

    def __enter__(self):
        import jax.monitoring as jm

        self.n = 0
        self._fn = lambda event, duration, **kw: setattr(self, "n", self.n + (event == _BACKEND_COMPILE))
        jm.register_event_duration_secs_listener(self._fn)
        return self

    def __exit__(self, *exc):
        import jax.monitoring as jm

        jm.unregister_event_duration_listener(self._fn)


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def test_lengths_in_one_bucket_compile_nothing_at_all():
    """Trimming logits[:, :t] eagerly compiled a slice for every distinct length; patches were padded by jnp.pad
    (another program per length). Now both happen on the host."""
    cfg = gv.GrokConfig.golden(sequence_len=64)
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(5)))
    none = gv.Interventions.none(cfg)
    capture = ["blocks.moe.top_k_experts", "blocks.resid_post"]

    def runs(t):
        toks = random_tokens(cfg, 1, t, seed=t)
        plain = model.run(toks, capture=capture)
        iv = none.patch("blocks.resid_post", plain.cache["blocks.resid_post"], layers=[0], positions=[0])
        patched = model.run(toks, capture=capture, interventions=iv)
        return plain, patched

    runs(17)  # compile the bucket-32 programs once
    with _Compiles() as c:
        for t in (18, 25, 31):
            plain, patched = runs(t)
            assert plain.logits.shape == patched.logits.shape == (1, t, cfg.vocab_size)
            assert plain.cache["blocks.moe.top_k_experts"].shape == (cfg.num_layers, 1, t, 2)
            np.testing.assert_allclose(patched.logits, plain.logits, atol=1e-6)  # own activations: a no-op
    assert c.n == 0


def test_patched_runs_are_bucketed_like_plain_ones():
    cfg = gv.GrokConfig.golden(sequence_len=64)
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(6)))
    toks = random_tokens(cfg, 2, 11, seed=1)
    src = model.run(random_tokens(cfg, 2, 11, seed=2), capture=["blocks.resid_mid"], bucket=False)
    iv = gv.Interventions.none(cfg).patch("blocks.resid_mid", src.cache["blocks.resid_mid"], layers=[1],
                                          positions=[3, 7])
    a = model.run(toks, interventions=iv, bucket=False)
    b = model.run(toks, interventions=iv, bucket=True)
    assert b.bucket and not a.bucket
    np.testing.assert_allclose(b.logits, a.logits, atol=2e-5)
    assert not np.allclose(b.logits, model.run(toks).logits, atol=1e-4)

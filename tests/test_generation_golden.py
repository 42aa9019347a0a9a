"""Generation against the official Grok-1 sampler's output (tests/data/grok1_tiny_generate.npz, a copy of
shared/golden/generation/: 15 runs x 20 tokens on the golden model with sequence_len 64; its README describes
how the runner chains keys and orders the sampler). The model's params are those of grok1_golden.npz (checked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokviz as gv
from grokviz.generation import generate, key_chain, sample
from grokviz.generation.keys import key_context
from grokviz.testing import golden_dir


@pytest.fixture(scope="module")
def gen():
    return np.load(golden_dir() / "grok1_tiny_generate.npz")


@pytest.fixture(scope="module")
def model(golden):
    cfg, params, _ = golden
    return gv.Model(cfg.replace(sequence_len=64), params)


def _probs_close(got, want):
    """token_prob / top_k_probs: rtol 1e-4, atol 1e-7, over entries > 1e-30 (T = 0.01 has exact zeros and
    denormals there); returns the max relative error over the compared entries."""
    keep = want > 1e-30
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_less(got[~keep], 1e-30)
    return float(np.max(np.abs(got[keep] - want[keep]) / want[keep]))


def _settings(gen):
    R, S = gen["tokens"].shape
    return (np.repeat(gen["temperature"], S), np.repeat(gen["nucleus_p"], S))


def _stable_ids(want_probs):
    """Top-8 positions whose order is not fragile: neighbours differ by > 1e-4 relative and are > 1e-30."""
    p = want_probs
    gap_next = np.ones_like(p, bool)
    gap_next[..., :-1] = np.abs(p[..., :-1] - p[..., 1:]) > 1e-4 * p[..., :-1]
    gap_prev = np.ones_like(p, bool)
    gap_prev[..., 1:] = gap_next[..., :-1]
    return gap_next & gap_prev & (p > 1e-30)


def test_golden_model_is_the_forward_golden_file(gen):
    """The generation data names its params source by sha256: it is tests/data/grok1_golden.npz, byte for byte."""
    import hashlib
    import json

    meta = json.loads(str(gen["config_json"]))
    digest = hashlib.sha256((golden_dir() / "grok1_golden.npz").read_bytes()).hexdigest()
    assert digest == meta["params_source"]["sha256"]
    assert meta["model_config"]["sequence_len"] == 64


@pytest.mark.parametrize("own_keys", [False, True], ids=["recorded-keys", "own-key-chain"])
def test_sampler_reproduces_the_runner_on_the_recorded_logits(gen, own_keys):
    R, S, V = gen["logits"].shape
    if own_keys:
        chains = [key_chain(int(s), S, rng="grok1") for s in gen["rng_seed"]]
        np.testing.assert_array_equal(np.stack([c for c, _ in chains]), gen["carry_keys"])
        np.testing.assert_array_equal(np.stack([k for _, k in chains]), gen["sample_keys"])
        keys = np.stack([k for _, k in chains]).reshape(R * S, 2)
    else:
        keys = gen["sample_keys"].reshape(R * S, 2)
    temperature, top_p = _settings(gen)
    with key_context("grok1"):
        out = jax.jit(sample)(jnp.asarray(keys), jnp.asarray(gen["logits"].reshape(R * S, V)), jnp.asarray(temperature),
                              jnp.asarray(top_p), jnp.zeros(R * S, jnp.int32))
    assert int(np.sum(np.asarray(out.token).reshape(R, S) == gen["tokens"])) == R * S
    _probs_close(np.asarray(out.prob).reshape(R, S), gen["token_prob"])
    top = np.asarray(out.top_probs).reshape(R, S, 8)
    _probs_close(top, gen["top_k_probs"])
    stable = _stable_ids(gen["top_k_probs"])
    ids = np.asarray(out.top_ids).reshape(R, S, 8)
    np.testing.assert_array_equal(ids[stable], gen["top_k_token_ids"][stable])


def test_key_modes_differ_and_leave_the_process_config_alone():
    before = jax.config.jax_threefry_partitionable
    carry, sample_keys = key_chain(42, 3, rng="grok1")
    np.testing.assert_array_equal(carry[0], [2465931498, 3679230171])   # the runner's c_0 for seed 42
    np.testing.assert_array_equal(sample_keys[0], [255383827, 267815257])
    assert jax.config.jax_threefry_partitionable == before
    _, default = key_chain(42, 3, rng="default")
    assert not np.array_equal(default, sample_keys)
    with pytest.raises(ValueError, match="rng must be one of"):
        key_chain(42, 3, rng="numpy")


@pytest.fixture(scope="module")
def golden_batch(model, gen):
    """All 15 runs in one left-padded batch (per-row prompt lengths, temperatures, top_p and seeds)."""
    rows = [gen["prompt"][r, :gen["prompt_len"][r]] for r in range(len(gen["prompt_len"]))]
    before = jax.config.jax_threefry_partitionable
    res = generate(model, rows, 20, temperature=gen["temperature"], top_p=gen["nucleus_p"],
                   seed=gen["rng_seed"].astype(np.int64).tolist(), rng="grok1", stop=(), keep_logits=True)
    assert jax.config.jax_threefry_partitionable == before
    return res


def test_golden_runs_reproduced_in_reproduction_mode(golden_batch, gen):
    res = golden_batch
    assert res.prompt_width == 32 and list(res.lengths) == [20] * 15
    assert int(np.sum(res.tokens == gen["tokens"])) == 300
    _probs_close(res.token_prob, gen["token_prob"])
    _probs_close(res.top_probs, gen["top_k_probs"])
    stable = _stable_ids(gen["top_k_probs"])
    np.testing.assert_array_equal(res.top_ids[stable], gen["top_k_token_ids"][stable])
    # per-step logits: the runner's cached logits and its no-cache forward (max |logit| is 2.3)
    np.testing.assert_allclose(res.logits, gen["logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(res.logits, gen["nocache_logits"], rtol=0, atol=1e-5)
    # the model's own log-probabilities are the log-softmax of those logits
    want_lp = jax.nn.log_softmax(jnp.asarray(gen["logits"]), axis=-1)
    want_lp = np.take_along_axis(np.asarray(want_lp), gen["tokens"][..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(res.logprobs, want_lp, atol=1e-5)


def test_golden_batch_cached_logits_equal_a_full_forward(golden_batch, model):
    res = golden_batch
    seq = res.sequences()  # [15, 32 + 20]
    full = model.run(seq[:, :-1]).logits  # position P - 1 + t predicts token t
    P = res.prompt_width
    err = np.abs(full[:, P - 1:] - res.logits).max()
    assert err < 1e-5, err

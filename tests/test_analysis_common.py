"""Shared analysis helpers against hand-computed values, numpy and jax alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokviz.analysis import common as C

PAD = 0
TOKS = np.array([[5, 6, 7, 0], [0, 3, 4, 0], [9, 0, 0, 0]], np.int32)  # right, left+right, one real token


def test_prediction_pairs_and_last_real():
    np.testing.assert_array_equal(C.prediction_pairs(TOKS, PAD), [[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(C.last_real_position(TOKS, PAD), [2, 2, 0])
    out = C.last_real_position(jnp.asarray(TOKS), PAD)
    assert isinstance(out, jax.Array) and out.tolist() == [2, 2, 0]
    assert isinstance(C.prediction_pairs(jnp.asarray(TOKS), PAD), jax.Array)
    with pytest.raises(ValueError, match="row 1 of the tokens has no real"):
        C.last_real_position(np.array([[1, 2], [0, 0]]), PAD)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        C.prediction_pairs(np.array([1, 2, 3]), PAD)


def _logits(rng, shape=(3, 4, 10)):
    return rng.normal(size=shape).astype(np.float32)


def test_logprobs_loss_and_kl_by_hand(rng):
    logits = _logits(rng)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = np.log(p[np.arange(3)[:, None], np.arange(3)[None], TOKS[:, 1:]])
    np.testing.assert_allclose(C.next_token_logprobs(logits, TOKS), want, rtol=1e-5)
    # pairs: (0,0) (0,1) (1,1)
    want_loss = -(want[0, 0] + want[0, 1] + want[1, 1]) / 3
    loss = C.next_token_loss(logits, TOKS, PAD)
    assert isinstance(loss, float) and loss == pytest.approx(want_loss, rel=1e-5)
    q_logits = _logits(rng)
    q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1)[:, :3]
    mask = C.prediction_pairs(TOKS, PAD)
    np.testing.assert_allclose(C.next_token_kl(logits, q_logits), kl, rtol=1e-4)
    np.testing.assert_allclose(C.next_token_kl(logits, q_logits, mask), np.where(mask, kl, 0), rtol=1e-4)
    assert np.all(C.next_token_kl(logits, logits) < 1e-6)


def test_jax_in_jax_out_and_under_jit_and_grad(rng):
    logits, toks = _logits(rng), TOKS
    loss_np = C.next_token_loss(logits, toks, PAD)
    loss_j = C.next_token_loss(jnp.asarray(logits), jnp.asarray(toks), PAD)
    assert isinstance(loss_j, jax.Array) and float(loss_j) == pytest.approx(loss_np, rel=1e-5)
    jitted = jax.jit(lambda lg: C.next_token_loss(lg, jnp.asarray(toks), PAD))
    assert float(jitted(jnp.asarray(logits))) == pytest.approx(loss_np, rel=1e-5)
    g = jax.grad(lambda lg: C.next_token_loss(lg, jnp.asarray(toks), PAD))(jnp.asarray(logits))
    assert g.shape == logits.shape and float(jnp.abs(g[2]).max()) == 0  # row 2 has no pairs
    kl = C.next_token_kl(jnp.asarray(logits), jnp.asarray(logits[::-1].copy()), C.prediction_pairs(toks, PAD))
    assert isinstance(kl, jax.Array) and kl.shape == (3, 3)


def test_shape_and_empty_errors(rng):
    logits = _logits(rng)
    with pytest.raises(ValueError, match="logits must have shape"):
        C.next_token_logprobs(logits[:, :3], TOKS)
    with pytest.raises(ValueError, match="no prediction pairs"):
        C.next_token_loss(logits[2:], TOKS[2:], PAD)
    with pytest.raises(ValueError, match="mask must have shape"):
        C.next_token_kl(logits, logits, np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="logits_p and logits_q"):
        C.next_token_kl(logits, logits[:, :3])


class _Tok:
    vocab_size = 10

    def encode(self, text):
        return {"a": [4], "ab": [4, 5], "": []}[text]

    def id_to_piece(self, i):
        return "xyzwabcdef"[i]


class _Model:
    tokenizer = _Tok()

    class cfg:
        vocab_size = 10


def test_token_id():
    assert C.token_id(_Tok(), "a") == 4 and C.token_id(_Model(), "a") == 4
    assert C.token_id(_Model(), 7) == 7
    with pytest.raises(ValueError, match=r"'ab' must encode to exactly one token, but it encodes to 2: \['a', 'b'\]"):
        C.token_id(_Model(), "ab")
    with pytest.raises(ValueError, match="encodes to 0"):
        C.token_id(_Tok(), "")
    with pytest.raises(ValueError, match=r"token id 10 is outside the vocabulary \[0, 10\)"):
        C.token_id(_Model(), 10)
    with pytest.raises(ValueError, match="no tokenizer"):
        C.token_id(type("M", (), {"tokenizer": None, "cfg": None})(), "a")


def test_nan_logits_are_an_error_not_a_nan_answer(rng):
    from grokviz.analysis.common import next_token_kl, next_token_logprobs, next_token_loss

    tokens = np.array([[3, 1, 2, 4]])
    logits = rng.normal(size=(1, 4, 6)).astype(np.float32)
    bad = logits.copy()
    bad[0, 1, 2] = np.nan
    for fn in (lambda: next_token_loss(bad, tokens, 0), lambda: next_token_logprobs(bad, tokens),
               lambda: next_token_kl(logits, bad)):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn()

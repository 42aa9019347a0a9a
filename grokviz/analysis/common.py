"""Small helpers every analysis needs: which positions are predictions, where each row ends, one-token ids, and
next-token log-probabilities, losses and divergences.

Array helpers accept numpy or jax arrays and return the same kind (numpy in, numpy out; jax in, jax out), so
they work on ``run.logits`` on the host and inside jitted or differentiated code alike. ``tokens`` are
``[batch, seq]`` ids and ``logits`` ``[batch, seq, vocab]``; position ``t`` predicts token ``t + 1``, so the
per-prediction outputs have ``seq - 1`` positions. Padding is decided by :func:`grokviz.config.is_real`.
"""

from __future__ import annotations

import numpy as np

from ..config import is_real

__all__ = ["prediction_pairs", "last_real_position", "token_id", "next_token_logprobs", "next_token_loss",
           "next_token_kl"]


def _is_jax(*xs) -> bool:
    import jax

    return any(isinstance(x, jax.Array) for x in xs)


def _xp(*xs):
    if _is_jax(*xs):
        import jax.numpy as jnp

        return jnp
    return np


def _is_tracer(x) -> bool:
    import jax

    return isinstance(x, jax.core.Tracer)


def _check_tokens(tokens, name="tokens"):
    if np.ndim(tokens) != 2:
        raise ValueError(f"{name} must have shape [batch, seq], got shape {tuple(np.shape(tokens))}")


def _check_finite(name, x):
    """NaN or inf in concrete logits is an error (a loss or KL of NaN is never an answer); traced values pass."""
    if _is_jax(x) and _is_tracer(x):
        return
    if not bool(np.all(np.isfinite(np.asarray(x)))):
        raise ValueError(f"{name} contains NaN or inf")


def _check_logits(logits, tokens):
    if np.ndim(logits) != 3 or tuple(np.shape(logits))[:2] != tuple(np.shape(tokens)):
        raise ValueError(f"logits must have shape [batch, seq, vocab] matching tokens {list(np.shape(tokens))}, "
                         f"got shape {list(np.shape(logits))}")
    _check_finite("logits", logits)


def prediction_pairs(tokens, pad_token: int):
    """bool ``[batch, seq - 1]``: position t predicts position t + 1 and both are real (not padding)."""
    _check_tokens(tokens)
    real = is_real(tokens, pad_token)
    return real[:, :-1] & real[:, 1:]


def last_real_position(tokens, pad_token: int):
    """int ``[batch]``: index of each row's last real token (right or left padding alike).

    A row without any real token raises ``ValueError`` (checked when the tokens are concrete)."""
    _check_tokens(tokens)
    xp = _xp(tokens)
    real = is_real(tokens, pad_token)
    if not _is_tracer(tokens):
        empty = np.flatnonzero(~np.asarray(real).any(axis=1))
        if len(empty):
            raise ValueError(f"row {int(empty[0])} of the tokens has no real (non-pad) token, so it has no last "
                             f"real position")
    t = real.shape[1]
    return (t - 1 - xp.argmax(real[:, ::-1], axis=1)).astype(xp.int32)


def token_id(tokenizer_or_model, text) -> int:
    """The id of ``text`` when it encodes to exactly one token (``ValueError`` otherwise, listing the pieces).

    ``tokenizer_or_model``: a tokenizer with ``encode`` or a :class:`grokviz.Model` with one attached. An int is
    accepted as an id and checked against the vocabulary when it is known."""
    tok = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    cfg = getattr(tokenizer_or_model, "cfg", None)
    vocab = cfg.vocab_size if cfg is not None else getattr(tok, "vocab_size", None)
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if vocab is not None and not 0 <= int(text) < vocab:
            raise ValueError(f"token id {int(text)} is outside the vocabulary [0, {vocab})")
        return int(text)
    if not isinstance(text, str):
        raise TypeError(f"token_id needs a string (or an int id), got {type(text).__name__}")
    if tok is None or not hasattr(tok, "encode"):
        raise ValueError(f"cannot encode {text!r}: no tokenizer (attach one to the model, or pass the token id)")
    ids = list(tok.encode(text))
    if len(ids) != 1:
        pieces = [tok.id_to_piece(i) for i in ids] if hasattr(tok, "id_to_piece") else ids
        raise ValueError(f"{text!r} must encode to exactly one token, but it encodes to {len(ids)}: {pieces}")
    return int(ids[0])


def _log_softmax(x, xp):
    if xp is np:
        x = np.asarray(x)
        x = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    import jax

    return jax.nn.log_softmax(x.astype(xp.promote_types(x.dtype, xp.float32)), axis=-1)


def next_token_logprobs(logits, tokens):
    """``[batch, seq - 1]``: log p(token[t + 1] | prefix up to t) under ``logits`` (float32 or wider)."""
    _check_tokens(tokens)
    _check_logits(logits, tokens)
    xp = _xp(logits, tokens)
    logp = _log_softmax(logits[:, :-1], xp)
    target = xp.asarray(tokens)[:, 1:].astype(xp.int32)
    return xp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]


def next_token_loss(logits, tokens, pad_token: int):
    """Mean next-token cross-entropy in nats over the prediction pairs (:func:`prediction_pairs`).

    numpy in: a ``numpy.float64`` (a Python float); jax in: a 0-d jax array. No pairs at all: ``ValueError``
    (checked when concrete)."""
    xp = _xp(logits, tokens)
    nll = -next_token_logprobs(logits, tokens)
    pairs = prediction_pairs(xp.asarray(tokens), pad_token)
    n = pairs.sum()
    if not _is_tracer(n) and int(n) == 0:
        raise ValueError("no prediction pairs: every row needs two consecutive real tokens for a next-token loss")
    total = xp.where(pairs, nll, 0).sum()
    return np.float64(total / n) if xp is np else total / n.astype(total.dtype)


def next_token_kl(logits_p, logits_q, mask=None):
    """``[batch, seq - 1]``: KL(p || q) in nats between the next-token distributions at positions 0 .. seq-2.

    ``mask``: bool ``[batch, seq - 1]`` (e.g. :func:`prediction_pairs`); positions outside it are 0. ``None``
    keeps every position."""
    if np.shape(logits_p) != np.shape(logits_q) or np.ndim(logits_p) != 3:
        raise ValueError(f"logits_p and logits_q must both be [batch, seq, vocab], got shapes "
                         f"{list(np.shape(logits_p))} and {list(np.shape(logits_q))}")
    _check_finite("logits_p", logits_p)
    _check_finite("logits_q", logits_q)
    xp = _xp(logits_p, logits_q, mask)
    lp, lq = _log_softmax(logits_p[:, :-1], xp), _log_softmax(logits_q[:, :-1], xp)
    kl = (xp.exp(lp) * (lp - lq)).sum(-1)
    if mask is None:
        return kl
    b, t = np.shape(logits_p)[:2]
    if tuple(np.shape(mask)) != (b, t - 1):
        raise ValueError(f"mask must have shape [batch, seq - 1] = {[b, t - 1]}, got {list(np.shape(mask))}")
    return xp.where(xp.asarray(mask, bool), kl, 0)

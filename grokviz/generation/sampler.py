"""The sampler: one next token per row from its logits, in the order the Grok-1 runner samples.

For each row, with ``l`` the fp32 logits over the vocabulary:

1. ``l = l / temperature`` (a division, the temperature cast to the logits' dtype);
2. disallowed tokens get ``-1e10`` (:data:`MASK_VALUE`; the runner allows every token, so does ``allowed=None``);
3. top-k (ours, not in the runner; ``top_k = 0`` turns it off): logits below the k-th largest get ``-1e10``
   (ties with the k-th largest are kept);
4. nucleus (top-p) filter exactly as the runner: sort ascending, softmax of the sorted logits, the first index
   where their cumulative sum reaches ``1 - top_p``; logits below the sorted logit at that index get ``-1e10``
   (``top_p = 1`` keeps everything);
5. the draw: ``argmax(l + gumbel)`` with ``jax.random.categorical`` and the row's key; ``temperature = 0``
   is greedy, the argmax of the raw logits (which every filter keeps), chosen with ``jnp.where`` so greedy and
   sampled rows share one compiled program;
6. what the runner reports: ``probs = softmax(l)`` of the filtered, scaled logits, the sampled token's
   probability under it and its 8 most probable tokens (``lax.top_k``, descending). For a greedy row the
   temperature used for this distribution is 1 (the draw is its argmax), so the figures stay informative.

Also reported: the model's own log-probability of the sampled token, ``log_softmax(raw logits)[token]``,
independent of the sampling settings, and the same for the top candidates.

Every setting is a traced per-row array: changing a value never recompiles.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp

MASK_VALUE = -1e10  #: the runner's value for filtered logits
TOP_CANDIDATES = 8  #: the runner's TOP_K: how many candidates are reported per step (not a filter)


class Sample(typing.NamedTuple):
    """One sampling step for a batch. Shapes: [batch] or [batch, TOP_CANDIDATES]."""

    token: jax.Array        # int32: the drawn token
    prob: jax.Array         # float32: its probability under the filtered, scaled distribution (runner's prob)
    top_ids: jax.Array      # int32 [b, 8]: the most probable tokens of that distribution, descending
    top_probs: jax.Array    # float32 [b, 8]: their probabilities
    logprob: jax.Array      # float32: log_softmax(raw logits)[token], the model's own log-probability
    top_logprobs: jax.Array  # float32 [b, 8]: the model's log-probabilities of top_ids


def top_p_filter(l, top_p, s=None):
    """The runner's nucleus filter on one row (or a batch, ``top_p`` broadcast on the last axis): keep logits >=
    the first ascending-sorted logit at which the cumulative softmax reaches ``1 - top_p``. ``s``: ``l`` already
    sorted ascending along the last axis, when the caller has it."""
    s = jax.lax.sort(l) if s is None else s
    cum = jnp.cumsum(jax.nn.softmax(s, axis=-1), axis=-1)
    i = jnp.argmax(cum >= 1 - top_p[..., None], axis=-1)
    threshold = jnp.take_along_axis(s, i[..., None], axis=-1)
    return jnp.where(l >= threshold, l, MASK_VALUE)


def top_k_filter(l, top_k, s=None):
    """(filtered l, filtered s): logits below the ``top_k``-th largest of each row get -1e10 (``top_k`` [batch]
    int, 0 = keep all). ``s``: ``l`` sorted ascending (computed when not given); the filtered ``s`` is the
    filtered ``l`` sorted, since the filter keeps the order of what it keeps and puts -1e10 below it."""
    v = l.shape[-1]
    s = jax.lax.sort(l) if s is None else s
    kth = jnp.take_along_axis(s, jnp.clip(v - top_k, 0, v - 1)[..., None], axis=-1)  # the k-th largest
    on = top_k[..., None] > 0
    return jnp.where(on & (l < kth), MASK_VALUE, l), jnp.where(on & (s < kth), MASK_VALUE, s)


def filtered_logits(logits, temperature, top_p, top_k, allowed=None):
    """Steps 1-4 for a batch: logits [b, V] -> the scaled, masked, filtered logits [b, V]. A temperature of 0
    scales by 1 (greedy rows; see the module docstring). One sort serves both filters."""
    t = jnp.where(temperature > 0, temperature, 1.0).astype(logits.dtype)
    l = logits / t[:, None]
    if allowed is not None:
        l = jnp.where(allowed, l, MASK_VALUE)

    def filters(l):
        l, s = top_k_filter(l, top_k)
        return top_p_filter(l, top_p.astype(l.dtype), s)

    # the sort over the vocabulary is the costliest step of a decode step on CPU (4 ms for 8192 logits here):
    # skipped when no row filters (the filters would keep every logit then)
    return jax.lax.cond(jnp.any(top_k > 0) | jnp.any(top_p < 1), filters, lambda l: l, l)


def draw(keys, l, temperature):
    """Step 5: keys [b] (raw uint32 [b, 2] or typed), filtered logits [b, V] -> token [b] int32. Each row draws
    Gumbel noise of shape [1, V] from its own key, as the runner's vmapped ``categorical`` does."""
    def categorical():
        return jax.vmap(lambda k, row: jax.random.categorical(k, row[None])[0])(keys, l).astype(jnp.int32)

    # the Gumbel noise (threefry over the vocabulary, per row) is skipped when every row is greedy; the keys are
    # not consumed here, so the chain of later steps is the same either way
    sampled = jax.lax.cond(jnp.any(temperature > 0), categorical, lambda: jnp.zeros(l.shape[:1], jnp.int32))
    return jnp.where(temperature > 0, sampled, jnp.argmax(l, axis=-1)).astype(jnp.int32)


def sample(keys, logits, temperature, top_p, top_k, allowed=None) -> Sample:
    """The whole sampler for one step (module docstring): logits [b, V] float32, per-row settings [b]."""
    logits = logits.astype(jnp.float32)
    l = filtered_logits(logits, temperature, top_p, top_k, allowed)
    token = draw(keys, l, temperature)
    probs = jax.nn.softmax(l, axis=-1)
    top_probs, top_ids = jax.lax.top_k(probs, min(TOP_CANDIDATES, l.shape[-1]))
    model_lp = jax.nn.log_softmax(logits, axis=-1)
    return Sample(token=token, prob=jnp.take_along_axis(probs, token[:, None], axis=-1)[:, 0],
                  top_ids=top_ids.astype(jnp.int32), top_probs=top_probs,
                  logprob=jnp.take_along_axis(model_lp, token[:, None], axis=-1)[:, 0],
                  top_logprobs=jnp.take_along_axis(model_lp, top_ids, axis=-1))

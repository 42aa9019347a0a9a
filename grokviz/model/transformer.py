"""The whole model: embed -> lax.scan(block) over stacked layers -> final norm -> tied unembedding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..hooks import Point
from ..params import dense
from .attention import attention_mask
from .block import EXPERT_IMPLS, block
from .layers import rms_norm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    logits: jax.Array  # [batch, seq, vocab]
    cache: dict        # hook name -> array ([layer, ...] for blocks.* hooks)


def forward(params, tokens, cfg, *, capture=frozenset(), interventions=None, expert_impl="sparse",
            unroll=False, callbacks=None) -> Output:
    """Pure forward pass. tokens: int [batch, seq] (pad id = padding, masked as keys only).

    ``capture``: frozenset of registered hook names (see :func:`grokviz.hooks.select`).
    ``interventions``: a :class:`grokviz.interventions.Interventions` (or None for none at all).
    ``expert_impl``: "sparse" (fast) or "dense" (reference). ``unroll``: Python loop instead of lax.scan.
    ``callbacks``: {hook name: fn(value, layer) -> value}; static (changing them recompiles).
    """
    if expert_impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {sorted(EXPERT_IMPLS)}, got {expert_impl!r}")
    callbacks = callbacks or {}
    iv_layers, patches = (None, {}) if interventions is None else interventions.split()
    top_patches = {k: v for k, v in patches.items() if not k.startswith("blocks.")}
    block_patches = {k: v for k, v in patches.items() if k.startswith("blocks.")}
    top = Point(capture, patches=top_patches, callbacks=callbacks)

    real = tokens > cfg.pad_token
    mask = attention_mask(tokens, cfg.pad_token)
    emb = dense(params["embed"], jnp.float32)
    h = top("embed.out", emb[tokens] * cfg.embedding_multiplier)

    def body(h, xs):
        p, iv, pt, layer = xs
        point = Point(capture, prefix="blocks.", patches=pt, callbacks=callbacks, layer=layer)
        return block(p, h, real, mask, cfg, point, iv, expert_impl)

    xs = (params["blocks"], iv_layers, block_patches, jnp.arange(cfg.num_layers))
    if unroll:
        per_layer = []
        for i in range(cfg.num_layers):
            h, c = body(h, jax.tree_util.tree_map(lambda a, i=i: a[i], xs))
            per_layer.append(c)
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_layer) if per_layer[0] else {}
    else:
        h, stacked = jax.lax.scan(body, h, xs)

    hf = top("final_norm.out", rms_norm(h, params["final_norm"], cfg.rms_eps))
    logits = jnp.einsum("btd,vd->btv", hf, emb.astype(hf.dtype)) * cfg.output_multiplier
    logits = top("unembed.logits", logits)
    return Output(logits=logits, cache={**top.values, **stacked})

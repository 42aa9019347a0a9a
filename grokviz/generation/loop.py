"""The compiled generation program: prefill once, then a ``lax.while_loop`` of one-token decode steps over a KV
cache, sampling, stop tokens, per-step capture and (optionally) streaming, all in one jitted call.

Step ``i`` of the loop samples generated token ``i`` (token 0 from the prefill's logits at the last prompt slot
``P - 1``, token ``i`` from step ``i - 1``'s model call), then runs the model on token ``i`` (one token per row,
written to cache slot ``P + i``) and records what is captured for it. So the captures of step ``i`` describe
generated token ``i`` itself (its routing, its attention row over the cache, its residuals), and the prefill
capture describes the prompt. When nothing is captured, the model call whose logits nobody would sample from
(after the last token, or once every row has stopped) is skipped.

A row stops after its first stop token (that token is kept); from then on it is fed the pad token, which is
no key for anyone, and its outputs are ignored. The loop ends when every row has stopped or after
``max_new_tokens`` tokens.

The program is compiled once per (prompt bucket P, new-token bucket N, batch, capture set, step-patch names,
rng mode, stream, keep_logits, config); prompt content, lengths within the buckets, ``max_new_tokens`` within N,
seeds, temperature, top_p, top_k, stop ids and intervention values are traced arguments.
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp

from ..config import is_real
from ..model import KVCache, forward
from ..model.transformer import split_layers
from . import keys as keys_mod
from .sampler import TOP_CANDIDATES, sample
from .stream import emit

UNROLL_DECODE_MAX_LAYERS = 32  #: decode steps of models with at most this many layers run unrolled (see decode)
TRACE_COUNT = [0]  # incremented each time the generation program is traced (compiled); tests read it
#: (cfg, capture) -> (prefill layout, decode layout): the static cache layouts (Output.layout) of the program's
#: two forwards, recorded while tracing (they depend on nothing else)
LAYOUTS: dict = {}


class Traced(typing.NamedTuple):
    """The traced arguments of one call."""

    prompt: jax.Array       # int32 [b, P], left-padded
    n: jax.Array            # int32 (): max_new_tokens, <= N
    temperature: jax.Array  # float32 [b]
    top_p: jax.Array        # float32 [b]
    top_k: jax.Array        # int32 [b]
    stop: jax.Array         # int32 [b, S] (-1 unused)
    seeds: jax.Array        # uint32 [b]
    call_id: jax.Array      # int32 (): which host sink a streamed step goes to


class Outputs(typing.NamedTuple):
    tokens: jax.Array        # int32 [b, N]
    alive: jax.Array         # bool [b, N]: the row had not stopped before this token (the token is real)
    prob: jax.Array          # float32 [b, N]
    top_ids: jax.Array       # int32 [b, N, 8]
    top_probs: jax.Array     # float32 [b, N, 8]
    logprob: jax.Array       # float32 [b, N]
    top_logprobs: jax.Array  # float32 [b, N, 8]
    logits: jax.Array | None  # float32 [b, N, V] when kept
    steps_run: jax.Array     # int32 (): loop steps run = tokens sampled (<= n)
    step_cache: dict         # name -> [N, ...] (one decode call's capture, seq axis of 1 dropped)
    prefill_cache: dict      # name -> the prefill's capture (over the P prompt slots)
    kv: KVCache


def _step_interventions(iv, patches, i):
    """The interventions of decode step ``i``: the constant per-layer fields and the step's patch slices (given
    as [step, layer, batch, ...]; a one-token call wants [layer, batch, 1, ...])."""
    if not patches:
        return iv
    sliced = {name: (jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False)[:, :, None],
                     jax.lax.dynamic_index_in_dim(m, i, 0, keepdims=False)[:, :, None])
              for name, (v, m) in patches.items()}
    return dataclasses.replace(iv, patches=sliced)


def _drop_seq(name, value):
    """A one-token capture without its seq axis of 1 (attention maps keep [.., head, kv_seq])."""
    from ..hooks import REGISTRY

    axes = REGISTRY[name].axes
    return jnp.squeeze(value, axis=axes.index("seq")) if "seq" in axes else value


def _program(params, args: Traced, iv, patches, *, cfg, n_bucket, capture, rng, stream, keep_logits, expert_impl):
    TRACE_COUNT[0] += 1
    b, width = args.prompt.shape
    fill = max(cfg.pad_token, 0)
    kv = KVCache.empty(cfg, b, width + n_bucket, jnp.float32)
    if cfg.position_rule == "index":  # the left padding of the prompt bucket does not shift a row's positions:
        # its first real token is at position 0, as in the Grok-1 runner (which right-pads each request alone)
        first_real = jnp.argmax(is_real(args.prompt, cfg.pad_token), axis=1).astype(jnp.int32)
        kv = dataclasses.replace(kv, next_pos=-first_real)
    pre = forward(params, args.prompt, cfg, capture=capture, interventions=iv, expert_impl=expert_impl, kv=kv)
    layouts = LAYOUTS.setdefault((cfg, capture), [dict(pre.layout), {}])

    unroll = cfg.num_layers <= UNROLL_DECODE_MAX_LAYERS
    # sliced once, outside the loop, so each step reads the layers' weights in place (transformer.split_layers)
    dec_params = split_layers(params, cfg) if unroll else params

    def decode(kv, token, i):
        # one token per row: the layers are unrolled (static weight slices), so each step reads only its selected
        # experts' weights (moe.experts_gathered); in a scan XLA copies every layer's whole expert stack out of
        # the scanned params first (config of record, batch 1: 10.3 -> 5.6 ms per step). Up to 32 layers, to bound
        # the compile time of very deep models.
        out = forward(dec_params, token[:, None], cfg, capture=capture,
                      interventions=_step_interventions(iv, patches, i), expert_impl=expert_impl, kv=kv, unroll=unroll)
        layouts[1] = dict(out.layout)
        return out.logits[:, 0], {k: _drop_seq(k, v) for k, v in out.cache.items()}, out.kv

    # every row's next slot is the same (the prompts are left-padded to one width, then one token per step): a
    # scalar step writes each layer's cache in place (model.attention.write_cache)
    kv0 = dataclasses.replace(pre.kv, step=pre.kv.step[0])
    kv0 = kv0.split() if unroll else kv0
    shapes = jax.eval_shape(decode, kv0, args.prompt[:, 0], jnp.int32(0))[1] if capture else {}
    V, K, N = cfg.vocab_size, min(TOP_CANDIDATES, cfg.vocab_size), n_bucket
    z = jnp.zeros
    out = Outputs(tokens=jnp.full((b, N), fill, jnp.int32), alive=z((b, N), bool), prob=z((b, N)),
                  top_ids=z((b, N, K), jnp.int32), top_probs=z((b, N, K)), logprob=z((b, N)),
                  top_logprobs=z((b, N, K)), logits=z((b, N, V)) if keep_logits else None, steps_run=jnp.int32(0),
                  step_cache={k: z((N,) + s.shape, s.dtype) for k, s in shapes.items()}, prefill_cache=pre.cache,
                  kv=kv0)
    with keys_mod.key_context(rng):
        carry = keys_mod.start_keys(args.seeds, rng)

    def cond(state):
        i, _, alive, _, _ = state
        return (i < args.n) & jnp.any(alive)

    def body(state):
        i, logits, alive, carry, o = state
        with keys_mod.key_context(rng):
            carry, key = keys_mod.next_keys(carry)
            s = sample(key, logits, args.temperature, args.top_p, args.top_k)
        token = jnp.where(alive, s.token, fill)

        def at(buf, x):
            return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 1)

        o = o._replace(tokens=at(o.tokens, token), alive=at(o.alive, alive), prob=at(o.prob, s.prob),
                       top_ids=at(o.top_ids, s.top_ids), top_probs=at(o.top_probs, s.top_probs),
                       logprob=at(o.logprob, s.logprob), top_logprobs=at(o.top_logprobs, s.top_logprobs),
                       logits=at(o.logits, logits) if keep_logits else None, steps_run=i + 1)
        routed = "blocks.moe.top_k_experts" in capture
        if stream and not routed:
            emit(args.call_id, i, token, alive, s.prob, s.logprob)
        alive_next = alive & ~jnp.any(s.token[:, None] == args.stop, axis=-1)
        if capture:  # token i's own computation is wanted even when nothing follows it
            logits, caps, kv = decode(o.kv, token, i)
            cache = {k: jax.lax.dynamic_update_index_in_dim(o.step_cache[k], v, i, 0) for k, v in caps.items()}
            o = o._replace(step_cache=cache, kv=kv)
            if stream and routed:  # the token's routing goes out with it, so a view can draw it live
                emit(args.call_id, i, token, alive, s.prob, s.logprob, caps["blocks.moe.top_k_experts"],
                     caps.get("blocks.moe.top_k_weights"))
        else:  # skip the model call whose logits nobody samples from
            logits, kv = jax.lax.cond((i + 1 < args.n) & jnp.any(alive_next),
                                      lambda: decode(o.kv, token, i)[::2], lambda: (logits, o.kv))
            o = o._replace(kv=kv)
        return i + 1, logits, alive_next, carry, o

    state = (jnp.int32(0), pre.logits[:, -1], jnp.ones((b,), bool), carry, out)
    o = jax.lax.while_loop(cond, body, state)[-1]
    return o._replace(kv=o.kv.joined())


program_jit = jax.jit(_program, static_argnames=("cfg", "n_bucket", "capture", "rng", "stream", "keep_logits",
                                                 "expert_impl"))

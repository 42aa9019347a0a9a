"""Grouped-query attention with RoPE, logit multiplier, optional soft cap, sinks and sliding windows, -1e30 masking
(docs/grok1.md#attention; the other families' options in docs/families.md), with an optional KV cache."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from .. import kernels
from ..config import is_real
from ..hooks import AttentionSpec
from ..kernels.fused import attend_fused
from ..params import dense
from .layers import MASK_VALUE, rms_norm, rope, softcap
from .tiled import TILE_K, attend_tiled

#: attention implementations: "auto" (the default: "fused" where the compiled CPU kernel is available, else
#: "tiled"), "fused" (grokviz.kernels: one pass over key tiles in C++ through jax.ffi), "tiled" (query x key
#: tiles with an online softmax in pure JAX) and "reference" (the straightforward full-score form). All give the
#: same result to fp32 rounding; logits and scores maps are always computed in the reference form, the pattern
#: under "fused" by the kernel (docs/grok1.md#attention).
ATTN_IMPLS = ("auto", "fused", "tiled", "reference")


@dataclasses.dataclass(frozen=True)
class _ImplSpec(AttentionSpec):
    """The run's :class:`~grokviz.hooks.AttentionSpec` as the blocks see it, with the implementation chosen."""

    impl: str = "auto"


def resolve_impl(impl: str) -> str:
    """The implementation ``impl`` runs as: "auto" is "fused" when the kernel is available on a CPU backend,
    else "tiled"; "fused" without the kernel falls back to "tiled" (saying why, once per process)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {list(ATTN_IMPLS)}, got {impl!r}")
    if impl not in ("auto", "fused"):
        return impl
    if jax.default_backend() == "cpu" and kernels.available():
        return "fused"
    if impl == "fused":
        kernels.fallback_notice(impl)
    return "tiled"


def _impl_of(spec) -> str:
    """The resolved implementation a spec carries (a plain AttentionSpec: the default, "auto")."""
    return resolve_impl(getattr(spec, "impl", "auto"))


def with_impl(spec: AttentionSpec | None, impl: str) -> AttentionSpec:
    """``spec`` (default ``AttentionSpec()``) carrying the attention implementation ``impl`` (resolved by
    :func:`resolve_impl`) to the blocks."""
    impl = resolve_impl(impl)
    spec = spec or AttentionSpec()
    return _ImplSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(AttentionSpec)}, impl=impl)


def positions_of(tokens, cfg, start=None):
    """int32 [batch, seq] RoPE positions of ``tokens`` under the config's ``position_rule``.

    ``index`` (Grok-1): the buffer index (plus ``start`` [batch] for a chunk written into a KV cache).
    ``real_count`` (the HF families): the number of real tokens before the position, so a left-padded row starts
    at 0 at its first real token (``clip(cumsum(real) - 1, 0)``, as transformers' ``generate`` builds
    ``position_ids``); with ``start`` the chunk continues from that count."""
    b, t = tokens.shape
    if cfg.position_rule == "index":
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return pos if start is None else pos + start[:, None]
    count = jnp.cumsum(is_real(tokens, cfg.pad_token).astype(jnp.int32), axis=1)
    if start is not None:
        count = count + start[:, None]
    return jnp.maximum(count - 1, 0)


def window_allowed(allowed, q_pos, k_pos, window):
    """``allowed`` [b, 1, t, s] further limited to keys less than ``window`` positions behind the query (a
    sliding-window layer: transformers keeps key j for query i iff j > i - window)."""
    return allowed & ((q_pos[:, None, :, None] - k_pos[:, None, None, :]) < window)


def attention_mask(tokens, pad_token, length=None):
    """(allowed, fill): allowed [batch, 1, seq, kv_seq] bool — key is real (:func:`grokviz.config.is_real`) and causal
    (kv_seq <= seq); queries are not masked. ``fill`` is the value of masked logits: -1e30 as in the reference.

    ``length`` (optional, traced): the true sequence length when the tokens were right-padded to a bucket.
    Keys at or beyond it get -2e30, so a query whose keys are all masked (left padding) is uniform over the
    first ``length`` keys exactly as in an unpadded run, while every other row is unchanged.
    """
    real = is_real(tokens, pad_token)
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    allowed = real[:, None, None, :] & causal[None, None]
    if length is None:
        return allowed, jnp.float32(MASK_VALUE)
    fill = jnp.where(jnp.arange(t) < length, jnp.float32(MASK_VALUE), jnp.float32(2 * MASK_VALUE))
    return allowed, fill


def project_qkv(p, x, cfg):
    """q [b t h d], k, v [b t kv d] of one layer before RoPE: projections (+ biases), QK norms (over the whole
    projection, OLMoE; or per head over head_dim, Qwen3)."""
    dt = x.dtype
    q, k, v = (x @ dense(p[w], dt) for w in ("w_q", "w_k", "w_v"))
    if cfg.qkv_bias:
        q, k, v = q + p["b_q"].astype(dt), k + p["b_k"].astype(dt), v + p["b_v"].astype(dt)
    if cfg.qk_norm == "projection":
        q, k = rms_norm(q, p["q_norm"], cfg.rms_eps), rms_norm(k, p["k_norm"], cfg.rms_eps)
    q, k, v = (rearrange(a, "b t (h d) -> b t h d", d=cfg.head_dim) for a in (q, k, v))
    if cfg.qk_norm == "head":
        q, k = rms_norm(q, p["q_norm"], cfg.rms_eps), rms_norm(k, p["k_norm"], cfg.rms_eps)
    return q, k, v


def _rope_point(point, name, x, positions, cfg):
    """RoPE, with the captured copy computed on a separate branch.

    XLA fuses RoPE into the logits einsum; storing the same value as a capture changes that fusion and moved
    the logits by ~6e-7. Capturing from a copy behind an optimisation barrier leaves the main computation
    exactly as without capture (so logits stay bit-identical); the captured value equals it to fp32 rounding.
    A patch or callback on this hook replaces the value on the main path.
    """
    if point.patched(name):
        return point(name, rope(x, positions, cfg.rope_base, cfg))
    if point.wants(name):
        point(name, rope(jax.lax.optimization_barrier(x), positions, cfg.rope_base, cfg))
    return rope(x, positions, cfg.rope_base, cfg)


def _row_summaries(flat, want, top_keys) -> dict:
    """Per-query summaries of a pattern [b, head, t, s] for the reduced hooks in ``want`` (memory ~ b*head*t)."""
    out = {}
    if "attn.entropy" in want:
        out["attn.entropy"] = -jnp.sum(jnp.where(flat > 0, flat * jnp.log(flat), 0.0), axis=-1)
    if "attn.top_keys" in want or "attn.top_key_weights" in want:
        weights, keys = jax.lax.top_k(flat, min(top_keys, flat.shape[-1]))
        out["attn.top_keys"], out["attn.top_key_weights"] = keys.astype(jnp.int32), weights
    return out


def _reductions(pattern, point, spec):
    """Reduced summaries of the full pattern [b, head, t, s], computed on the fly."""
    for name, value in _row_summaries(pattern, {n for n in REDUCED if point.wants(n)}, spec.top_keys).items():
        point(name, value)
    if point.wants("attn.pattern_at"):
        point("attn.pattern_at", pattern[:, :, jnp.asarray(spec.queries), :])


CHUNK = 512        # query rows per chunk in the chunked path (512 beat 256 and the full map at 1k-2k)
CHUNK_MIN_SEQ = 1024  # sequences at least this long use it (see use_chunked)
MAPS = ("attn.logits", "attn.scores", "attn.pattern")
REDUCED = ("attn.entropy", "attn.pattern_at", "attn.top_keys", "attn.top_key_weights")


def _logits(qg, k, cfg):
    """Scaled attention logits [b kv g t s] for queries qg [b kv g t d] and keys k [b s kv d]."""
    if qg.shape[3] == 1:  # one query per row (a decode step): see _mix
        dots = jnp.sum(qg[:, :, :, :, None, :] * rearrange(k, "b s h d -> b h s d")[:, :, None, None], axis=-1)
        return dots.astype(jnp.float32) * cfg.attn_logit_multiplier
    return jnp.einsum("bhgtd,bshd->bhgts", qg, k).astype(jnp.float32) * cfg.attn_logit_multiplier


def _mix(pattern, v):
    """The attention output [b t kv g d] from weights [b kv g t s] and values v [b s kv d].

    With one query per row (a decode step over a KV cache) both products are written as multiply + reduce: XLA
    CPU fuses those into one pass over the cache where it lies, while a dot wants the cache transposed and
    copied it every step (config of record, batch 4: a copy of every layer's keys and values per token)."""
    if pattern.shape[3] == 1:
        return jnp.sum(pattern[..., None] * rearrange(v, "b s h d -> b h s d")[:, :, None, None], axis=-2
                       ).transpose(0, 3, 1, 2, 4)
    return jnp.einsum("bhgts,bshd->bthgd", pattern, v)


def _masked_softmax(scores, allowed, fill, sinks=None):
    """Softmax over keys of the soft-capped scores [b kv g t s], masked keys set to ``fill``.

    ``sinks`` [kv, g] (gpt-oss): one extra logit per query head joins the normalisation and its weight is
    dropped, so the weights of a row sum to less than 1 (to 0 when every key is masked)."""
    masked = jnp.where(allowed[:, :, None], scores, fill)
    if sinks is None:
        return jax.nn.softmax(masked, axis=-1)
    sink = sinks.astype(jnp.float32)[None, :, :, None, None]
    top = jnp.maximum(jnp.max(masked, axis=-1, keepdims=True), sink)
    e = jnp.exp(masked - top)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))


def _scores(logits, cfg):
    return logits if cfg.attn_softcap is None else softcap(logits, cfg.attn_softcap)


def _sinks(p, cfg):
    return rearrange(p["sinks"], "(kv g) -> kv g", g=cfg.group_size) if cfg.attn_sinks else None


def _probs(qg, k, allowed, fill, cfg, sinks=None):
    """Scaled, soft-capped, masked, softmaxed attention for queries qg [b kv g t d] and keys k [b s kv d]."""
    logits = _logits(qg, k, cfg)
    scores = _scores(logits, cfg)
    return logits, scores, _masked_softmax(scores, allowed, fill, sinks)


def attention_maps(p, x, mask, cfg, positions, spec=None) -> dict:
    """The full attention maps of one layer from its input x = attn.pre_norm: {'logits', 'scores', 'pattern'},
    each [batch, head, seq, kv_seq] — the same computation as inside :func:`attention` (used to give maps of
    selected layers without keeping maps for every layer). ``mask``: this layer's (allowed, fill). Where the run's
    ``spec`` resolved to the fused kernel, the pattern is the kernel's, as a capture inside the layer gives it
    (logits and scores are always the reference form's; unused maps cost nothing under jit)."""
    q, k, v = project_qkv(p, x, cfg)
    q, k = rope(q, positions, cfg.rope_base, cfg), rope(k, positions, cfg.rope_base, cfg)
    qg = rearrange(q, "b t (kv g) d -> b kv g t d", g=cfg.group_size)
    sinks = _sinks(p, cfg)
    out = _probs(qg, k, *mask, cfg, sinks)
    maps = {n: rearrange(a, "b kv g t s -> b (kv g) t s") for n, a in zip(("logits", "scores", "pattern"), out)}
    if spec is not None and _impl_of(spec) == "fused":
        qg, k, v = jax.lax.optimization_barrier((qg, k, v))
        maps["pattern"] = attend_fused(qg, k, v, mask, cfg, x.dtype, sinks, pattern=True)[1]
    return maps



def _attend_chunked(qg, k, v, mask, cfg, point, spec, dt, sinks=None):
    """Causal attention in query chunks: chunk i only reads keys [0, end_i), so memory is ~ chunk x seq and the
    score work about halves. Rows with no allowed key (left padding) are uniform over all valid keys in the
    reference; they are set to exactly that (mean of v over the valid keys). Reduced summaries per chunk.

    A captured ``attn.pattern`` is assembled from the chunks (zeros right of each chunk's key range, the
    uniform rows set as above): at 1x1024 on the bench configuration this took the forward with every layer's
    pattern from 92.8 to 84.8 ms against the full-map path (chunks of 128: 86.5; of 256: 102 — XLA).
    """
    allowed, fill = mask
    b, kvh, g, t, _ = qg.shape
    fill = jnp.broadcast_to(fill, (t,))
    n_valid = jnp.sum(fill == MASK_VALUE).astype(jnp.float32)  # keys that are not bucket padding
    empty = ~jnp.any(allowed[:, 0], axis=-1)                      # [b, t]: query with no allowed key
    v_mean = jnp.sum(jnp.where((fill == MASK_VALUE)[None, :, None, None], v, 0), axis=1) / n_valid.astype(dt)
    if sinks is not None:  # a row with no allowed key gives weight 0 everywhere, in a chunk as in the full map
        empty = jnp.zeros_like(empty)
    want = {n for n in REDUCED if point.wants(n)}
    full = point.wants("attn.pattern")
    outs, sums, pats = [], [], []
    for start in range(0, t, CHUNK):
        end = min(start + CHUNK, t)
        _, _, pat = _probs(qg[:, :, :, start:end], k[:, :end], allowed[:, :, start:end, :end], fill[:end], cfg,
                           sinks)
        outs.append(jnp.einsum("bhgts,bshd->bthgd", pat.astype(dt), v[:, :end]))
        sums.append(_row_summaries(rearrange(pat, "b kv g t s -> b (kv g) t s"), want, spec.top_keys))
        if full:
            pats.append(jnp.pad(pat, ((0, 0),) * 4 + ((0, t - end),)))
    if full:
        uniform = jnp.where(fill == MASK_VALUE, 1.0 / n_valid, 0.0)  # [s]
        pattern = jnp.where(empty[:, None, None, :, None], uniform, jnp.concatenate(pats, axis=3))
        point("attn.pattern", rearrange(pattern, "b kv g t s -> b (kv g) t s"))
    o = jnp.concatenate(outs, axis=1)  # [b t kv g d]
    o = jnp.where(empty[:, :, None, None, None], v_mean[:, None, :, None, :].astype(dt), o)
    # rows with no allowed key are uniform over the n_valid keys, as in the full computation
    e_rows = empty[:, None, :]  # [b, 1(head), t]
    empty_value = {"attn.entropy": (e_rows, jnp.log(n_valid)),
                   "attn.top_key_weights": (e_rows[..., None], 1.0 / n_valid)}
    for name in sums[0]:
        value = jnp.concatenate([c[name] for c in sums], axis=2)
        if name in empty_value:
            value = jnp.where(empty_value[name][0], empty_value[name][1], value)
        point(name, value)
    if "attn.pattern_at" in want:  # only the chosen query rows, over all keys
        rows = jnp.asarray(spec.queries)
        _, _, pat = _probs(qg[:, :, :, rows], k, allowed[:, :, rows], fill, cfg, sinks)
        point("attn.pattern_at", rearrange(pat, "b kv g t s -> b (kv g) t s"))
    return o


def use_chunked(point, t) -> bool:
    """Long sequences run in query chunks unless logits or scores are wanted, or anything patches the maps
    (a captured pattern is assembled from the chunks)."""
    return t >= CHUNK_MIN_SEQ and not any(point.patched(n) for n in MAPS) and not any(
        point.wants(n) for n in MAPS if n != "attn.pattern")


def use_tiled(point, spec, t) -> bool:
    """The tiled path (no KV cache) runs unless the spec asks for the reference, a map is patched or called back
    (the output then flows from the maps), or more top keys are wanted than a key tile holds. Maps that are only
    captured are computed beside it in the reference form, so capturing them leaves the output unchanged."""
    if _impl_of(spec) not in ("tiled", "fused") or any(point.patched(n) for n in MAPS):
        return False
    return not (point.wants("attn.top_keys") or point.wants("attn.top_key_weights")) or spec.top_keys <= min(TILE_K, t)


def use_fused(point, spec, t, cached) -> bool:
    """The fused kernel runs when the spec resolved to it and no map is patched or called back (online summaries
    without a captured pattern are computed beside it by the tiled form, see :func:`_attend_tiled`, so it runs
    where that can). Over a KV cache it runs for chunks of more than one query with no map or summary wanted (a
    decode step keeps the multiply + reduce of :func:`_mix`)."""
    if _impl_of(spec) != "fused" or any(point.patched(n) for n in MAPS):
        return False
    online = any(point.wants(n) for n in ("attn.entropy", "attn.top_keys", "attn.top_key_weights"))
    if cached:
        return t > 1 and not online and not any(point.wants(n) for n in MAPS + ("attn.pattern_at",))
    return not online or point.wants("attn.pattern") or use_tiled(point, spec, t)


def _side_qk(point, q, k, qg, k_roped, positions, cfg):
    """Queries [b kv g t d] and keys [b t kv d] for what is computed beside the tiled output (captured maps, the
    chosen rows): from a copy behind an optimisation barrier, so that capturing them leaves the output's
    computation (and so the logits) bit for bit as without capture. Without a patch on q or k, RoPE is applied
    on that copy as :func:`attention_maps` applies it (maps of selected layers recomputed after the scan then
    equal the maps captured inside it); with one, the patched values are used."""
    if point.patched("attn.q") or point.patched("attn.k"):
        return jax.lax.optimization_barrier((qg, k_roped))
    q, k = jax.lax.optimization_barrier((q, k))
    q, k = rope(q, positions, cfg.rope_base, cfg), rope(k, positions, cfg.rope_base, cfg)
    return rearrange(q, "b t (kv g) d -> b kv g t d", g=cfg.group_size), k


def _attend_tiled(qg, k, v, mask, cfg, point, spec, dt, sinks, side, fused=False):
    """:func:`grokviz.model.tiled.attend_tiled` (or, ``fused``, :func:`grokviz.kernels.fused.attend_fused`), with
    the reduced summaries recorded. Under ``fused`` a captured pattern is the kernel's (written into the run's
    buffer of every layer when ``point.target`` gives one) and the reductions come from it. Other captured maps
    and the chosen query rows of ``attn.pattern_at`` (over all keys, as in the full map) are computed in the
    reference form beside it, from ``side()`` = (queries, keys) of :func:`_side_qk`."""
    want = {n for n in REDUCED if point.wants(n)}
    maps = [n for n in MAPS if point.wants(n)]
    online = frozenset() if "attn.pattern" in maps else frozenset(want)  # else from the captured pattern
    if side is not None:  # one copy of the queries and keys for everything computed beside (None: nothing is)
        side = functools.cache(side)
    kernel_pattern = None
    if fused:
        target = point.target("attn.pattern") if "attn.pattern" in maps else None
        if target is not None:  # the run's buffer of every layer's pattern: written in place, no copy
            o, buf = attend_fused(qg, k, v, mask, cfg, dt, sinks, into=target)
            point.wrote("attn.pattern", buf)
            maps.remove("attn.pattern")
            if want:
                kernel_pattern = jax.lax.dynamic_index_in_dim(buf, target[1], 0, keepdims=False)
        elif "attn.pattern" in maps:
            # one pass gives the output and the weights that made it (attention_maps recomputes selected layers
            # after the scan with the same kernel, so those equal the maps captured here)
            o, kernel_pattern = attend_fused(qg, k, v, mask, cfg, dt, sinks, pattern=True)
        else:
            o = attend_fused(qg, k, v, mask, cfg, dt, sinks)
        online = online & {"attn.entropy", "attn.top_keys", "attn.top_key_weights"}
        # without a captured pattern, online summaries come from the tiled form beside the kernel, on side()
        # copies (reading the kernel's own inputs changed their layout, and the logits by ~1e-6); the values do
        # not enter them
        summaries = {}
        if online:
            sq, sk = side()
            summaries = attend_tiled(sq, sk, jnp.zeros_like(v), mask, cfg, dt, sinks, want=online,
                                     top_keys=spec.top_keys)[1]
    else:
        o, summaries = attend_tiled(qg, k, v, mask, cfg, dt, sinks, want=online, top_keys=spec.top_keys)
    for name, value in summaries.items():
        if name in want:
            point(name, value)
    if not maps and kernel_pattern is None and "attn.pattern_at" not in want:
        return o
    values = {} if kernel_pattern is None else {"attn.pattern": kernel_pattern}
    if any(n not in values for n in maps):
        sq, sk = side()
        values.update((n, rearrange(a, "b kv g t s -> b (kv g) t s")) for n, a in
                      zip(MAPS, _probs(sq, sk, *mask, cfg, sinks)) if n in maps and n not in values)
    for name in maps:
        point(name, values[name])
    full = values.get("attn.pattern")
    if full is not None and want:  # the reductions (pattern_at included) from the full pattern
        _reductions(full, point, spec)
    elif "attn.pattern_at" in want:  # only the chosen query rows, over all keys
        sq, sk = side()
        allowed, fill = mask
        rows = jnp.asarray(spec.queries)
        _, _, pat = _probs(sq[:, :, :, rows], sk, allowed[:, :, rows], fill, cfg, sinks)
        point("attn.pattern_at", rearrange(pat, "b kv g t s -> b (kv g) t s"))
    return o


def write_cache(cache, new, step):
    """Write ``new`` [b, t, ...] into ``cache`` [b, S, ...] at index ``step[b]`` of each row (``step`` of shape ():
    the same index for every row, one in-place update instead of a per-row scatter)."""
    if jnp.ndim(step) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), step, axis=1)

    def one(c, x, s):
        return jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), s, axis=0)

    return jax.vmap(one)(cache, new, step)


def attention(p, x, mask, cfg, point, head_scale=None, spec=None, positions=None, kv=None):
    """x: [batch, seq, d_model] (already pre-normed) -> [batch, seq, d_model]; ``point`` names activations.

    ``mask``: this layer's (allowed [b, 1, seq, kv_seq], fill); ``positions`` [b, seq]: RoPE positions (default
    0..seq-1). ``kv``: None, or this layer's cache (k, v [b, S, kv_head, head_dim], step [b]): the chunk's keys
    (after RoPE) and values are written at ``step`` and the queries attend over the whole buffer (``mask`` is
    then [b, 1, seq, S]); the result is (out, (k, v)) with the updated buffers.
    """
    dt = x.dtype
    t = x.shape[1]
    spec = spec or AttentionSpec()
    if positions is None:
        positions = jnp.arange(t)
    q_pre, k_pre, v = project_qkv(p, x, cfg)
    fused = use_fused(point, spec, t, kv is not None)
    fast = fused or (kv is None and use_tiled(point, spec, t))  # the fused kernel or the tiled form
    q = _rope_point(point, "attn.q", q_pre, positions, cfg)
    k = _rope_point(point, "attn.k", k_pre, positions, cfg)
    v = point("attn.v", v)
    if kv is not None:
        k_cache, v_cache, step = kv
        k_cache, v_cache = write_cache(k_cache, k, step), write_cache(v_cache, v, step)
        k, v = k_cache.astype(dt), v_cache.astype(dt)
    sinks = _sinks(p, cfg)
    # query head j = kv_head * G + g uses kv head j // G (contiguous groups)
    qg = rearrange(q, "b t (kv g) d -> b kv g t d", g=cfg.group_size)
    if fast:
        # the tiled loop (or the kernel) starts from materialised q, k, v whatever else reads them (captures, maps
        # beside it), so that its result is bit for bit the same with and without them
        qg, k, v = jax.lax.optimization_barrier((qg, k, v))
        o = _attend_tiled(qg, k, v, mask, cfg, point, spec, dt, sinks,
                          functools.partial(_side_qk, point, q_pre, k_pre, qg, k, positions, cfg), fused)
    elif kv is None and use_chunked(point, t) and spec.top_keys <= CHUNK:
        o = _attend_chunked(qg, k, v, mask, cfg, point, spec, dt, sinks)
    else:
        if point.patched("attn.logits") or point.patched("attn.scores"):
            # a patch (or callback) replaces logits or scores: the softmax starts from the replaced values
            logits = point("attn.logits", rearrange(_logits(qg, k, cfg), "b kv g t s -> b (kv g) t s"))
            scores = point("attn.scores", _scores(logits, cfg))
            pattern = _masked_softmax(rearrange(scores, "b (kv g) t s -> b kv g t s", g=cfg.group_size), *mask,
                                      sinks)
        else:
            logits, scores, pattern = _probs(qg, k, *mask, cfg, sinks)
            if point.wants("attn.logits"):
                point("attn.logits", rearrange(logits, "b kv g t s -> b (kv g) t s"))
            if point.wants("attn.scores"):
                point("attn.scores", rearrange(scores, "b kv g t s -> b (kv g) t s"))
        reduce = any(point.wants(n) for n in REDUCED)
        if point.wants("attn.pattern") or point.patched("attn.pattern") or reduce:
            flat = point("attn.pattern", rearrange(pattern, "b kv g t s -> b (kv g) t s"))
            pattern = rearrange(flat, "b (kv g) t s -> b kv g t s", g=cfg.group_size)
            if reduce:
                _reductions(flat, point, spec)
        o = _mix(pattern.astype(dt), v)
    o = rearrange(o, "b t kv g d -> b t (kv g) d")
    if head_scale is not None:
        o = o * head_scale[:, None].astype(dt)
    o = point("attn.head_out", o)
    out = rearrange(o, "b t h d -> b t (h d)") @ dense(p["w_o"], dt)
    if cfg.o_bias:
        out = out + p["b_o"].astype(dt)
    return out if kv is None else (out, (k_cache, v_cache))

"""``gv.Model``: params + config (+ tokenizer) with a validated, jitted ``run``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .cache import ActivationCache
from .config import GrokConfig, bucket_length, is_real
from .hooks import REGISTRY, AttentionSpec, select
from .interventions import Interventions, check_interventions
from .model.attention import resolve_impl
from .model.transformer import forward
from .params import count_params, validate_params

TRACE_COUNT = [0]  # incremented each time the jitted forward is traced (i.e. compiled); tests read it


def _forward(params, tokens, interventions, length, *, cfg, capture, expert_impl, unroll, callbacks, attn_spec,
             attn_impl="auto"):
    TRACE_COUNT[0] += 1
    return forward(params, tokens, cfg, capture=capture, interventions=interventions, expert_impl=expert_impl,
                   unroll=unroll, callbacks=dict(callbacks), attn_spec=attn_spec, length=length, attn_impl=attn_impl)


forward_jit = jax.jit(_forward, static_argnames=("cfg", "capture", "expert_impl", "unroll", "callbacks",
                                                 "attn_spec", "attn_impl"))


def _forward_many(params, tokens, stacked, *, cfg, capture, expert_impl):
    TRACE_COUNT[0] += 1
    def fn(iv):
        return forward(params, tokens, cfg, capture=capture, interventions=iv, expert_impl=expert_impl)

    return jax.vmap(fn)(stacked)


forward_many_jit = jax.jit(_forward_many, static_argnames=("cfg", "capture", "expert_impl"))


def pad_seq(name: str, value, width: int) -> np.ndarray:
    """Zero-pad a patch value along its seq/kv_seq axes to ``width``, on the host (nothing compiles per length;
    the padded part is never applied)."""
    axes = REGISTRY[name].axes
    value = np.asarray(value)
    lead = value.ndim - len(axes)  # a leading variant axis, if any
    return np.pad(value, [(0, 0)] * lead + [(0, width - value.shape[lead + i]) if a in ("seq", "kv_seq")
                                             else (0, 0) for i, a in enumerate(axes)])


def validate_tokens(tokens, cfg: GrokConfig) -> np.ndarray:
    """Check ids and shapes on the host; returns int32 [batch, seq]. Raises ValueError naming the problem."""
    arr = np.asarray(tokens)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, seq] (or [seq]), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"tokens are empty (shape {arr.shape}); give at least one token")
    if arr.shape[1] > cfg.sequence_len:
        raise ValueError(f"sequence length {arr.shape[1]} exceeds the model's sequence_len {cfg.sequence_len}")
    ids = arr[arr != cfg.pad_token] if cfg.pad_token < 0 else arr  # pad id -1: padding outside the vocabulary
    lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(arr == bad)[0])
        raise ValueError(f"token id {bad} at position {where} is outside the vocabulary [0, {cfg.vocab_size})")
    return arr.astype(np.int32)


class Run:
    """The result of :meth:`Model.run`, with the settings it was made with (so it can be re-run or compared).

    ``logits`` [batch, seq, vocab] and the cache values are host (numpy, read-only) arrays, fetched from the
    device on first access; a bucketed run keeps the padded device arrays and cuts them back to the true length
    on the host, so no length ever compiles a program of its own. ``cfg`` is the configuration the run used
    (``top_k`` replaced when it was given), ``interventions`` the ones given (None for none), ``attention`` the
    :class:`~grokviz.hooks.AttentionSpec`, ``capture`` the frozenset of captured hook names, ``expert_impl``,
    ``bucket`` whether the tokens were padded to a bucket, ``unroll`` and ``callbacks`` as given, ``attn_impl`` as run.
    """

    def __init__(self, tokens, logits, cache, model, *, cfg=None, interventions=None, attention=None,
                 capture=frozenset(), expert_impl="sparse", bucket=False, unroll=False, callbacks=None,
                 attn_impl="auto"):
        self.tokens = np.asarray(tokens)        # [batch, seq] int32, as given (not padded)
        self._logits = logits                   # [batch, padded seq, vocab] (device) until first access
        self.cache = cache
        self.model = model
        self.cfg = model.cfg if cfg is None else cfg
        self.interventions = interventions
        self.attention = AttentionSpec() if attention is None else attention
        self.capture = frozenset(capture)
        self.expert_impl = expert_impl
        self.bucket = bool(bucket)
        self.unroll = bool(unroll)
        self.callbacks = dict(callbacks or {})
        self.attn_impl = resolve_impl(attn_impl)  # as it ran: "auto" / "fused" resolved

    @property
    def logits(self) -> np.ndarray:
        """[batch, seq, vocab] float32 on the host (the padded tail of a bucketed run cut off)."""
        if not isinstance(self._logits, np.ndarray) or self._logits.shape[1] != self.tokens.shape[1]:
            self._logits = np.asarray(self._logits)[:, :self.tokens.shape[1]]
        return self._logits

    @property
    def real(self) -> np.ndarray:
        """[batch, seq] bool: not padding (:func:`grokviz.config.is_real`)."""
        return is_real(self.tokens, self.cfg.pad_token)

    def positions(self, row: int = 0) -> np.ndarray:
        """int [n]: the real (non-pad) positions of ``row``, in order."""
        b = self.tokens.shape[0]
        if not isinstance(row, (int, np.integer)) or isinstance(row, bool) or not -b <= row < b:
            raise IndexError(f"row {row!r} is outside the batch of {b} row(s) [-{b}, {b})")
        return np.flatnonzero(self.real[row])

    def settings(self) -> dict:
        """The keyword arguments of :meth:`Model.run` that reproduce this run (tokens aside)."""
        out = dict(capture=self.capture, interventions=self.interventions, expert_impl=self.expert_impl,
                   unroll=self.unroll, callbacks=self.callbacks or None, attention=self.attention,
                   bucket=self.bucket, attn_impl=self.attn_impl)
        if self.cfg.top_k != self.model.cfg.top_k:
            out["top_k"] = self.cfg.top_k
        return out

    def rerun(self, model: Model | None = None, **overrides) -> Run:
        """Run the same tokens again with exactly this run's settings, on ``model`` (default: the same model),
        with any keyword of :meth:`Model.run` overridden (``rerun(interventions=iv)``, ``rerun(top_k=1)``)."""
        settings = self.settings()
        if model is not None and "top_k" not in overrides and self.cfg.top_k != model.cfg.top_k:
            settings["top_k"] = self.cfg.top_k
        return (model or self.model).run(self.tokens, **{**settings, **overrides})

    def str_tokens(self, row: int = 0) -> list[str]:
        tok = self.model.tokenizer
        ids = self.tokens[row].tolist()
        return [tok.id_to_piece(i) for i in ids] if tok is not None else [str(i) for i in ids]

    def __repr__(self):
        shape = list(self.tokens.shape) + [self.cfg.vocab_size]
        return f"Run(tokens={list(self.tokens.shape)}, logits={shape}, cache={self.cache!r})"


class Model:
    """A Grok-architecture model ready to run. ``Model(cfg, params, tokenizer=None)``."""

    def __init__(self, cfg: GrokConfig, params, tokenizer=None, *, validate: bool = True, bucket: bool = True):
        if not isinstance(cfg, GrokConfig):
            raise TypeError(f"cfg must be a GrokConfig, got {type(cfg).__name__}")
        if validate:
            validate_params(params, cfg)
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        self.bucket = bucket

    def __repr__(self):
        tok = "with tokenizer" if self.tokenizer is not None else "no tokenizer"
        return f"Model({self.cfg.describe()}, {count_params(self.params):,} params, {tok})"

    def encode(self, text: str | Sequence[str]) -> np.ndarray:
        """Text (or a list of texts) -> int32 [batch, seq], right-padded with the pad id."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer attached; pass token ids, or attach one with "
                             "Model(cfg, params, tokenizer=...)")
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.tokenizer.encode(t) for t in texts]
        if not all(rows):
            raise ValueError("a text encoded to zero tokens; give non-empty text")
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), self.cfg.pad_token, np.int32)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    def to_tokens(self, tokens_or_text) -> np.ndarray:
        if isinstance(tokens_or_text, str) or (isinstance(tokens_or_text, (list, tuple)) and tokens_or_text
                                               and isinstance(tokens_or_text[0], str)):
            tokens_or_text = self.encode(tokens_or_text)
        return validate_tokens(tokens_or_text, self.cfg)

    def run(self, tokens_or_text, *, capture=None, interventions: Interventions | None = None,
            expert_impl: str = "sparse", unroll: bool = False, callbacks: dict[str, Any] | None = None,
            top_k: int | None = None, attention: AttentionSpec | None = None,
            bucket: bool | None = None, attn_impl: str = "auto") -> Run:
        """Forward pass. ``capture``: hook names or globs; ``interventions``: data (no recompile when only
        values change); ``callbacks``: {hook: fn(value, layer) -> value} (static: recompiles);
        ``top_k``: route to a different number of experts (static: recompiles); ``attention``: an
        :class:`~grokviz.hooks.AttentionSpec` limiting attention maps to some layers/heads (static);
        ``bucket``: right-pad the sequence with pad tokens to a bucketed length (16, 32, ..., 256, then multiples
        of 256) so prompts of similar lengths share one compiled program; results are cut back to the true
        length on the host. Right padding never changes real positions (causal attention, pad keys masked,
        padding excluded from expert load) beyond fp32 rounding of the different shapes. Default: the model's
        ``bucket`` (True). Runs with patches are bucketed too: patch values and masks are padded on the host
        and the padded positions are never patched. ``attn_impl``: "auto" (default), "fused", "tiled" or
        "reference", see :func:`grokviz.model.forward` (the same result to fp32 rounding).

        Interventions are checked on the host first (:func:`check_interventions`): every index, id, value and
        patch shape, with a ``ValueError`` naming the intervention and the bound."""
        tokens = self.to_tokens(tokens_or_text)
        cfg = self.cfg if top_k is None else self.cfg.replace(top_k=top_k)
        if callbacks:
            select(list(callbacks))  # validate names
        capture = select(capture)
        t = tokens.shape[1]
        given_attention = attention = attention or AttentionSpec()
        check_attention_spec(attention, cfg, t)
        if interventions is not None:
            check_interventions(interventions, cfg, tokens.shape, attention)
        if "blocks.attn.pattern_at" in capture:  # negative query positions count from the true end
            attention = dataclasses.replace(attention, queries=tuple(q % t for q in attention.queries))
        bucket = self.bucket if bucket is None else bool(bucket)
        padded, run_iv = tokens, interventions
        if bucket:
            width = bucket_length(t, cfg.sequence_len)
            padded = np.pad(tokens, ((0, 0), (0, width - t)), constant_values=cfg.pad_token)
            if interventions is not None and interventions.patches and width != t:
                run_iv = dataclasses.replace(interventions, patches={
                    k: (pad_seq(k, v, width), np.pad(np.asarray(m), [(0, 0)] * (np.ndim(m) - 1) + [(0, width - t)]))
                    for k, (v, m) in interventions.patches.items()})
        length = jnp.int32(t) if bucket else None  # always given when bucketing, so the pytree never changes
        attn_impl = resolve_impl(attn_impl)  # compiled under the resolved name, as Run records it (one program)
        out = forward_jit(self.params, jnp.asarray(padded), run_iv, length, cfg=cfg, capture=capture,
                          expert_impl=expert_impl, unroll=unroll,
                          callbacks=tuple(sorted((callbacks or {}).items())), attn_spec=attention,
                          attn_impl=attn_impl)
        cache = ActivationCache(out.cache, dict(out.layout), num_layers=cfg.num_layers,
                                length=t, moe_layers=cfg.moe_layer_ids)
        return Run(tokens, out.logits, cache, self, cfg=cfg, interventions=interventions,
                   attention=given_attention, capture=capture, expert_impl=expert_impl, bucket=bucket,
                   unroll=unroll, callbacks=callbacks, attn_impl=attn_impl)

    def generate(self, prompt, max_new_tokens: int, **kwargs):
        """Sample a continuation with a KV cache, capturing and steering the model per generated token; see
        :func:`grokviz.generation.generate` for the arguments and :class:`grokviz.generation.GenerationResult`."""
        from .generation import generate

        return generate(self, prompt, max_new_tokens, **kwargs)

    def run_many(self, tokens_or_text, interventions, *, capture=None, expert_impl="sparse"):
        """Many interventions in one vmapped call. ``interventions``: a list, or an already stacked
        Interventions (leading axis = variant). Returns (logits [variant, batch, seq, vocab], cache) where the
        cache's arrays have a leading variant axis and ``cache[name, layer]`` is [variant, ...] of that layer.
        Every variant is checked as in :meth:`run`."""
        from .interventions import stack

        tokens = self.to_tokens(tokens_or_text)
        stacked = stack(list(interventions)) if isinstance(interventions, (list, tuple)) else interventions
        check_interventions(stacked, self.cfg, tokens.shape, variants=True)
        out = forward_many_jit(self.params, jnp.asarray(tokens), stacked, cfg=self.cfg, capture=select(capture),
                               expert_impl=expert_impl)
        return out.logits, ActivationCache(out.cache, dict(out.layout), num_layers=self.cfg.num_layers,
                                           variants=True, moe_layers=self.cfg.moe_layer_ids)


def check_attention_spec(spec: AttentionSpec, cfg: GrokConfig, seq: int) -> None:
    for name, values, n in (("layers", spec.layers, cfg.num_layers), ("heads", spec.heads, cfg.num_q_heads),
                            ("queries", spec.queries, seq)):
        for v in values or ():
            if not -n <= v < n:
                raise ValueError(f"AttentionSpec.{name} contains {v}, outside [-{n}, {n})")

"""``gv.Model``: params + config (+ tokenizer) with a validated, jitted ``run``."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import ActivationCache
from .config import GrokConfig
from .hooks import REGISTRY, AttentionSpec, select
from .interventions import Interventions
from .model.transformer import cache_layout, forward
from .params import count_params, validate_params


TRACE_COUNT = [0]  # incremented each time the jitted forward is traced (i.e. compiled); tests read it


def _forward(params, tokens, interventions, length, *, cfg, capture, expert_impl, unroll, callbacks, attn_spec):
    TRACE_COUNT[0] += 1
    return forward(params, tokens, cfg, capture=capture, interventions=interventions, expert_impl=expert_impl,
                   unroll=unroll, callbacks=dict(callbacks), attn_spec=attn_spec, length=length)


forward_jit = jax.jit(_forward, static_argnames=("cfg", "capture", "expert_impl", "unroll", "callbacks",
                                                 "attn_spec"))


def _forward_many(params, tokens, stacked, *, cfg, capture, expert_impl):
    TRACE_COUNT[0] += 1
    fn = lambda iv: forward(params, tokens, cfg, capture=capture, interventions=iv, expert_impl=expert_impl)
    return jax.vmap(fn)(stacked)


forward_many_jit = jax.jit(_forward_many, static_argnames=("cfg", "capture", "expert_impl"))


def bucket_length(t: int, max_len: int) -> int:
    """Smallest bucket >= t: 16, 32, 64, 128, 256, then multiples of 256; capped at max_len."""
    b = 16
    while b < t:
        b = b * 2 if b < 256 else b + 256
    return max(t, min(b, max_len))


def trim_seq(name: str, value, t: int):
    """Cut a captured array back to the first t positions along its seq/kv_seq axes."""
    axes = REGISTRY[name].axes
    index = tuple(slice(0, t) if a in ("seq", "kv_seq") else slice(None) for a in axes)
    return value[index]


def pad_seq(name: str, value, width: int):
    """Zero-pad a patch value along its seq/kv_seq axes to ``width`` (the padded part is never applied)."""
    axes = REGISTRY[name].axes
    value = jnp.asarray(value)
    return jnp.pad(value, [(0, width - value.shape[i]) if a in ("seq", "kv_seq") else (0, 0)
                           for i, a in enumerate(axes)])


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
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(arr == bad)[0])
        raise ValueError(f"token id {bad} at position {where} is outside the vocabulary [0, {cfg.vocab_size})")
    return arr.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Run:
    """The result of :meth:`Model.run`."""

    tokens: np.ndarray          # [batch, seq] int32
    logits: jax.Array           # [batch, seq, vocab]
    cache: ActivationCache
    model: "Model"

    @property
    def real(self) -> np.ndarray:
        """[batch, seq] bool: not padding."""
        return self.tokens > self.model.cfg.pad_token

    def str_tokens(self, row: int = 0) -> list[str]:
        tok = self.model.tokenizer
        ids = self.tokens[row].tolist()
        return [tok.id_to_piece(i) for i in ids] if tok is not None else [str(i) for i in ids]

    def __repr__(self):
        return f"Run(tokens={list(self.tokens.shape)}, logits={list(self.logits.shape)}, cache={self.cache!r})"


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
            bucket: bool | None = None) -> Run:
        """Forward pass. ``capture``: hook names or globs; ``interventions``: data (no recompile when only
        values change); ``callbacks``: {hook: fn(value, layer) -> value} (static: recompiles);
        ``top_k``: route to a different number of experts (static: recompiles); ``attention``: an
        :class:`~grokviz.hooks.AttentionSpec` limiting attention maps to some layers/heads (static);
        ``bucket``: right-pad the sequence with pad tokens to a bucketed length (16, 32, ..., 256, then multiples
        of 256) so prompts of similar lengths share one compiled program; results are trimmed back. Right
        padding never changes real positions (causal attention, pad keys masked, padding excluded from expert
        load) beyond fp32 rounding of the different shapes. Default: the model's ``bucket`` (True). Runs with
        patches are never bucketed."""
        tokens = self.to_tokens(tokens_or_text)
        cfg = self.cfg if top_k is None else self.cfg.replace(top_k=top_k)
        if interventions is not None:
            check_interventions(interventions, cfg, tokens.shape)
        if callbacks:
            select(list(callbacks))  # validate names
        capture = select(capture)
        t = tokens.shape[1]
        attention = attention or AttentionSpec()
        check_attention_spec(attention, cfg, t)
        if "blocks.attn.pattern_at" in capture:  # negative query positions count from the true end
            attention = dataclasses.replace(attention, queries=tuple(q % t for q in attention.queries))
        bucket = self.bucket if bucket is None else bucket
        padded = tokens
        if bucket:
            width = bucket_length(t, cfg.sequence_len)
            padded = np.pad(tokens, ((0, 0), (0, width - t)), constant_values=cfg.pad_token)
            if interventions is not None and interventions.patches and width != t:
                interventions = dataclasses.replace(interventions, patches={
                    k: (pad_seq(k, v, width), jnp.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, width - t)]))
                    for k, (v, m) in interventions.patches.items()})
        length = jnp.int32(t) if bucket else None  # always given when bucketing, so the pytree never changes
        out = forward_jit(self.params, jnp.asarray(padded), interventions, length, cfg=cfg, capture=capture,
                          expert_impl=expert_impl, unroll=unroll,
                          callbacks=tuple(sorted((callbacks or {}).items())), attn_spec=attention)
        logits, values = out.logits, out.cache
        if padded.shape[1] != t:
            logits = logits[:, :t]
            values = {k: trim_seq(k, v, t) for k, v in values.items()}
        cache = ActivationCache(values, cache_layout(capture, cfg, attention))
        return Run(tokens=tokens, logits=logits, cache=cache, model=self)

    def run_many(self, tokens_or_text, interventions, *, capture=None, expert_impl="sparse"):
        """Many interventions in one vmapped call. ``interventions``: a list, or an already stacked
        Interventions (leading axis = variant). Returns (logits [variant, batch, seq, vocab], cache dict of
        [variant, ...] arrays)."""
        from .interventions import stack

        tokens = self.to_tokens(tokens_or_text)
        stacked = stack(list(interventions)) if isinstance(interventions, (list, tuple)) else interventions
        check_interventions(jax.tree_util.tree_map(lambda a: a[0], stacked), self.cfg, tokens.shape)
        out = forward_many_jit(self.params, jnp.asarray(tokens), stacked, cfg=self.cfg, capture=select(capture),
                               expert_impl=expert_impl)
        return out.logits, ActivationCache(out.cache)


def check_attention_spec(spec: AttentionSpec, cfg: GrokConfig, seq: int) -> None:
    for name, values, n in (("layers", spec.layers, cfg.num_layers), ("heads", spec.heads, cfg.num_q_heads),
                            ("queries", spec.queries, seq)):
        for v in values or ():
            if not -n <= v < n:
                raise ValueError(f"AttentionSpec.{name} contains {v}, outside [-{n}, {n})")


def check_interventions(iv: Interventions, cfg: GrokConfig, token_shape) -> None:
    L, E, H = cfg.num_layers, cfg.num_experts, cfg.num_q_heads
    expected = {"expert_remove": (L, E), "expert_scale": (L, E), "head_scale": (L, H), "router_bias": (L, E),
                "router_temperature": (L,), "renormalize": (L,)}
    for name, shape in expected.items():
        got = tuple(np.shape(getattr(iv, name)))
        if got != shape:
            raise ValueError(f"interventions.{name} has shape {got}, but the model needs {shape}")
    for name, (value, mask) in iv.patches.items():
        bt = tuple(mask.shape[-2:])
        if bt != tuple(token_shape):
            raise ValueError(f"patch for {name} covers [batch, seq] = {list(bt)} but the tokens are "
                             f"{list(token_shape)}")

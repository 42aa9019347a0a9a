"""The hook registry: every capture point's name, axes, dtype, cost and meaning, declared once; and the one
contract of what capturing, patching and calling back at a hook do.

Names follow the project's conventions: ``blocks.*`` hooks live inside the scanned block and come out with a
leading ``layer`` axis; top-level hooks have none. Selections are validated globs; unknown names raise a
``KeyError`` that lists the closest registered names.

**The capture contract** (implemented by :class:`Point`; every forward path goes through it):

* *Where.* The model calls ``point(name, value)`` once per hook per layer, in data-flow order (embed.out;
  then per layer resid_pre, the attention hooks, resid_mid, the MoE hooks, resid_post; then final_norm.out
  and unembed.logits). ``value`` is one layer's activation: the hook's axes
  without ``layer`` (e.g. ``[batch, seq, d_model]``), in the hook's registered dtype (float32 activations,
  int32 indices and counts).
* *Order at one hook.* First the **patch** (``Interventions.patch``): ``where(mask, patch_value, value)``
  with the mask ``[batch, seq]`` of this layer broadcast over the other axes and the patch value cast to the
  value's dtype. Then the **callback** ``fn(value, layer) -> value``, which sees the patched value and must
  return an array of the same shape and dtype (else ``ValueError``). Then **capture**: the value after patch
  and callback is recorded. Whatever comes out flows on into the rest of the model.
* *Layers.* For ``blocks.*`` hooks, ``layer`` is the layer number as a traced int32 scalar (use it with
  ``jnp``/``lax``, not Python ``if``); for top-level hooks it is None. Callbacks are Python functions called
  while tracing, exactly once per trace of the scanned block (``lax.scan``: once for all layers; ``unroll``:
  once per layer); they are static, so changing them recompiles. Captured ``blocks.*`` values are stacked
  over the layers run into a leading ``layer`` axis.
* *Computed on demand.* Some hooks are only computed when captured, patched or called back
  (:meth:`Point.wants`, :meth:`Point.patched`): the attention maps and their summaries, ``moe.expert_load``,
  ``moe.expert_outputs_all`` (captured only, it leaves the logits bit for bit unchanged).
  The queries and keys are captured from a copy of the computation (equal to fp32 rounding), so that capture
  leaves the logits bit for bit unchanged; a patch or callback on them acts on the main computation.
* *Attention maps of some layers/heads* (:class:`AttentionSpec`): ``attn.logits``/``scores``/``pattern`` are
  then stacked over the selected layers only, with the selected heads only; the run's ``layout`` (and
  :class:`grokviz.cache.ActivationCache`) say which. Patches and callbacks on them still see every layer and
  head.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Iterable

from .axes import AXES


@dataclasses.dataclass(frozen=True)
class Hook:
    name: str
    axes: tuple[str, ...]
    dtype: str
    cost: str  # "cheap" or "heavy"
    doc: str

    @property
    def per_layer(self) -> bool:
        return self.name.startswith("blocks.")


_B = ("layer", "batch", "seq")
_HOOKS = [
    Hook("embed.out", ("batch", "seq", "d_model"), "float32", "cheap",
         "token embeddings times the embedding multiplier (sqrt 6144 for Grok-1); the residual stream into layer 0"),
    Hook("blocks.resid_pre", _B + ("d_model",), "float32", "cheap", "residual stream entering the block"),
    Hook("blocks.attn.pre_norm", _B + ("d_model",), "float32", "cheap", "attention input, rms_norm(resid_pre)"),
    Hook("blocks.attn.q", _B + ("head", "head_dim"), "float32", "heavy", "queries after RoPE"),
    Hook("blocks.attn.k", _B + ("kv_head", "head_dim"), "float32", "heavy", "keys after RoPE"),
    Hook("blocks.attn.v", _B + ("kv_head", "head_dim"), "float32", "heavy", "values"),
    Hook("blocks.attn.logits", ("layer", "batch", "head", "seq", "kv_seq"), "float32", "heavy",
         "q.k times the logit multiplier, before the soft-cap (Grok: 30*tanh; none in the HF families)"),
    Hook("blocks.attn.scores", ("layer", "batch", "head", "seq", "kv_seq"), "float32", "heavy",
         "soft-capped attention logits, before masking"),
    Hook("blocks.attn.pattern", ("layer", "batch", "head", "seq", "kv_seq"), "float32", "heavy",
         "attention probabilities (softmax over keys, fp32; with sinks, gpt-oss, the sink's weight is dropped)"),
    Hook("blocks.attn.entropy", ("layer", "batch", "head", "seq"), "float32", "cheap",
         "entropy (nats) of each query's attention distribution; a reduced summary of the pattern"),
    Hook("blocks.attn.pattern_at", ("layer", "batch", "head", "query", "kv_seq"), "float32", "cheap",
         "attention of the chosen query positions only (AttentionSpec.queries)"),
    Hook("blocks.attn.top_keys", ("layer", "batch", "head", "seq", "rank"), "int32", "cheap",
         "the most attended key positions of each query (AttentionSpec.top_keys of them)"),
    Hook("blocks.attn.top_key_weights", ("layer", "batch", "head", "seq", "rank"), "float32", "cheap",
         "attention weights of blocks.attn.top_keys"),
    Hook("blocks.attn.head_out", _B + ("head", "head_dim"), "float32", "heavy",
         "per-head attention output (pattern @ v) before the output projection"),
    Hook("blocks.attn.out", _B + ("d_model",), "float32", "cheap", "attention output projection, before the post-norm"),
    Hook("blocks.attn.post_norm", _B + ("d_model",), "float32", "cheap",
         "the attention write into the residual stream (Grok: post-norm; pre-norm families: attn.out times the "
         "residual multiplier)"),
    Hook("blocks.resid_mid", _B + ("d_model",), "float32", "cheap", "residual stream after attention"),
    Hook("blocks.moe.pre_norm", _B + ("d_model",), "float32", "cheap",
         "router and expert (or dense MLP) input, rms_norm(resid_mid)"),
    Hook("blocks.moe.router_logits", _B + ("expert",), "float32", "cheap",
         "raw router logits x @ W_router (+ the router bias where the family has one: gpt-oss), fp32; never "
         "probabilities"),
    Hook("blocks.moe.router_probs", _B + ("expert",), "float32", "cheap",
         "softmax of the router logits over all experts (fp32): the family's full routing distribution (for "
         "top-k-then-softmax families, Granite and gpt-oss, its top-k renormalised equals the gates)"),
    Hook("blocks.moe.top_k_experts", _B + ("k",), "int32", "cheap",
         "selected experts, in descending router score (under an expert swap: the experts that run)"),
    Hook("blocks.moe.top_k_weights", _B + ("k",), "float32", "cheap",
         "the gates actually applied to the selected experts: Grok-1, OLMoE, Qwen1.5-MoE: router probabilities, "
         "not renormalised; Mixtral, Qwen3-MoE: renormalised to sum to 1; Granite, gpt-oss: softmax over the k "
         "selected logits"),
    Hook("blocks.moe.expert_load", ("layer", "expert"), "int32", "cheap",
         "tokens routed to each expert (all k slots), padding excluded"),
    Hook("blocks.moe.expert_out", _B + ("k", "d_model"), "float32", "heavy", "per-slot expert outputs before gating"),
    Hook("blocks.moe.expert_outputs_all", _B + ("expert", "d_model"), "float32", "heavy",
         "counterfactual expert outputs: what every expert, selected or not, would output for the token (before "
         "gating); computed only when captured, patched or called back (E experts' work per token)"),
    Hook("blocks.moe.shared_out", _B + ("d_model",), "float32", "heavy",
         "the shared expert's output before its sigmoid gate (Qwen1.5-MoE; absent in other families)"),
    Hook("blocks.moe.shared_gate", _B, "float32", "cheap",
         "sigmoid(x . w_shared_gate): the shared expert's gate per token (Qwen1.5-MoE)"),
    Hook("blocks.moe.out", _B + ("d_model",), "float32", "cheap",
         "gate-weighted sum of expert outputs (+ the gated shared expert), before the post-norm; at a dense-MLP "
         "layer, the MLP's output"),
    Hook("blocks.moe.post_norm", _B + ("d_model",), "float32", "cheap",
         "the MoE (or dense MLP) write into the residual stream: post-norm for Grok, the output itself (times the "
         "residual multiplier, Granite) for pre-norm families"),
    Hook("blocks.resid_post", _B + ("d_model",), "float32", "cheap", "residual stream leaving the block"),
    Hook("final_norm.out", ("batch", "seq", "d_model"), "float32", "cheap",
         "final rms_norm output, before unembedding"),
    Hook("unembed.logits", ("batch", "seq", "vocab"), "float32", "heavy", "logits after the output multiplier"),
]
REGISTRY: dict[str, Hook] = {h.name: h for h in _HOOKS}
assert len(REGISTRY) == len(_HOOKS), "hook names must be unique"
assert all(a in AXES for h in _HOOKS for a in h.axes), "hook axes must come from axes.AXES"

ATTENTION_MAPS = ("blocks.attn.logits", "blocks.attn.scores", "blocks.attn.pattern")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Scale-aware attention capture (static: changing it recompiles).

    ``layers``/``heads``: capture the full ``[seq, kv_seq]`` maps (logits, scores, pattern) only for these
    layers and query heads — memory is ``len(layers) x len(heads) x seq^2`` instead of ``L x H x seq^2``;
    the other attention hooks keep all layers. ``queries``: the query positions of ``blocks.attn.pattern_at``.
    ``top_keys``: how many keys ``blocks.attn.top_keys`` keeps per query.
    """

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    queries: tuple[int, ...] = (-1,)
    top_keys: int = 4

    def __post_init__(self):
        for f in ("layers", "heads", "queries"):
            v = getattr(self, f)
            if v is not None:
                object.__setattr__(self, f, tuple(int(i) for i in v))
        if self.top_keys < 1:
            raise ValueError("AttentionSpec.top_keys must be >= 1")


#: hooks recorded only at MoE layers (see grokviz.model.transformer: stacked over the MoE layers)
ROUTING_HOOKS = ("blocks.moe.router_logits", "blocks.moe.router_probs", "blocks.moe.top_k_experts",
                 "blocks.moe.top_k_weights", "blocks.moe.expert_load")


def suggest(name: str, n: int = 3) -> list[str]:
    """Registered names closest to ``name``."""
    names = list(REGISTRY)
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.4)
    if not close:  # fall back to a match on the last component
        tail = name.rsplit(".", 1)[-1]
        close = [k for k in names if k.rsplit(".", 1)[-1].startswith(tail[:4])][:n]
    return close


def unknown_hook_error(name: str) -> KeyError:
    close = suggest(name)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return KeyError(f"Unknown hook name {name!r}.{hint} (see grokviz.hooks.REGISTRY for all names)")


def select(patterns: Iterable[str] | str | None) -> frozenset[str]:
    """Expand names and globs (``"blocks.moe.*"``, ``"*"``) into a frozenset of registered names."""
    if patterns is None:
        return frozenset()
    if isinstance(patterns, str):
        patterns = [patterns]
    out: set[str] = set()
    for pat in patterns:
        if any(c in pat for c in "*?["):
            hits = fnmatch.filter(REGISTRY, pat)
            if not hits:
                raise unknown_hook_error(pat)
            out.update(hits)
        elif pat in REGISTRY:
            out.add(pat)
        else:
            raise unknown_hook_error(pat)
    return frozenset(out)


class Point:
    """The capture/patch/callback point used inside traced model code (the contract is in the module docstring).

    ``point(name, value)``: patch, then callback, then capture, and return the value that flows on. Names are
    given without the prefix (``"attn.q"`` inside a block is ``"blocks.attn.q"``). ``selected``: the full names
    to capture; ``patches``: {full name: (value, mask [batch, seq])} for this layer; ``callbacks``: {full name:
    fn(value, layer) -> value}; ``layer``: this layer's number (None outside the blocks).
    """

    def __init__(self, selected=frozenset(), prefix="", patches=None, callbacks=None, layer=None, targets=None):
        self.selected = selected
        self.prefix = prefix
        self.patches = patches or {}
        self.callbacks = callbacks or {}
        self.layer = layer
        self.targets = targets or {}  # {full name: (buffer [layers, ...], slot)}: see target()
        self.values: dict = {}

    def target(self, name: str):
        """(buffer, slot) when the run keeps ``name`` of every layer in one buffer that the layer may write into
        in place (then it records the updated buffer with :meth:`wrote`), else None."""
        return self.targets.get(self.prefix + name)

    def wrote(self, name: str, buffer):
        """Record the whole buffer of :meth:`target`, with this layer's value written into its slot."""
        self.values[self.prefix + name] = buffer

    def wants(self, name: str) -> bool:
        full = self.prefix + name
        return full in self.selected or full in self.callbacks

    def patched(self, name: str) -> bool:
        full = self.prefix + name
        return full in self.patches or full in self.callbacks

    def __call__(self, name: str, value):
        full = self.prefix + name
        if full not in REGISTRY:
            raise unknown_hook_error(full)
        if full in self.patches:
            value = apply_patch(REGISTRY[full], value, *self.patches[full])
        if full in self.callbacks:
            value = _checked_callback(full, self.callbacks[full], value, self.layer)
        if full in self.selected:
            self.values[full] = value
        return value


def _checked_callback(name, fn, value, layer):
    out = fn(value, layer)
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != value.shape or dtype != value.dtype:
        got = f"{dtype}{list(shape)}" if shape is not None else type(out).__name__
        raise ValueError(f"callback for {name} returned {got}; it must return an array like its input, "
                         f"{value.dtype}{list(value.shape)}")
    return out


def apply_patch(hook: Hook, value, patch_value, mask):
    """Replace ``value`` by ``patch_value`` where ``mask`` [batch, seq] is set (broadcast over other axes)."""
    import jax.numpy as jnp

    axes = [a for a in hook.axes if a != "layer"]
    shape = [1] * len(axes)
    if "batch" in axes:
        shape[axes.index("batch")] = mask.shape[0]
    if "seq" in axes:
        shape[axes.index("seq")] = mask.shape[1]
    return jnp.where(mask.reshape(shape), patch_value.astype(value.dtype), value)


def table() -> str:
    """Markdown table of the registry (for docs)."""
    rows = ["| name | axes | dtype | cost | meaning |", "|---|---|---|---|---|"]
    for h in _HOOKS:
        rows.append(f"| `{h.name}` | {' '.join(h.axes)} | {h.dtype} | {h.cost} | {h.doc} |")
    return "\n".join(rows)

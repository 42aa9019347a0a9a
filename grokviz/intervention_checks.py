"""Host-side checks of :class:`grokviz.interventions.Interventions`: indices, values, patch shapes and masks,
dense-layer edits. :func:`check_fields` is behind :func:`grokviz.interventions.check_interventions` (called by
:meth:`grokviz.Model.run` before every run); the editing methods call the index and value checks. Every failure is
a ``ValueError`` naming the intervention (or the method called) and the bound, never an error deep in XLA. Traced
values (inside ``jit``/``grad``) skip the value checks, never the shape checks."""

from __future__ import annotations

import jax
import numpy as np

from .config import GrokConfig
from .hooks import REGISTRY, unknown_hook_error

_INDEX_NAMES = {"expert_remove": ("layer", "expert"), "expert_scale": ("layer", "expert"),
                "head_scale": ("layer", "head"), "router_bias": ("layer", "expert"),
                "router_temperature": ("layer",), "renormalize": ("layer",), "expert_swap": ("layer", "expert")}
_BOOL_FIELDS = ("expert_remove", "renormalize")
_INT_FIELDS = ("expert_swap",)


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _host_index(idx):
    """An index as numpy understands it (lists and arrays become numpy arrays)."""
    if isinstance(idx, (slice, int, np.integer)):
        return idx
    return np.asarray(idx)


def _check_index(idx, n: int, what: str, op: str) -> None:
    """``idx`` (int, slice, int or bool array) must address entries of an axis of length ``n``."""
    if _is_tracer(idx):
        return
    bound = f"[-{n}, {n})"
    if isinstance(idx, slice):
        for end in (idx.start, idx.stop):
            if end is not None and (isinstance(end, bool) or not isinstance(end, (int, np.integer))
                                    or not -n <= end <= n):
                raise ValueError(f"{op}: {what} slice {idx} has an end outside the {n} {what}s [-{n}, {n}]")
        if idx.step == 0:
            raise ValueError(f"{op}: {what} slice step cannot be 0")
        return
    if idx is None or isinstance(idx, bool):
        raise ValueError(f"{op}: {what} must be an int, a slice or an array of ints, got {idx!r}")
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"{op}: a boolean {what} mask must have length {n}, got shape {arr.shape}")
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{op}: {what} must be an int, a slice or an array of ints, got {idx!r}")
    bad = arr[(arr < -n) | (arr >= n)]
    if bad.size:
        raise ValueError(f"{op}: {what} {int(bad.ravel()[0])} is outside the {n} {what}s {bound}")


def _check_values(field: str, value, op: str, n_experts: int | None = None) -> None:
    """Finite scales and biases; temperatures finite and > 0; swap targets in ``[0, n_experts)`` (skipped for
    traced values)."""
    if _is_tracer(value) or field in _BOOL_FIELDS:
        return
    if field in _INT_FIELDS:
        v = np.asarray(value)
        bad = v[(v < 0) | (v >= n_experts)]
        if bad.size:
            raise ValueError(f"{op}: swap target expert {int(bad.ravel()[0])} is outside the {n_experts} experts "
                             f"[0, {n_experts})")
        return
    v = np.asarray(value, np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{op}: {field} must be finite, got {v[~np.isfinite(v)].ravel()[0]}")
    if field == "router_temperature" and not np.all(v > 0):
        raise ValueError(f"{op}: router temperature must be > 0, got {v[v <= 0].ravel()[0]}")


def _check_patch(name, value, mask, op, *, n_layers, n_experts, lead: int = 0, expected=None) -> None:
    """Mask shape/dtype against the value; finite values; expert ids in range. ``expected``: the value's full
    shape for the run (without the ``lead`` axes), when known."""
    hook = REGISTRY[name]
    vshape, mshape = tuple(np.shape(value)), tuple(np.shape(mask))
    if len(vshape) != lead + len(hook.axes):
        raise ValueError(f"{op}: value has shape {vshape}; expected axes {' '.join(hook.axes)}")
    own = vshape[lead:]
    if expected is not None and own != tuple(expected):
        raise ValueError(f"{op}: value has shape {own}, but this run needs {tuple(expected)} "
                         f"(axes {' '.join(hook.axes)}); a patch must cover the hook exactly")
    bt = (own[hook.axes.index("batch")], own[hook.axes.index("seq")])
    want_mask = ((n_layers,) if hook.per_layer else ()) + bt
    if mshape[lead:] != want_mask:
        kind = "[layer, batch, seq]" if hook.per_layer else "[batch, seq]"
        raise ValueError(f"{op}: mask has shape {mshape[lead:]}, but it must be {kind} = {want_mask}")
    if np.dtype(getattr(mask, "dtype", np.asarray(mask).dtype)) != np.bool_:
        raise ValueError(f"{op}: mask must be boolean, got dtype {mask.dtype}")
    if name == "blocks.moe.top_k_experts":
        if not np.issubdtype(np.dtype(value.dtype), np.integer):
            raise ValueError(f"{op}: expert ids must be integers, got dtype {value.dtype}")
        if not _is_tracer(value):
            v = np.asarray(value)
            bad = v[(v < 0) | (v >= n_experts)]
            if bad.size:
                raise ValueError(f"{op}: expert id {int(bad.ravel()[0])} is outside the {n_experts} experts "
                                 f"[0, {n_experts})")
    elif not _is_tracer(value) and np.issubdtype(np.dtype(value.dtype), np.inexact):
        v = np.asarray(value)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{op}: the value contains non-finite entries ({v[~np.isfinite(v)].ravel()[0]})")


def _hook_shape(name, cfg: GrokConfig, token_shape, attention=None) -> tuple[int, ...]:
    b, t = token_shape
    spec = attention
    sizes = {"layer": cfg.num_layers, "batch": b, "seq": t, "kv_seq": t, "d_model": cfg.d_model,
             "head": cfg.num_q_heads, "kv_head": cfg.num_kv_heads, "head_dim": cfg.head_dim,
             "expert": cfg.num_experts, "k": cfg.top_k, "ffn": cfg.ffn_size, "vocab": cfg.vocab_size,
             "query": len(spec.queries) if spec is not None else 1, "rank": spec.top_keys if spec is not None else 4}
    return tuple(sizes[a] for a in REGISTRY[name].axes)


#: hooks that exist at MoE layers only (a patch of them at a dense-MLP layer has nothing to act on)
_MOE_ONLY_HOOKS = ("blocks.moe.router_logits", "blocks.moe.router_probs", "blocks.moe.top_k_experts",
                   "blocks.moe.top_k_weights", "blocks.moe.expert_out", "blocks.moe.shared_out",
                   "blocks.moe.shared_gate")


def _check_dense_layers(iv, cfg: GrokConfig, variants: bool) -> None:
    """Expert and router edits, and patches of MoE-only hooks, at a dense-MLP layer are errors (never ignored)."""
    dense = list(cfg.dense_layer_ids)
    if not dense:
        return
    defaults = {"expert_remove": False, "expert_scale": 1.0, "router_bias": 0.0, "router_temperature": 1.0,
                "renormalize": False, "expert_swap": np.arange(cfg.num_experts)}
    for name, neutral in defaults.items():
        value = getattr(iv, name)
        if _is_tracer(value):
            continue
        arr = np.asarray(value)
        at = arr[:, dense] if variants else arr[dense]
        if np.any(at != neutral):
            bad = dense[int(np.argwhere(at != neutral)[0][1 if variants else 0])]
            raise ValueError(f"interventions.{name} edits layer {bad}, a dense MLP layer without experts "
                             f"(MoE layers: {list(cfg.moe_layer_ids)})")
    for name, (_, mask) in iv.patches.items():
        if name in _MOE_ONLY_HOOKS and not _is_tracer(mask):
            m = np.asarray(mask)
            hit = [l for l in dense if m[(slice(None),) * int(variants) + (l,)].any()]
            if hit:
                raise ValueError(f"patch for {name} at layer {hit[0]}, a dense MLP layer without experts "
                                 f"(MoE layers: {list(cfg.moe_layer_ids)})")


def check_fields(iv, cfg: GrokConfig, token_shape, attention=None, *, variants: bool = False) -> None:
    """The checks of :func:`grokviz.interventions.check_interventions` on an ``Interventions`` ``iv`` (see there)."""
    L, E, H, k = cfg.num_layers, cfg.num_experts, cfg.num_q_heads, cfg.top_k
    expected = {"expert_remove": (L, E), "expert_scale": (L, E), "head_scale": (L, H), "router_bias": (L, E),
                "router_temperature": (L,), "renormalize": (L,), "expert_swap": (L, E)}
    lead = 1 if variants else 0
    n_var = None
    for name, shape in expected.items():
        value = getattr(iv, name)
        got = tuple(np.shape(value))
        if got[lead:] != shape or len(got) != len(shape) + lead:
            raise ValueError(f"interventions.{name} has shape {got[lead:] if variants else got}, but the model "
                             f"needs {shape}")
        if variants:
            if n_var is not None and got[0] != n_var:
                raise ValueError(f"interventions.{name} has {got[0]} variants, others have {n_var}")
            n_var = got[0]
        kind = "int32" if name in _INT_FIELDS else "boolean" if name in _BOOL_FIELDS else "float"
        dt = np.dtype(value.dtype)
        if (dt == np.bool_) != (kind == "boolean") or (kind == "int32") != np.issubdtype(dt, np.integer):
            raise ValueError(f"interventions.{name} must be {kind}, got dtype {value.dtype}")
        _check_values(name, value, f"interventions.{name}", E)
    removed = iv.expert_remove
    if not _is_tracer(removed):
        count = np.asarray(removed).sum(-1)  # [(variant,) layer]
        if np.any(count > E - k):
            where = np.argwhere(count > E - k)[0]
            layer = int(where[-1])
            raise ValueError(f"interventions remove {int(count[tuple(where)])} of {E} experts at layer {layer}"
                             f"{f' (variant {int(where[0])})' if variants else ''}, but top_k={k} needs {k} left: "
                             f"remove at most {E - k} per layer")
    _check_dense_layers(iv, cfg, variants)
    for name, pair in iv.patches.items():
        if name not in REGISTRY:
            raise unknown_hook_error(name)
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"interventions.patches[{name!r}] must be a (value, mask) pair")
        value, mask = pair
        _check_patch(name, value, mask, f"patch for {name}", n_layers=L, n_experts=E, lead=lead,
                     expected=_hook_shape(name, cfg, token_shape, attention))

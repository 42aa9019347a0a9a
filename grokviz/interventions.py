"""Interventions as data: arrays scanned alongside the params, so changing their values never recompiles.

Every field has a no-op default that reproduces the baseline bit for bit (masks False, scales 1, bias 0,
temperature 1). Build with :meth:`Interventions.none` and chain the editing methods, each returning a new
object::

    iv = (Interventions.none(cfg)
          .ablate_expert(3, 5, how="route_around")   # router skips expert 5 at layer 3; tokens take their next choice
          .ablate_expert(4, 1, how="contribution")   # expert 1's contribution x 0 at layer 4; routing unchanged
          .ablate_expert(2, 0, how="swap", to=6)     # expert 0's slots at layer 2 run expert 6, same gates
          .ablate_head(layer=0, head=2))
    model.run(tokens, interventions=iv)

Expert ablation semantics, named (:data:`ABLATIONS`; :meth:`Interventions.ablate_expert`):
  * *route_around* (``remove_expert``; the old name ``"remove"``) — top-k skips the expert, so a token that used
    it gets its next choice, and the gates of the experts selected are formed by the family's own rule
    (docs/families.md#routers): Grok-1, OLMoE and Qwen1.5-MoE keep the router probabilities (un-renormalised),
    Mixtral and Qwen3-MoE renormalise them over the survivors, Granite and gpt-oss take the softmax over the
    survivors' logits. Tokens that did not use it are untouched. A removed expert never contributes: where
    forced routing names it anyway, its slot's gate is 0.
  * *contribution* (``zero_expert``; the old name ``"zero"``) — the expert's gated output is multiplied by 0
    (any scale is allowed); routing is unchanged.
  * *swap* (``swap_expert``) — the slots that selected expert ``a`` run expert ``b`` instead, at the gate the
    router formed for ``a`` (the ``expert_swap`` [layer, expert] map, identity by default); the other slots and
    every gate are unchanged.
Patches replace a named activation at chosen layers and positions with values from another run; patching
``blocks.moe.top_k_experts`` is routing patching / forced routing (the forced experts' gates are then formed
by the family's rule, as for removal).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .config import GrokConfig
from .hooks import REGISTRY, unknown_hook_error


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Interventions:
    expert_remove: jax.Array       # [layer, expert] bool
    expert_scale: jax.Array        # [layer, expert] float32
    head_scale: jax.Array          # [layer, head] float32
    router_bias: jax.Array         # [layer, expert] float32, added to router logits
    router_temperature: jax.Array  # [layer] float32, router logits divided by it
    renormalize: jax.Array         # [layer] bool: rescale the k gates to sum to 1
    expert_swap: jax.Array         # [layer, expert] int32: a slot that picked e runs expert_swap[e] (identity)
    patches: dict = dataclasses.field(default_factory=dict)  # name -> (value, mask); see patch()

    @classmethod
    def none(cls, cfg: GrokConfig) -> Interventions:
        L, E, H = cfg.num_layers, cfg.num_experts, cfg.num_q_heads
        return cls(expert_remove=jnp.zeros((L, E), bool), expert_scale=jnp.ones((L, E), jnp.float32),
                   head_scale=jnp.ones((L, H), jnp.float32), router_bias=jnp.zeros((L, E), jnp.float32),
                   router_temperature=jnp.ones((L,), jnp.float32), renormalize=jnp.zeros((L,), bool),
                   expert_swap=jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (L, E)))

    def split(self):
        """(per-layer dict scanned with the params, patches dict)."""
        layers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "patches"}
        return layers, dict(self.patches)

    def _set(self, field, index, value, op):
        arr = getattr(self, field)
        index = index if isinstance(index, tuple) else (index,)
        for i, (idx, what) in enumerate(zip(index, _INDEX_NAMES[field])):
            _check_index(idx, arr.shape[i], what, op)
        if not any(_is_tracer(i) for i in index):
            index = tuple(_host_index(i) for i in index)
            region = np.empty(arr.shape, np.int8)[index].shape
            try:
                fits = np.broadcast_shapes(np.shape(value), region) == region
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(f"{op}: the value has shape {tuple(np.shape(value))}, which does not fit the "
                                 f"selected {tuple(region)} entries of {field}")
        _check_values(field, value, op, arr.shape[-1])
        out = arr.at[index].set(value)
        if field == "expert_remove" and not _is_tracer(out):
            full = np.flatnonzero(np.asarray(out).all(-1))
            if full.size:
                raise ValueError(f"{op}: that removes all {arr.shape[-1]} experts at layer {int(full[0])}; at "
                                 f"least top_k experts must remain")
        return dataclasses.replace(self, **{field: out})

    # --- editing helpers (layer/expert/head may be ints, slices or index arrays; each is checked) ---
    def remove_expert(self, layer, expert):
        """Top-k skips ``expert`` at ``layer`` (tokens take their next choice)."""
        return self._remove(layer, expert, "remove_expert")

    def zero_expert(self, layer, expert, scale=0.0):
        """Multiply the expert's gated output by ``scale`` (finite; 0 = zero-ablation), routing unchanged."""
        return self._scale(layer, expert, scale, "zero_expert")

    def swap_expert(self, layer, expert, to):
        """The *swap* ablation: slots that selected ``expert`` at ``layer`` run expert ``to`` instead, at the same
        gate (routing and the other slots unchanged). ``to`` is an expert id in ``[0, num_experts)`` (or one per
        selected expert)::

            iv = gv.Interventions.none(model.cfg).swap_expert(layer=1, expert=3, to=5)
        """
        return self._swap(layer, expert, to, "swap_expert")

    # the edits behind the named methods; ``op`` is the method the user called, named in every error
    def _remove(self, layer, expert, op):
        return self._set("expert_remove", (layer, expert), True, op)

    def _scale(self, layer, expert, scale, op):
        return self._set("expert_scale", (layer, expert), jnp.asarray(scale, jnp.float32), op)

    def _swap(self, layer, expert, to, op):
        to = np.asarray(to) if not _is_tracer(to) else to
        if not _is_tracer(to) and (to.dtype == bool or not np.issubdtype(to.dtype, np.integer)):
            raise ValueError(f"{op}: the target expert must be an int id, got {to!r}")
        return self._set("expert_swap", (layer, expert), jnp.asarray(to, jnp.int32), op)

    def ablate_expert(self, layer, expert, how="contribution", to=None):
        """Ablate ``expert`` at ``layer`` by one of the three named semantics (:data:`ABLATIONS`):

        * ``"contribution"``: its gated output x 0, routing unchanged (= :meth:`zero_expert`);
        * ``"route_around"``: dropped from the top-k candidates, the next-best expert takes the slot, gates by the
          family's rule (= :meth:`remove_expert`);
        * ``"swap"``: its slots run expert ``to`` at the same gates (= :meth:`swap_expert`).

        The old names ``"zero"`` and ``"remove"`` are accepted. Example::

            iv = gv.Interventions.none(model.cfg).ablate_expert(0, 3, how="swap", to=1)
            model.run("The cat", interventions=iv)
        """
        how = ablation_name(how)
        op = f"ablate_expert(how={how!r})"
        if (to is not None) != (how == "swap"):
            raise ValueError("ablate_expert: give to= (the target expert) with how='swap', and only then")
        if how == "contribution":
            return self._scale(layer, expert, 0.0, op)
        if how == "route_around":
            return self._remove(layer, expert, op)
        return self._swap(layer, expert, to, op)

    def ablate_head(self, layer, head, scale=0.0):
        """Multiply a query head's output by ``scale`` (finite; 0 = ablation)."""
        return self._set("head_scale", (layer, head), jnp.asarray(scale, jnp.float32), "ablate_head")

    def with_router(self, layer=slice(None), *, temperature=None, bias=None, renormalize=None):
        """Router edits at ``layer``: logits ``(logits + bias) / temperature`` (temperature finite and > 0, bias
        finite, a scalar or one value per expert); ``renormalize``: gates rescaled to sum to 1."""
        out = self
        if temperature is not None:
            out = out._set("router_temperature", layer, jnp.asarray(temperature, jnp.float32), "with_router")
        if bias is not None:
            out = out._set("router_bias", layer, jnp.asarray(bias, jnp.float32), "with_router")
        if renormalize is not None:
            out = out._set("renormalize", layer, bool(renormalize), "with_router")
        return out

    def patch(self, name, value, *, layers=None, positions=None, mask=None):
        """Replace activation ``name`` with ``value`` (e.g. ``other_run.cache[name]``).

        For ``blocks.*`` hooks ``value`` is ``[layer, batch, seq, ...]`` and ``layers`` selects which layers
        are patched (default all); ``positions`` selects sequence positions (default all); or give ``mask``
        directly ([layer, batch, seq] bool for blocks hooks, [batch, seq] otherwise). The value must have the
        hook's full shape for the run it is used in (checked again by :meth:`grokviz.Model.run`), finite values,
        and for ``blocks.moe.top_k_experts`` integer expert ids in ``[0, num_experts)``.
        """
        if name not in REGISTRY:
            raise unknown_hook_error(name)
        hook = REGISTRY[name]
        op = f"patch({name!r})"
        if "seq" not in hook.axes:
            raise ValueError(f"{name} has no seq axis ({' '.join(hook.axes)}); it cannot be patched by position")
        # host values go to the device as they are (jnp.asarray would compile a copy of a strided view per shape)
        value = value if isinstance(value, jax.Array) else jax.device_put(np.ascontiguousarray(value))
        bt_axes = (hook.axes.index("batch"), hook.axes.index("seq"))
        n_layers, n_experts = self.expert_remove.shape
        want = tuple(hook.axes)
        if hook.per_layer and (value.ndim == 0 or value.shape[0] != n_layers):
            raise ValueError(f"patch for {name} must have a leading layer axis of {n_layers}, "
                             f"got shape {tuple(value.shape)} (axes {' '.join(want)})")
        if value.ndim != len(want):
            raise ValueError(f"patch for {name} has shape {tuple(value.shape)}; expected axes {' '.join(want)}")
        b, t = value.shape[bt_axes[0]], value.shape[bt_axes[1]]
        if mask is None:
            m = np.ones((b, t), bool)
            if positions is not None:
                _check_index(positions, t, "position", op)
                m[:] = False
                m[:, _host_index(positions)] = True
            if hook.per_layer:
                lm = np.zeros(n_layers, bool)
                if layers is not None:
                    _check_index(layers, n_layers, "layer", op)
                lm[slice(None) if layers is None else _host_index(layers)] = True
                m = lm[:, None, None] & m[None]
            mask = m
        elif layers is not None or positions is not None:
            raise ValueError(f"{op}: give either mask or layers/positions, not both")
        mask = mask.astype(bool) if isinstance(mask, jax.Array) else jax.device_put(np.asarray(mask, bool))
        _check_patch(name, value, mask, op, n_layers=n_layers, n_experts=n_experts)
        patches = dict(self.patches)
        patches[name] = (value, mask)
        return dataclasses.replace(self, patches=patches)

    def force_routing(self, experts, *, layers=None, positions=None):
        """Send tokens to given experts: ``experts`` [layer, batch, seq, k] integer ids in ``[0, num_experts)``
        (e.g. another run's ``blocks.moe.top_k_experts``: routing patching)."""
        experts = experts if isinstance(experts, jax.Array) else np.asarray(experts)
        if not _is_tracer(experts) and not np.issubdtype(experts.dtype, np.integer):
            raise ValueError(f"force_routing: expert ids must be integers, got dtype {experts.dtype} "
                             f"(float ids would be truncated)")
        experts = (experts.astype(jnp.int32) if isinstance(experts, jax.Array)
                   else np.ascontiguousarray(experts, np.int32))
        return self.patch("blocks.moe.top_k_experts", experts,
                          layers=layers, positions=positions)

    def __repr__(self):
        parts = []
        rm = np.argwhere(np.asarray(self.expert_remove))
        if len(rm):
            parts.append("remove " + ", ".join(f"L{l}E{e}" for l, e in rm))
        zs = np.argwhere(np.asarray(self.expert_scale) != 1)
        if len(zs):
            parts.append("scale " + ", ".join(f"L{l}E{e}" for l, e in zs))
        hs = np.argwhere(np.asarray(self.head_scale) != 1)
        if len(hs):
            parts.append("heads " + ", ".join(f"L{l}H{h}" for l, h in hs))
        if np.any(np.asarray(self.router_temperature) != 1) or np.any(np.asarray(self.router_bias) != 0):
            parts.append("router temperature/bias")
        if np.any(np.asarray(self.renormalize)):
            parts.append("renormalised gates")
        sw = np.asarray(self.expert_swap)
        moved = np.argwhere(sw != np.arange(sw.shape[-1]))
        if len(moved):
            parts.append("swap " + ", ".join(f"L{l}E{e}->E{sw[l, e]}" for l, e in moved))
        if self.patches:
            parts.append("patches " + ", ".join(self.patches))
        return f"Interventions({'; '.join(parts) or 'none'})"


def stack(ivs: list[Interventions]) -> Interventions:
    """Stack interventions on a new leading axis, for ``jax.vmap`` (see :meth:`grokviz.Model.run_many`).

    All must have the same patch names (the pytree structures must agree)."""
    if not ivs:
        raise ValueError("stack() needs at least one Interventions")
    names = [tuple(sorted(iv.patches)) for iv in ivs]
    if len(set(names)) != 1:
        raise ValueError(f"all interventions must patch the same hooks to be stacked, got {sorted(set(names))}")
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ivs)


# ----------------------------------------------------------------------------------------------- validation
_INDEX_NAMES = {"expert_remove": ("layer", "expert"), "expert_scale": ("layer", "expert"),
                "head_scale": ("layer", "head"), "router_bias": ("layer", "expert"),
                "router_temperature": ("layer",), "renormalize": ("layer",), "expert_swap": ("layer", "expert")}
_BOOL_FIELDS = ("expert_remove", "renormalize")
_INT_FIELDS = ("expert_swap",)

#: the three named expert-ablation semantics (see the module docstring), and the old names they replace
ABLATIONS = ("contribution", "route_around", "swap")
ABLATION_ALIASES = {"zero": "contribution", "remove": "route_around", "route-around": "route_around"}


def ablation_name(how) -> str:
    """The canonical ablation name for ``how`` (one of :data:`ABLATIONS` or an old alias: ``"zero"``,
    ``"remove"``); ``ValueError`` listing them otherwise."""
    name = ABLATION_ALIASES.get(how, how) if isinstance(how, str) else how
    if name not in ABLATIONS:
        raise ValueError(f"expert ablation mode must be one of {list(ABLATIONS)} (contribution: its output x 0, "
                         "routing unchanged; route_around: the next-best expert takes its slot; swap: its slots go to "
                         f"another expert at the same gate) or an old name {sorted(ABLATION_ALIASES)}, got {how!r}")
    return name


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


def _check_dense_layers(iv: Interventions, cfg: GrokConfig, variants: bool) -> None:
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


def check_interventions(iv: Interventions, cfg: GrokConfig, token_shape, attention=None, *,
                        variants: bool = False) -> None:
    """Check interventions against a model and a token batch on the host; ``ValueError`` names the field or
    patch and the bound. Shapes, dtypes, removed-expert counts (at most ``E - top_k`` per layer, so top-k
    never has to pick a removed expert), finite scales/biases, temperatures > 0, patch shapes (exact), masks,
    finite patch values and forced expert ids. ``variants``: fields have a leading variant axis (stacked).
    Value checks are skipped for traced values (inside ``jax.grad``/``jit``); shape checks never are."""
    if not isinstance(iv, Interventions):
        raise TypeError(f"interventions must be an Interventions, got {type(iv).__name__}")
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

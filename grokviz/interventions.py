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

# the host-side checks have their own module; check_interventions (and _hook_shape) stay importable from here
from .intervention_checks import (  # noqa: F401
    _INDEX_NAMES,
    _check_index,
    _check_patch,
    _check_values,
    _hook_shape,
    _host_index,
    _is_tracer,
    check_fields,
)


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


def check_interventions(iv: Interventions, cfg: GrokConfig, token_shape, attention=None, *,
                        variants: bool = False) -> None:
    """Check interventions against a model and a token batch on the host; ``ValueError`` names the field or
    patch and the bound. Shapes, dtypes, removed-expert counts (at most ``E - top_k`` per layer, so top-k
    never has to pick a removed expert), finite scales/biases, temperatures > 0, patch shapes (exact), masks,
    finite patch values and forced expert ids. ``variants``: fields have a leading variant axis (stacked).
    Value checks are skipped for traced values (inside ``jax.grad``/``jit``); shape checks never are."""
    if not isinstance(iv, Interventions):
        raise TypeError(f"interventions must be an Interventions, got {type(iv).__name__}")
    check_fields(iv, cfg, token_shape, attention, variants=variants)

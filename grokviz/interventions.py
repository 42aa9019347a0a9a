"""Interventions as data: arrays scanned alongside the params, so changing their values never recompiles.

Every field has a no-op default that reproduces the baseline bit for bit (masks False, scales 1, bias 0,
temperature 1). Build with :meth:`Interventions.none` and chain the editing methods, each returning a new
object::

    iv = (Interventions.none(cfg)
          .remove_expert(layer=3, expert=5)     # router skips expert 5 at layer 3; tokens take their next choice
          .zero_expert(layer=4, expert=1)       # expert 1's contribution x 0 at layer 4; routing unchanged
          .ablate_head(layer=0, head=2))
    model.run(tokens, interventions=iv)

Expert ablation semantics:
  * *remove* — top-k skips the expert; the other selected experts keep their gates (the router probabilities
    over all experts, Grok's un-renormalised semantics), so a token that used it gets its next choice with
    that choice's probability as gate. Tokens that did not use it are untouched.
  * *zero* — the expert's gated output is multiplied by 0 (any scale is allowed); routing is unchanged.
Patches replace a named activation at chosen layers and positions with values from another run; patching
``blocks.moe.top_k_experts`` is routing patching / forced routing (gates become the router probabilities of
the forced experts).
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
    patches: dict = dataclasses.field(default_factory=dict)  # name -> (value, mask); see patch()

    @classmethod
    def none(cls, cfg: GrokConfig) -> "Interventions":
        L, E, H = cfg.num_layers, cfg.num_experts, cfg.num_q_heads
        return cls(expert_remove=jnp.zeros((L, E), bool), expert_scale=jnp.ones((L, E), jnp.float32),
                   head_scale=jnp.ones((L, H), jnp.float32), router_bias=jnp.zeros((L, E), jnp.float32),
                   router_temperature=jnp.ones((L,), jnp.float32), renormalize=jnp.zeros((L,), bool))

    def split(self):
        """(per-layer dict scanned with the params, patches dict)."""
        layers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "patches"}
        return layers, dict(self.patches)

    def _set(self, field, index, value):
        return dataclasses.replace(self, **{field: getattr(self, field).at[index].set(value)})

    # --- editing helpers (layer/expert/head may be ints, slices or index arrays) ---
    def remove_expert(self, layer, expert):
        return self._set("expert_remove", (layer, expert), True)

    def zero_expert(self, layer, expert, scale=0.0):
        return self._set("expert_scale", (layer, expert), scale)

    def ablate_head(self, layer, head, scale=0.0):
        return self._set("head_scale", (layer, head), scale)

    def with_router(self, layer=slice(None), *, temperature=None, bias=None, renormalize=None):
        out = self
        if temperature is not None:
            out = out._set("router_temperature", layer, temperature)
        if bias is not None:
            out = out._set("router_bias", layer, jnp.asarray(bias, jnp.float32))
        if renormalize is not None:
            out = out._set("renormalize", layer, bool(renormalize))
        return out

    def patch(self, name, value, *, layers=None, positions=None, mask=None):
        """Replace activation ``name`` with ``value`` (e.g. ``other_run.cache[name]``).

        For ``blocks.*`` hooks ``value`` is ``[layer, batch, seq, ...]`` and ``layers`` selects which layers
        are patched (default all); ``positions`` selects sequence positions (default all); or give ``mask``
        directly ([layer, batch, seq] bool for blocks hooks, [batch, seq] otherwise).
        """
        if name not in REGISTRY:
            raise unknown_hook_error(name)
        hook = REGISTRY[name]
        if "seq" not in hook.axes:
            raise ValueError(f"{name} has no seq axis ({' '.join(hook.axes)}); it cannot be patched by position")
        value = jnp.asarray(value)
        bt_axes = (hook.axes.index("batch"), hook.axes.index("seq"))
        n_layers = self.expert_remove.shape[0]
        want = tuple(hook.axes)
        if hook.per_layer and value.shape[0] != n_layers:
            raise ValueError(f"patch for {name} must have a leading layer axis of {n_layers}, "
                             f"got shape {tuple(value.shape)} (axes {' '.join(want)})")
        if value.ndim != len(want):
            raise ValueError(f"patch for {name} has shape {tuple(value.shape)}; expected axes {' '.join(want)}")
        b, t = value.shape[bt_axes[0]], value.shape[bt_axes[1]]
        if mask is None:
            m = np.ones((b, t), bool)
            if positions is not None:
                m[:] = False
                m[:, positions] = True
            if hook.per_layer:
                lm = np.zeros(n_layers, bool)
                lm[slice(None) if layers is None else layers] = True
                m = lm[:, None, None] & m[None]
            mask = m
        mask = jnp.asarray(mask, bool)
        patches = dict(self.patches)
        patches[name] = (value, mask)
        return dataclasses.replace(self, patches=patches)

    def force_routing(self, experts, *, layers=None, positions=None):
        """Send tokens to given experts: ``experts`` [layer, batch, seq, k] int (e.g. another run's
        ``blocks.moe.top_k_experts``: routing patching)."""
        return self.patch("blocks.moe.top_k_experts", jnp.asarray(experts, jnp.int32),
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

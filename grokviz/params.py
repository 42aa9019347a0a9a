"""Parameter pytree: a dict with top-level leaves and per-layer leaves stacked on a leading ``layer`` axis.

::

    {"embed":      [vocab, d_model]                   tied input embedding / output unembedding
     "final_norm": [d_model]
     "blocks": {
        "attn_pre_norm", "attn_post_norm", "moe_pre_norm", "moe_post_norm": [layer, d_model]
        "w_q": [layer, d_model, head*head_dim]   "w_k", "w_v": [layer, d_model, kv_head*head_dim]
        "w_o": [layer, head*head_dim, d_model]   "router": [layer, d_model, expert]
        "w_gate", "w_up": [layer, expert, d_model, ffn]   (GELU goes on w_gate; release: linear, linear_v)
        "w_down": [layer, expert, ffn, d_model]           (release: linear_1)
     }}

A matrix leaf may be an :class:`Int8Weight` (int8 values with per-block scales), dequantised inside the matmul.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .config import GrokConfig

NORMS = ("attn_pre_norm", "attn_post_norm", "moe_pre_norm", "moe_post_norm")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An int8 matrix with scales per output column and per block of input rows (release format:
    docs/grok1.md#checkpoint).

    ``weight``: int8 ``[..., in, out]``; ``scales``: ``[..., nb, out]`` (bf16 in the release).
    ``W[..., r, c] = f32(weight[..., r, c]) * f32(scales[..., r // (in // nb), c])`` — exact in fp32.
    """

    weight: jax.Array
    scales: jax.Array

    @property
    def shape(self):
        return self.weight.shape

    @property
    def dtype(self):
        return jnp.float32

    def dequantize(self, dtype=jnp.float32):
        w = self.weight
        nb = self.scales.shape[-2]
        rows = w.shape[-2]
        blocked = w.reshape(*w.shape[:-2], nb, rows // nb, w.shape[-1]).astype(jnp.float32)
        s = self.scales.astype(jnp.float32)[..., :, None, :]
        return (blocked * s).reshape(w.shape).astype(dtype)


def dense(w, dtype=jnp.float32):
    """The float value of a weight leaf (plain array or :class:`Int8Weight`)."""
    if isinstance(w, Int8Weight):
        return w.dequantize(dtype)
    return w.astype(dtype)


def norm_names(cfg: GrokConfig) -> tuple[str, ...]:
    """The per-layer norm leaves: Grok's four sandwich norms, or the pre-norm pair."""
    return NORMS if cfg.sandwich else ("attn_pre_norm", "moe_pre_norm")


def shapes_dict(cfg: GrokConfig) -> dict:
    """Logical shape of every leaf (as tuples), the single source for init, loading and validation.

    Leaves a family does not use are absent (biases, QK norms, sinks, shared expert, dense MLP, ``unembed``).
    Per-layer leaves lead with the layer axis; the MoE leaves' leading axis counts the MoE layers only and the
    dense MLP leaves' the dense layers only (both equal ``num_layers`` when every layer is of that kind)."""
    L, D, E, F = cfg.num_layers, cfg.d_model, cfg.num_experts, cfg.ffn_size
    Lm, Ld = len(cfg.moe_layer_ids), len(cfg.dense_layer_ids)
    blocks = {n: (L, D) for n in norm_names(cfg)}
    blocks.update(w_q=(L, D, cfg.q_width), w_k=(L, D, cfg.kv_width), w_v=(L, D, cfg.kv_width),
                  w_o=(L, cfg.q_width, D))
    if cfg.qkv_bias:
        blocks.update(b_q=(L, cfg.q_width), b_k=(L, cfg.kv_width), b_v=(L, cfg.kv_width))
    if cfg.o_bias:
        blocks["b_o"] = (L, D)
    if cfg.qk_norm == "projection":
        blocks.update(q_norm=(L, cfg.q_width), k_norm=(L, cfg.kv_width))
    elif cfg.qk_norm == "head":
        blocks.update(q_norm=(L, cfg.head_dim), k_norm=(L, cfg.head_dim))
    if cfg.attn_sinks:
        blocks["sinks"] = (L, cfg.num_q_heads)
    if Lm:
        blocks.update(router=(Lm, D, E), w_gate=(Lm, E, D, F), w_up=(Lm, E, D, F), w_down=(Lm, E, F, D))
        if cfg.router_bias:
            blocks["router_b"] = (Lm, E)
        if cfg.expert_bias:
            blocks.update(b_gate=(Lm, E, F), b_up=(Lm, E, F), b_down=(Lm, E, D))
        if cfg.shared_expert_ffn:
            Fs = cfg.shared_expert_ffn
            blocks.update(s_gate=(Lm, D, Fs), s_up=(Lm, D, Fs), s_down=(Lm, Fs, D), s_router=(Lm, D))
    if Ld:
        Fd = cfg.dense_ffn
        blocks.update(mlp_gate=(Ld, D, Fd), mlp_up=(Ld, D, Fd), mlp_down=(Ld, Fd, D))
    top = {"embed": (cfg.vocab_size, D), "final_norm": (D,)}
    if not cfg.tie_embeddings:
        top["unembed"] = (cfg.vocab_size, D)
    return {**top, "blocks": blocks}


#: per-layer leaves whose leading axis counts MoE layers / dense layers (see :func:`shapes_dict`)
MOE_LEAVES = frozenset({"router", "router_b", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down",
                        "s_gate", "s_up", "s_down", "s_router"})
DENSE_LEAVES = frozenset({"mlp_gate", "mlp_up", "mlp_down"})
#: leaves initialised to 1 (norm scales) and to 0 (biases) by :func:`init_params`
ONES = frozenset(NORMS) | {"final_norm", "q_norm", "k_norm"}
ZEROS = frozenset({"b_q", "b_k", "b_v", "b_o", "router_b", "b_gate", "b_up", "b_down", "sinks"})


def init_params(cfg: GrokConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters for experiments: norm scales 1, biases and sinks 0; embeddings N(0, 1/d_model) (so that
    the x sqrt(d_model) embedding multiplier gives unit-scale activations); every matrix N(0, 1/fan_in), fan_in =
    second-to-last dim (the shared-expert gate vector ``s_router``: N(0, 1/d_model))."""
    shapes = shapes_dict(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name in ONES:
            leaves.append(jnp.ones(shape, dtype))
        elif name in ZEROS:
            leaves.append(jnp.zeros(shape, dtype))
        elif name in ("embed", "unembed"):
            leaves.append(jax.random.normal(k, shape, dtype) * (1.0 / np.sqrt(shape[-1])).item())
        else:
            fan_in = shape[-1] if name == "s_router" else shape[-2]
            leaves.append(jax.random.normal(k, shape, dtype) * (1.0 / np.sqrt(fan_in)).item())
    return jax.tree_util.tree_unflatten(treedef, leaves)


def param_shapes(cfg: GrokConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of every leaf via ``jax.eval_shape`` — nothing is allocated."""
    return jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))


def count_params(tree) -> int:
    """Number of scalar parameters (an Int8Weight counts its logical weight, not its scales)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, Int8Weight))
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in leaves))


def validate_params(params, cfg: GrokConfig) -> None:
    """Raise ValueError naming the first leaf whose presence or shape does not match ``cfg``."""
    expected = shapes_dict(cfg)

    def walk(exp, got, prefix):
        if not isinstance(got, dict):
            raise ValueError(f"params{prefix}: expected a dict with keys {sorted(exp)}, got {type(got).__name__}")
        missing = sorted(set(exp) - set(got))
        extra = sorted(set(got) - set(exp))
        if missing:
            raise ValueError(f"params{prefix} is missing {missing}")
        if extra:
            raise ValueError(f"params{prefix} has unexpected entries {extra}")
        for name, shape in exp.items():
            path = f"{prefix}[{name!r}]"
            if isinstance(shape, dict):
                walk(shape, got[name], path)
                continue
            leaf = got[name]
            if isinstance(leaf, Int8Weight):
                w, s = leaf.weight, leaf.scales
                ok = (s.ndim == w.ndim and s.shape[-1] == w.shape[-1] and s.shape[:-2] == w.shape[:-2]
                      and w.shape[-2] % s.shape[-2] == 0)
                if not ok:
                    raise ValueError(f"params{path}: int8 scales of shape {tuple(s.shape)} do not fit "
                                     f"weight of shape {tuple(w.shape)}")
            if not hasattr(leaf, "shape"):
                raise ValueError(f"params{path}: expected an array of shape {shape}, got {type(leaf).__name__}")
            if tuple(leaf.shape) != tuple(shape):
                raise ValueError(f"params{path} has shape {tuple(leaf.shape)} but config "
                                 f"{cfg.name!r} expects {tuple(shape)}")

    walk(expected, params, "")

"""The one name table between the reference's haiku parameter paths and grokviz's param pytree.

Reference paths (the release's haiku module paths) -> grokviz names (see :mod:`grokviz.params`):

================================================  =======================
``language_model/in_out_embed/embeddings``        ``embed``
``language_model/rms_norm/scale``                 ``final_norm``
``transformer/decoder_layer_{i}/rms_norm/scale``  ``blocks.attn_pre_norm[i]``
``.../rms_norm_1/scale``                          ``blocks.attn_post_norm[i]``
``.../rms_norm_2/scale``                          ``blocks.moe_pre_norm[i]``
``.../rms_norm_3/scale``                          ``blocks.moe_post_norm[i]``
``.../multi_head_attention/{query,key,value}/w``  ``blocks.w_q / w_k / w_v[i]``
``.../multi_head_attention/linear/w``             ``blocks.w_o[i]``
``.../router/w``                                  ``blocks.router[i]``
``.../moe/linear/w``                              ``blocks.w_gate[i]`` (GELU branch)
``.../moe/linear_v/w``                            ``blocks.w_up[i]``
``.../moe/linear_1/w``                            ``blocks.w_down[i]``
================================================  =======================
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..config import GrokConfig
from ..params import Int8Weight, validate_params

TOP_LEVEL = {
    "language_model/in_out_embed/embeddings": "embed",
    "language_model/rms_norm/scale": "final_norm",
}
PER_LAYER = {
    "rms_norm/scale": "attn_pre_norm",
    "rms_norm_1/scale": "attn_post_norm",
    "rms_norm_2/scale": "moe_pre_norm",
    "rms_norm_3/scale": "moe_post_norm",
    "multi_head_attention/query/w": "w_q",
    "multi_head_attention/key/w": "w_k",
    "multi_head_attention/value/w": "w_v",
    "multi_head_attention/linear/w": "w_o",
    "router/w": "router",
    "moe/linear/w": "w_gate",
    "moe/linear_v/w": "w_up",
    "moe/linear_1/w": "w_down",
}
LAYER_PREFIX = "transformer/decoder_layer_"


def reference_paths(cfg: GrokConfig) -> list[tuple[str, str, int | None]]:
    """Every reference path with its grokviz (name, layer), in the release's file order (docs/grok1.md#checkpoint).

    JAX flattens the haiku dict with keys sorted *as strings*, so layers come in lexicographic order
    (0, 1, 10, 11, ..., 2, 20, ...). File ``tensor{i:05d}`` holds entry i of this list.
    """
    out = [(path, name, None) for path, name in sorted(TOP_LEVEL.items())]
    layers = sorted(range(cfg.num_layers), key=str)
    for i in layers:
        for sub in sorted(PER_LAYER):
            out.append((f"{LAYER_PREFIX}{i}/{sub}", PER_LAYER[sub], i))
    return out


def parse_reference_path(path: str) -> tuple[str, int | None]:
    """(grokviz name, layer) of a reference path; ValueError for a path with no mapping."""
    path = path.removeprefix("params/")
    if path in TOP_LEVEL:
        return TOP_LEVEL[path], None
    if path.startswith(LAYER_PREFIX):
        num, _, sub = path[len(LAYER_PREFIX):].partition("/")
        if num.isdigit() and sub in PER_LAYER:
            return PER_LAYER[sub], int(num)
    raise ValueError(f"reference parameter path {path!r} has no mapping in grokviz.checkpoint "
                     f"(known: {', '.join(TOP_LEVEL)} and {LAYER_PREFIX}<i>/{{{', '.join(PER_LAYER)}}})")


def stack_layers(per_layer: dict, cfg: GrokConfig, top: dict) -> dict:
    """{(name, layer): leaf} + top-level -> our param pytree; reports missing (name, layer) pairs."""
    blocks = {}
    for name in PER_LAYER.values():
        missing = [i for i in range(cfg.num_layers) if (name, i) not in per_layer]
        if missing:
            raise ValueError(f"parameter {name!r} is missing for layers {missing}")
        leaves = [per_layer[(name, i)] for i in range(cfg.num_layers)]
        if isinstance(leaves[0], Int8Weight):
            blocks[name] = Int8Weight(weight=jnp.stack([l.weight for l in leaves]),
                                      scales=jnp.stack([l.scales for l in leaves]))
        else:
            blocks[name] = jnp.stack([jnp.asarray(l) for l in leaves])
    for name in TOP_LEVEL.values():
        if name not in top:
            raise ValueError(f"parameter {name!r} is missing")
    return {"embed": jnp.asarray(top["embed"]), "final_norm": jnp.asarray(top["final_norm"]), "blocks": blocks}


def params_from_reference(flat: dict, cfg: GrokConfig) -> dict:
    """{reference haiku path (optionally prefixed 'params/'): array} -> grokviz params, validated against cfg."""
    per_layer, top = {}, {}
    for path, value in flat.items():
        name, layer = parse_reference_path(path)
        if layer is None:
            top[name] = np.asarray(value)
        else:
            if layer >= cfg.num_layers:
                raise ValueError(f"{path}: layer {layer} but the config has {cfg.num_layers} layers")
            per_layer[(name, layer)] = value if isinstance(value, Int8Weight) else np.asarray(value)
    params = stack_layers(per_layer, cfg, top)
    validate_params(params, cfg)
    return params


def params_to_reference(params: dict, cfg: GrokConfig) -> dict:
    """The inverse: grokviz params -> {reference path: array} (Int8Weight leaves stay Int8Weight)."""
    out = {}
    for path, name, layer in reference_paths(cfg):
        if layer is None:
            out[path] = params[name]
        else:
            leaf = params["blocks"][name]
            out[path] = (Int8Weight(leaf.weight[layer], leaf.scales[layer]) if isinstance(leaf, Int8Weight)
                         else leaf[layer])
    return out

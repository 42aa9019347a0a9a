"""One name table per Hugging Face MoE family: each checkpoint tensor -> grokviz leaves, layer, expert, transform.

A table row is ``(template, ((leaf, op), ...))``. The template is the tensor's name in the checkpoint with ``{layer}``
and ``{expert}`` placeholders; each ``(leaf, op)`` says which grokviz leaf (see :func:`grokviz.params.shapes_dict`)
receives ``op(tensor)``. A row applies to a config when all its leaves exist for it (biases only with biases, the
untied head only when untied, the dense MLP only at dense layers, ...), over the layers its leaves are stacked on.

The ops (grokviz stores weights ``[in, out]``; torch's Linear stores ``[out, in]``):

* ``copy``: as stored; ``T``: swap the last two axes (a Linear weight, or a stack of them per expert);
* ``row``: ``[1, D] -> [D]`` (Qwen2-MoE's shared-expert gate, a Linear with one output);
* ``half0T`` / ``half1T``: granite's fused ``input_linear`` ``[E, 2F, D]``: the first F rows are the gate, the next
  F the up projection; each half transposed to ``[E, D, F]``;
* ``even`` / ``odd``: gpt-oss's fused ``gate_up_proj`` ``[E, D, 2F]`` (and its bias ``[E, 2F]``) interleaves gate and
  up along the last axis: gate = columns 0, 2, 4, ..., up = columns 1, 3, 5, ...

Per-expert rows (``{expert}`` in the template) give one expert's tensor; the loader stacks them on the expert axis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import numpy as np

from ..config import GrokConfig
from ..params import DENSE_LEAVES, MOE_LEAVES, shapes_dict

#: op -> (transform of the stored array, the stored shape that gives a leaf of the given shape)
OPS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda a: a, lambda s: s),
    "T": (lambda a: np.swapaxes(a, -1, -2), lambda s: (*s[:-2], s[-1], s[-2])),
    "row": (lambda a: a[0], lambda s: (1, *s)),
    "half0T": (lambda a: np.swapaxes(a[..., : a.shape[-2] // 2, :], -1, -2), lambda s: (*s[:-2], 2 * s[-1], s[-2])),
    "half1T": (lambda a: np.swapaxes(a[..., a.shape[-2] // 2:, :], -1, -2), lambda s: (*s[:-2], 2 * s[-1], s[-2])),
    "even": (lambda a: a[..., 0::2], lambda s: (*s[:-1], 2 * s[-1])),
    "odd": (lambda a: a[..., 1::2], lambda s: (*s[:-1], 2 * s[-1])),
}

_L = "model.layers.{layer}."
_TOP = [("model.embed_tokens.weight", (("embed", "copy"),)),
        ("model.norm.weight", (("final_norm", "copy"),)),
        ("lm_head.weight", (("unembed", "copy"),)),
        (_L + "input_layernorm.weight", (("attn_pre_norm", "copy"),)),
        (_L + "post_attention_layernorm.weight", (("moe_pre_norm", "copy"),))]
_ATTN = [(_L + f"self_attn.{p}_proj.weight", ((f"w_{p}", "T"),)) for p in "qkvo"]
_ATTN += [(_L + f"self_attn.{p}_proj.bias", ((f"b_{p}", "copy"),)) for p in "qkvo"]
_ATTN += [(_L + f"self_attn.{p}_norm.weight", ((f"{p}_norm", "copy"),)) for p in "qk"]


def _experts(prefix: str, gate: str, up: str, down: str) -> list:
    e = _L + prefix + "experts.{expert}."
    return [(e + f"{gate}.weight", (("w_gate", "T"),)), (e + f"{up}.weight", (("w_up", "T"),)),
            (e + f"{down}.weight", (("w_down", "T"),))]


_QWEN = _experts("mlp.", "gate_proj", "up_proj", "down_proj") + [
    (_L + "mlp.gate.weight", (("router", "T"),)),
    (_L + "mlp.gate_proj.weight", (("mlp_gate", "T"),)),
    (_L + "mlp.up_proj.weight", (("mlp_up", "T"),)),
    (_L + "mlp.down_proj.weight", (("mlp_down", "T"),)),
]

TABLES: dict[str, list] = {
    "mixtral": _TOP + _ATTN + _experts("block_sparse_moe.", "w1", "w3", "w2") + [
        (_L + "block_sparse_moe.gate.weight", (("router", "T"),))],
    "olmoe": _TOP + _ATTN + _QWEN,
    "qwen2_moe": _TOP + _ATTN + _QWEN + [
        (_L + "mlp.shared_expert.gate_proj.weight", (("s_gate", "T"),)),
        (_L + "mlp.shared_expert.up_proj.weight", (("s_up", "T"),)),
        (_L + "mlp.shared_expert.down_proj.weight", (("s_down", "T"),)),
        (_L + "mlp.shared_expert_gate.weight", (("s_router", "row"),))],
    "qwen3_moe": _TOP + _ATTN + _QWEN,
    "granitemoe": _TOP + _ATTN + [
        (_L + "block_sparse_moe.input_linear.weight", (("w_gate", "half0T"), ("w_up", "half1T"))),
        (_L + "block_sparse_moe.output_linear.weight", (("w_down", "T"),)),
        (_L + "block_sparse_moe.router.layer.weight", (("router", "T"),))],
    "gpt_oss": _TOP + _ATTN + [
        (_L + "self_attn.sinks", (("sinks", "copy"),)),
        (_L + "mlp.router.weight", (("router", "T"),)),
        (_L + "mlp.router.bias", (("router_b", "copy"),)),
        (_L + "mlp.experts.gate_up_proj", (("w_gate", "even"), ("w_up", "odd"))),
        (_L + "mlp.experts.gate_up_proj_bias", (("b_gate", "even"), ("b_up", "odd"))),
        (_L + "mlp.experts.down_proj", (("w_down", "copy"),)),
        (_L + "mlp.experts.down_proj_bias", (("b_down", "copy"),))],
}
#: gpt-oss's MXFP4 checkpoints store these two expert tensors as ``<name>_blocks`` + ``<name>_scales`` instead
MXFP4_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class Target:
    """What one checkpoint tensor becomes: ``leaves`` ((leaf, op, leaf shape per layer), ...) at ``layer`` (None for
    top-level leaves), for one ``expert`` (None: all experts at once); ``shape``: the stored shape expected."""

    __slots__ = ("name", "leaves", "layer", "expert", "shape", "mxfp4")

    def __init__(self, name, leaves, layer, expert, shape, mxfp4=False):
        self.name, self.leaves, self.layer, self.expert, self.shape, self.mxfp4 = (name, leaves, layer, expert,
                                                                                   shape, mxfp4)


def _layers_for(leaf: str, cfg: GrokConfig) -> tuple[int, ...]:
    if leaf in MOE_LEAVES:
        return cfg.moe_layer_ids
    if leaf in DENSE_LEAVES:
        return cfg.dense_layer_ids
    return tuple(range(cfg.num_layers))


def expected_tensors(cfg: GrokConfig, *, mxfp4: bool = False) -> dict[str, Target]:
    """Every tensor name a checkpoint of ``cfg`` (family ``cfg.family``) must hold -> its :class:`Target`.

    With ``mxfp4`` the gpt-oss expert matrices are expected as ``*_blocks`` (uint8 ``[E, rows, groups, 16]``) and
    ``*_scales`` (uint8 ``[E, rows, groups]``); their Target's ``shape`` is the dequantised ``[E, in, out]``."""
    if cfg.family not in TABLES:
        raise ValueError(f"no Hugging Face name table for family {cfg.family!r} (known: {', '.join(TABLES)})")
    shapes = shapes_dict(cfg)
    flat = {**{k: v for k, v in shapes.items() if k != "blocks"}, **shapes["blocks"]}
    out: dict[str, Target] = {}
    for template, leaves in TABLES[cfg.family]:
        if not all(leaf in flat for leaf, _ in leaves):
            continue
        leaf0 = leaves[0][0]
        per_layer = "{layer}" in template
        per_expert = "{expert}" in template
        leaf_shapes = [tuple(flat[leaf][1:]) if per_layer else tuple(flat[leaf]) for leaf, _ in leaves]
        if per_expert:
            leaf_shapes = [s[1:] for s in leaf_shapes]
        shape = OPS[leaves[0][1]][1](leaf_shapes[0])
        spec = tuple((leaf, op, s) for (leaf, op), s in zip(leaves, leaf_shapes))
        is_q = mxfp4 and any(template.endswith(t) for t in MXFP4_TENSORS)
        for layer in (_layers_for(leaf0, cfg) if per_layer else (None,)):
            for expert in (range(cfg.num_experts) if per_expert else (None,)):
                name = template.format(layer=layer, expert=expert)
                if is_q:
                    out[name + "_blocks"] = Target(name, spec, layer, expert, shape, mxfp4=True)
                    out[name + "_scales"] = Target(name, spec, layer, expert, shape, mxfp4=True)
                else:
                    out[name] = Target(name, spec, layer, expert, shape)
    return out


def known_patterns(family: str) -> Iterator[re.Pattern]:
    """Regexes of every tensor name the family's table knows (for telling 'unexpected for this config' from
    'unknown to the family' in error messages)."""
    for template, _ in TABLES[family]:
        rx = re.escape(template).replace(r"\{layer\}", r"\d+").replace(r"\{expert\}", r"\d+")
        yield re.compile(rx + r"(_blocks|_scales)?")

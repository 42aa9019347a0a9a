"""The model families as data: each family is a preset of the architecture fields of
:class:`grokviz.config.GrokConfig` (docs/families.md). Sizes (vocabulary, width, layers, heads, experts, ...)
come from a checkpoint's config; these are the fields that make the family what it is.

Sources: the Grok-1 release (xai-org/grok-1 @ 7050ed2, docs/grok1.md) and, for the others, transformers 5.24's
``models/<family>/modeling_<family>.py`` (the definition of each family's maths that grokviz follows):

* **mixtral** (``MixtralForCausalLM``): pre-norm RMSNorm, no biases, softmax -> top-k -> renormalise,
  SiLU-gated experts, untied head, optional sliding window on every layer.
* **olmoe** (``OlmoeForCausalLM``): as Mixtral but RMSNorm over the whole q and k projections, and
  gates not renormalised by default (``norm_topk_prob``).
* **qwen2_moe** (``Qwen2MoeForCausalLM``, Qwen1.5-MoE): q/k/v biases, a shared expert scaled by
  ``sigmoid(shared_expert_gate(x))``, ``norm_topk_prob`` (default off), dense layers from ``mlp_only_layers``
  and ``decoder_sparse_step``.
* **qwen3_moe** (``Qwen3MoeForCausalLM``): per-head RMSNorm on q and k, ``head_dim`` given apart from
  ``hidden_size / heads``, no biases, ``norm_topk_prob`` (default on).
* **granitemoe** (``GraniteMoeForCausalLM``): top-k of the logits then softmax over the k; embedding,
  residual and attention multipliers; logits divided by ``logits_scaling``; tied embeddings.
* **gpt_oss** (``GptOssForCausalLM``): biases on q/k/v/o, router bias, top-k then softmax, attention sinks,
  alternating sliding-window and full layers, YaRN RoPE, clamped SwiGLU experts with biases.

Every HF family: pre-norm, no attention soft cap, logits scaled by ``head_dim ** -0.5`` (Granite: its
``attention_multiplier``), embedding and output multipliers 1 (Granite: its own), positions counted from a
row's first real token.
"""

from __future__ import annotations

from .config import GrokConfig

_HF_COMMON = dict(norm_layout="pre", attn_softcap=None, embedding_multiplier=1.0, output_multiplier=1.0,
                  position_rule="real_count", expert_act="silu", tie_embeddings=False)

#: fixed architecture fields per family (sizes and per-checkpoint constants come from the checkpoint's config)
FAMILIES: dict[str, dict] = {
    "grok": dict(),  # GrokConfig's defaults are Grok-1's
    "mixtral": dict(_HF_COMMON, router_renormalize=True),
    "olmoe": dict(_HF_COMMON, qk_norm="projection"),
    "qwen2_moe": dict(_HF_COMMON, qkv_bias=True),
    "qwen3_moe": dict(_HF_COMMON, qk_norm="head", router_renormalize=True),
    "granitemoe": dict(_HF_COMMON, router_rule="topk_softmax", tie_embeddings=True),
    "gpt_oss": dict(_HF_COMMON, router_rule="topk_softmax", router_bias=True, qkv_bias=True, o_bias=True,
                    attn_sinks=True, expert_act="swiglu_clamped", expert_bias=True),
}


def preset(family: str, **fields) -> GrokConfig:
    """A config of ``family`` with the given sizes and overrides. For the HF families the attention logit
    multiplier defaults to ``head_dim ** -0.5``. ``preset("qwen3_moe", vocab_size=..., d_model=..., ...)``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    base = dict(FAMILIES[family], family=family)
    if family != "grok" and "attn_logit_multiplier" not in fields:
        base["attn_logit_multiplier"] = fields["head_dim"] ** -0.5
    base.update(fields)
    base.setdefault("name", family)
    return GrokConfig(**base)

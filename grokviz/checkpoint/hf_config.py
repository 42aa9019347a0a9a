"""A Hugging Face ``config.json`` of one of six MoE families -> :class:`~grokviz.config.GrokConfig`.

Every field is read with the default of the family's configuration class in transformers 5 (an absent field means
what it means there) and mapped onto grokviz's architecture fields. Both spellings of RoPE are accepted: the
transformers-5 ``rope_parameters`` dict and the older top-level ``rope_theta`` + ``rope_scaling`` (with ``type`` or
``rope_type``), combined with the same precedence transformers applies.

Nothing is silently dropped: a field is either read, or on an explicit list of fields that do not enter the forward
pass (training-only settings, bookkeeping, generation defaults), or refused with a ``ValueError`` naming the file,
the field and its value. Values grokviz does not implement (``clip_qkv``, RoPE types other than default/yarn,
``partial_rotary_factor`` != 1, activations other than SiLU, quantisation other than gpt-oss's MXFP4, ...) are
refused the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..config import GrokConfig

SUPPORTED_MODEL_TYPES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe", "gpt_oss")

#: fields of any transformers config that do not change the forward pass (bookkeeping, training-only settings,
#: serving hints, legacy generation defaults stored in old configs, tokenizer ids other than pad/eos)
COMMON_IGNORED = frozenset({
    "architectures", "transformers_version", "model_type", "dtype", "torch_dtype", "_name_or_path", "use_cache",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "attention_dropout", "bos_token_id",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "num_labels",
    "problem_type", "chunk_size_feed_forward", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "use_bfloat16", "pruned_heads", "torchscript", "tf_legacy_loss", "sep_token_id",
    "decoder_start_token_id", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "is_decoder", "_attn_implementation_autoset", "auto_map",
    # generation defaults that old configs carry (generation_config.json holds them today)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
# Fields that would be ignored above but must hold one value for the forward pass to be what grokviz computes.
_MUST_BE = {"is_encoder_decoder": (False,)}

# RoPE fields read from the top level or from the rope dict (the legacy and the transformers-5 spelling)
_ROPE_TOP = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")
_YARN_KEYS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
              "attention_factor", "mscale", "mscale_all_dim"}


@dataclasses.dataclass(frozen=True)
class _Family:
    defaults: dict            # every field the loader reads, with the family config class's default
    aliases: dict             # attribute_map of the config class: other spelling -> the field read
    ignored: frozenset = frozenset()   # family fields without effect on the forward pass
    default_theta: float = 10_000.0


_BASE = dict(vocab_size=None, hidden_size=None, intermediate_size=None, num_hidden_layers=None,
             num_attention_heads=None, num_key_value_heads=None, head_dim=None, hidden_act="silu",
             max_position_embeddings=None, rms_norm_eps=1e-6, pad_token_id=None, eos_token_id=None,
             tie_word_embeddings=False, num_experts_per_tok=None, num_local_experts=None)

FAMILIES = {
    "mixtral": _Family(dict(_BASE, rms_norm_eps=1e-5, sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=4096 * 32, eos_token_id=2),
                       {"num_experts": "num_local_experts"}, frozenset({"router_jitter_noise"}), 1_000_000.0),
    "olmoe": _Family(dict(_BASE, rms_norm_eps=1e-5, attention_bias=False, clip_qkv=None, num_local_experts=64,
                          num_experts_per_tok=8, norm_topk_prob=False, pad_token_id=1, eos_token_id=50279,
                          max_position_embeddings=4096),
                     {"num_experts": "num_local_experts"}),
    "qwen2_moe": _Family(dict(_BASE, num_key_value_heads=16, use_sliding_window=False, sliding_window=4096,
                              max_window_layers=28, decoder_sparse_step=1, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_local_experts=60,
                              norm_topk_prob=False, mlp_only_layers=None, qkv_bias=True, layer_types=None,
                              max_position_embeddings=32768),
                         {"num_experts": "num_local_experts"}),
    "qwen3_moe": _Family(dict(_BASE, num_key_value_heads=4, attention_bias=False, use_sliding_window=False,
                              sliding_window=4096, decoder_sparse_step=1, moe_intermediate_size=768,
                              num_experts_per_tok=8, num_local_experts=128, norm_topk_prob=False,
                              mlp_only_layers=None, max_position_embeddings=32768),
                         {"num_experts": "num_local_experts"},
                         frozenset({"max_window_layers"})),  # a Qwen2 field that Qwen3-MoE's model never reads
    "granitemoe": _Family(dict(_BASE, attention_bias=False, embedding_multiplier=1.0, logits_scaling=1.0,
                               residual_multiplier=1.0, attention_multiplier=1.0, num_local_experts=8,
                               num_experts_per_tok=2, eos_token_id=2, max_position_embeddings=2048),
                          {"num_experts": "num_local_experts"}),
    # gpt-oss experts use their own clamped SwiGLU: hidden_act is never read by its model. experts_per_token and
    # initial_context_length are extra keys of the released configs that transformers' model does not read.
    "gpt_oss": _Family(dict(_BASE, rms_norm_eps=1e-5, num_key_value_heads=8, head_dim=64, sliding_window=128,
                            num_local_experts=128, num_experts_per_tok=4, swiglu_alpha=1.702, swiglu_limit=7.0,
                            layer_types=None, attention_bias=True, quantization_config=None,
                            max_position_embeddings=131072),
                       {"num_experts": "num_local_experts"},
                       frozenset({"hidden_act", "experts_per_token", "initial_context_length"}), 150_000.0),
}
_GPT_OSS_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096}


class _Fields:
    """The config dict of one file: values with the family's defaults, every key read or allowed accounted for."""

    def __init__(self, d: dict, family: _Family, where: str, model_type: str):
        self.d, self.family, self.where, self.model_type = dict(d), family, where, model_type
        for other, canon in family.aliases.items():
            if other in self.d:
                if canon in self.d and self.d[canon] != self.d[other]:
                    raise ValueError(f"{where}: {other}={self.d[other]!r} and {canon}={self.d[canon]!r} name the "
                                     f"same setting with different values")
                self.d[canon] = self.d.pop(other)
        self.used: set[str] = set()

    def __contains__(self, key):
        return key in self.d

    def get(self, key):
        self.used.add(key)
        if key in self.d:
            return self.d[key]
        if key not in self.family.defaults:
            raise KeyError(f"internal: {key} has no default for {self.model_type}")
        return self.family.defaults[key]

    def int(self, key, *, minimum=1, required=True):
        v = self.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{self.where}: {key} = {v!r}, expected an int >= {minimum}")
        return v

    def float(self, key):
        v = self.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{self.where}: {key} = {v!r}, expected a finite number")
        return float(v)

    def bool(self, key):
        v = self.get(key)
        if not isinstance(v, bool):
            raise ValueError(f"{self.where}: {key} = {v!r}, expected true or false")
        return v

    def refuse(self, key, value, why):
        raise ValueError(f"{self.where}: {key} = {value!r} is not supported for model_type {self.model_type!r}: {why}")

    def leftovers(self):
        allowed = self.used | set(_ROPE_TOP) | COMMON_IGNORED | self.family.ignored
        for key, value in self.d.items():
            if key in _MUST_BE and value not in _MUST_BE[key]:
                self.refuse(key, value, f"grokviz runs decoder-only models ({key} must be {_MUST_BE[key][0]!r})")
            if key not in allowed and key not in _MUST_BE:
                self.refuse(key, value, "grokviz does not read this field, and it may change the computation "
                            "(refused rather than ignored)")


def _rope(f: _Fields, head_dim: int, max_pos: int) -> dict:
    """GrokConfig RoPE fields from either spelling (transformers' precedence: ``rope_scaling`` over
    ``rope_parameters``; top-level ``rope_theta`` only fills a missing ``rope_theta``; else the family default)."""
    where = f.where
    scaling, params = f.d.get("rope_scaling"), f.d.get("rope_parameters")
    for key, v in (("rope_scaling", scaling), ("rope_parameters", params)):
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{where}: {key} = {v!r}, expected an object or null")
    rope = dict(scaling or params or {})
    if not rope and "rope_theta" not in f.d and f.model_type == "gpt_oss":
        rope = dict(_GPT_OSS_DEFAULT_ROPE)
    if rope and all(isinstance(v, dict) for v in rope.values()):
        f.refuse("rope_parameters", rope, "RoPE parameters per layer type are not implemented")
    rope.setdefault("rope_theta", f.d.get("rope_theta", f.family.default_theta))
    if "partial_rotary_factor" in f.d:
        rope.setdefault("partial_rotary_factor", f.d["partial_rotary_factor"])
    rtype = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    prf = rope.pop("partial_rotary_factor", None)
    if prf is not None and prf != 1:
        f.refuse("partial_rotary_factor", prf, "RoPE on only part of each head is not implemented (must be 1)")
    theta = rope.pop("rope_theta")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 1:
        f.refuse("rope_theta", theta, "expected a number > 1")
    out = {"rope_base": float(theta), "rope_type": rtype}
    if rtype == "default":
        if rope:
            f.refuse("rope_parameters", sorted(rope), "keys other than rope_type/rope_theta with the default RoPE")
        return out
    if rtype != "yarn":
        f.refuse("rope_type", rtype, "grokviz implements the 'default' and 'yarn' RoPE types")
    unknown = sorted(set(rope) - _YARN_KEYS)
    if unknown:
        f.refuse("rope_parameters", unknown, f"unknown yarn keys (known: {sorted(_YARN_KEYS)})")
    orig = rope.get("original_max_position_embeddings", f.d.get("original_max_position_embeddings", max_pos))
    factor = rope.get("factor")
    if factor is None:
        if "factor" not in rope:
            f.refuse("rope_parameters", "factor missing", "yarn needs a factor")
        factor = max_pos / orig  # transformers' fallback for a null factor
    for key, v in (("factor", factor), ("original_max_position_embeddings", orig)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            f.refuse(f"rope_parameters.{key}", v, "expected a positive number")
    attention = rope.get("attention_factor")
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention is None and mscale and mscale_all:
        def m(scale, s):
            return 1.0 if scale <= 1 else 0.1 * s * math.log(scale) + 1.0

        attention = m(factor, mscale) / m(factor, mscale_all)
    truncate = rope.get("truncate", True)
    if not isinstance(truncate, bool):
        f.refuse("rope_parameters.truncate", truncate, "expected true or false")
    out.update(rope_factor=float(factor), rope_original_max=int(orig),
               rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
               rope_truncate=truncate, rope_attention_factor=None if attention is None else float(attention))
    return out


def _layer_types(f: _Fields, L: int) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) as grokviz reads them, from each family's own rule."""
    mt = f.model_type
    if mt in ("olmoe", "granitemoe"):
        for key in ("sliding_window", "layer_types", "use_sliding_window"):
            if key in f.d and f.d[key] not in (None, False):
                f.refuse(key, f.d[key], f"{mt} models attend to the whole prefix")
            f.used.add(key)
        return None, None
    if mt in ("mixtral", "qwen3_moe"):
        # one window for every layer when set (qwen3: only with use_sliding_window)
        window = f.get("sliding_window")
        if mt == "qwen3_moe" and not f.bool("use_sliding_window"):
            window = None
        if window is None:
            return None, None
        return f.int("sliding_window"), None
    if mt == "qwen2_moe":
        use = f.bool("use_sliding_window")
        window = f.get("sliding_window")
        window = window if use else 0  # transformers zeroes it unless use_sliding_window
        types = f.get("layer_types")
        mwl = f.int("max_window_layers", minimum=0)  # only shapes the default layer_types
        if types is None:
            types = ["sliding_attention" if (i + 1) % 2 and i < mwl and use else "full_attention" for i in range(L)]
    else:  # gpt_oss
        window = f.get("sliding_window")
        types = f.get("layer_types")
        if types is None:
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    if not isinstance(types, list) or len(types) != L or any(t not in ("full_attention", "sliding_attention")
                                                              for t in types):
        f.refuse("layer_types", types, f"expected {L} entries of 'full_attention' or 'sliding_attention'")
    if "sliding_attention" not in types:
        return None, None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        f.refuse("sliding_window", window, "sliding_attention layers need a positive window (for qwen2_moe, "
                 "use_sliding_window must be true)")
    return window, tuple("sliding" if t == "sliding_attention" else "full" for t in types)


def _moe_layers(f: _Fields, L: int, E: int) -> tuple[int, ...] | None:
    """The MoE layers of a Qwen-MoE config (``mlp_only_layers``, ``decoder_sparse_step``); None = every layer."""
    step = f.int("decoder_sparse_step")
    only = f.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < L for i in only):
        f.refuse("mlp_only_layers", only, f"expected a list of layer numbers in [0, {L})")
    moe = tuple(i for i in range(L) if i not in only and (i + 1) % step == 0)
    return None if len(moe) == L else moe


def config_from_hf(d: dict, where: str = "config.json", name: str | None = None) -> GrokConfig:
    """The GrokConfig of a Hugging Face config dict (see the module docstring); ``where`` names it in errors."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a config is a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    f = _Fields(d, FAMILIES[mt], where, mt)
    D, L, H = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("num_attention_heads")
    Hkv = f.int("num_key_value_heads", required=False) or H
    head_dim = f.int("head_dim", required=False) or D // H
    if mt == "olmoe" and head_dim * H != D:
        f.refuse("head_dim", head_dim, "OLMoE's q/k norms span hidden_size, so head_dim must be hidden_size / heads")
    if mt != "gpt_oss" and f.get("hidden_act") not in ("silu", "swish"):
        f.refuse("hidden_act", f.get("hidden_act"), "the experts of this family are implemented with SiLU only")
    E, k = f.int("num_local_experts"), f.int("num_experts_per_tok")
    max_pos = f.int("max_position_embeddings")
    pad, eos = f.get("pad_token_id"), f.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    for key, v in (("pad_token_id", pad), ("eos_token_id", eos)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            f.refuse(key, v, "expected a token id or null")
    kw = dict(name=name or mt, family=mt, vocab_size=f.int("vocab_size"), d_model=D, num_layers=L, num_q_heads=H,
              num_kv_heads=Hkv, head_dim=head_dim, num_experts=E, top_k=k, rms_eps=f.float("rms_norm_eps"),
              sequence_len=max_pos, pad_token=-1 if pad is None else pad, eos_token=-1 if eos is None else eos,
              tie_embeddings=f.bool("tie_word_embeddings"), norm_layout="pre", attn_softcap=None,
              attn_logit_multiplier=head_dim ** -0.5, embedding_multiplier=1.0, output_multiplier=1.0,
              position_rule="real_count", expert_act="silu", router_rule="softmax_topk")
    kw.update(_rope(f, head_dim, max_pos))
    kw["sliding_window"], kw["layer_types"] = _layer_types(f, L)
    if mt == "mixtral":
        kw.update(ffn=f.int("intermediate_size"), router_renormalize=True)
    elif mt == "olmoe":
        clip = f.get("clip_qkv")
        if clip is not None:
            f.refuse("clip_qkv", clip, "clamping q/k/v is not implemented (must be null)")
        bias = f.bool("attention_bias")
        kw.update(ffn=f.int("intermediate_size"), router_renormalize=f.bool("norm_topk_prob"), qkv_bias=bias,
                  o_bias=bias, qk_norm="projection")
    elif mt in ("qwen2_moe", "qwen3_moe"):
        moe = _moe_layers(f, L, E)
        f.used.add("intermediate_size")  # the dense MLP's size: read only when some layer is dense
        kw.update(ffn=f.int("moe_intermediate_size"), router_renormalize=f.bool("norm_topk_prob"), moe_layers=moe,
                  dense_ffn=f.int("intermediate_size") if moe is not None else 0)
        if mt == "qwen2_moe":
            kw.update(qkv_bias=f.bool("qkv_bias"), shared_expert_ffn=f.int("shared_expert_intermediate_size"))
        else:
            bias = f.bool("attention_bias")
            kw.update(qkv_bias=bias, o_bias=bias, qk_norm="head")
    elif mt == "granitemoe":
        bias = f.bool("attention_bias")
        scaling = f.float("logits_scaling")
        if scaling == 0:
            f.refuse("logits_scaling", scaling, "logits are divided by it")
        kw.update(ffn=f.int("intermediate_size"), router_rule="topk_softmax", qkv_bias=bias, o_bias=bias,
                  attn_logit_multiplier=f.float("attention_multiplier"),
                  embedding_multiplier=f.float("embedding_multiplier"), output_multiplier=1.0 / scaling,
                  residual_multiplier=f.float("residual_multiplier"))
    else:  # gpt_oss
        bias = f.bool("attention_bias")
        quant = f.get("quantization_config")
        if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4"):
            f.refuse("quantization_config", quant, "only gpt-oss's MXFP4 expert weights are read (dequantised)")
        kw.update(ffn=f.int("intermediate_size"), router_rule="topk_softmax", router_bias=True, qkv_bias=bias,
                  o_bias=bias, attn_sinks=True, expert_act="swiglu_clamped", expert_bias=True,
                  swiglu_alpha=f.float("swiglu_alpha"), swiglu_limit=f.float("swiglu_limit"))
    if mt != "gpt_oss" and f.d.get("quantization_config") is not None:
        f.refuse("quantization_config", f.d["quantization_config"], "quantised checkpoints are not read")
    f.used.add("quantization_config")
    f.leftovers()
    try:
        return GrokConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def is_mxfp4(d: dict) -> bool:
    """Does this config say the expert weights are stored as MXFP4 blocks + scales?"""
    q = d.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def read_hf_config(folder) -> tuple[GrokConfig, dict]:
    """(GrokConfig, the raw dict) of ``folder/config.json``; errors name the file."""
    path = Path(folder) / "config.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (a Hugging Face checkpoint folder has a config.json)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    return config_from_hf(d, str(path), name=Path(folder).resolve().name), d

"""Model configuration: one frozen dataclass, presets as values, constants with their derivations.

Field names follow the grokviz axis vocabulary (``d_model``, ``head_dim``, ``top_k``); the reference's own
names (``emb_size``, ``key_size``, ``num_selected_experts``, ...) are accepted by
:meth:`GrokConfig.from_reference`. Facts are from the Grok-1 release (xai-org/grok-1 @ 7050ed2), written down in
``docs/grok1.md#sizes``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

# --- Grok-1 release constants, each with its derivation --------------------------------------------------
GROK1_D_MODEL = 48 * 128  # 6144
#: sqrt(6144); the release's literal 78.38367176906169 equals float64 sqrt(6144) exactly.
EMBEDDING_MULTIPLIER = 78.38367176906169
#: ~1/sqrt(3); the release literal (float64 1/sqrt(3) differs from it in the last ulp, so the literal is kept).
OUTPUT_MULTIPLIER = 0.5773502691896257
#: ~1/sqrt(128) = 1/sqrt(key_size of Grok-1); it scales attention *logits* (release name: attn_output_multiplier).
ATTN_LOGIT_MULTIPLIER = 0.08838834764831845
#: attention logits are soft-capped as cap * tanh(s / cap)
ATTN_SOFTCAP = 30.0
RMS_EPS = 1e-5
ROPE_BASE = 10_000.0
PAD_TOKEN = 0
EOS_TOKEN = 2

# reference field name -> grokviz field name
REFERENCE_FIELDS = {
    "vocab_size": "vocab_size",
    "emb_size": "d_model",
    "num_layers": "num_layers",
    "num_q_heads": "num_q_heads",
    "num_kv_heads": "num_kv_heads",
    "key_size": "head_dim",
    "widening_factor": "widening_factor",
    "num_experts": "num_experts",
    "num_selected_experts": "top_k",
    "attn_output_multiplier": "attn_logit_multiplier",
    "embedding_multiplier_scale": "embedding_multiplier",
    "output_multiplier_scale": "output_multiplier",
    "max_attn_value": "attn_softcap",
    "pad_token": "pad_token",
    "eos_token": "eos_token",
    "sequence_len": "sequence_len",
    # also found in the golden config_json
    "rms_norm_eps": "rms_eps",
    "rope_base": "rope_base",
}
#: fields of the golden generator's config_json that describe the data, not the model; ignored on request.
GENERATOR_FIELDS = frozenset({"batch", "big_qk_gain", "big_qk_layers", "emb_std", "name", "router_gain",
                              "rows", "seed", "seq", "ffn_size"})


def expert_ffn_size(d_model: int, widening_factor: float) -> int:
    """Expert hidden size as the release computes it (docs/grok1.md#sizes).

    ``int(widening_factor * d_model) * 2 // 3``, then rounded *up* to the next multiple of 8 by adding
    ``(8 - ffn) % 8``. Grok-1: 8*6144 = 49152 -> 32768 (already a multiple of 8). D=64, wf=2 -> 85 -> 88.
    """
    ffn = int(widening_factor * d_model) * 2 // 3
    return ffn + (8 - ffn) % 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class GrokConfig:
    """A Grok-architecture model. Defaults are the Grok-1 release constants; sizes must be given."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    widening_factor: float | None = None
    num_experts: int = 8
    top_k: int = 2
    attn_logit_multiplier: float = ATTN_LOGIT_MULTIPLIER
    embedding_multiplier: float = EMBEDDING_MULTIPLIER
    output_multiplier: float = OUTPUT_MULTIPLIER
    attn_softcap: float = ATTN_SOFTCAP
    rms_eps: float = RMS_EPS
    rope_base: float = ROPE_BASE
    pad_token: int = PAD_TOKEN
    eos_token: int = EOS_TOKEN
    sequence_len: int = 8192
    name: str = "custom"
    # --- architecture fields that distinguish the model families (defaults: Grok-1; docs/families.md) ---
    family: str = "grok"
    norm_layout: str = "sandwich"
    ffn: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None
    attn_sinks: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float | None = None
    position_rule: str = "index"
    router_rule: str = "softmax_topk"
    router_renormalize: bool = False
    router_bias: bool = False
    expert_act: str = "gelu_tanh"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    shared_expert_ffn: int = 0
    moe_layers: tuple[int, ...] | None = None
    dense_ffn: int = 0
    residual_multiplier: float = 1.0
    tie_embeddings: bool = True

    def __post_init__(self):
        positive = ["vocab_size", "d_model", "num_layers", "num_q_heads", "num_kv_heads", "head_dim",
                    "num_experts", "top_k", "sequence_len"]
        for f in positive:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GrokConfig.{f} must be a positive int, got {v!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.ffn is None and (self.widening_factor is None or self.widening_factor <= 0):
            raise ValueError(f"give ffn (the expert hidden size) or a positive widening_factor, got "
                             f"ffn={self.ffn!r}, widening_factor={self.widening_factor!r}")
        if self.ffn is not None and (not isinstance(self.ffn, int) or isinstance(self.ffn, bool) or self.ffn <= 0):
            raise ValueError(f"GrokConfig.ffn must be a positive int, got {self.ffn!r}")
        for f in ("layer_types", "moe_layers"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        _check_choices(self)

    # --- derived sizes ---
    @property
    def ffn_size(self) -> int:
        """Expert hidden size F: ``ffn`` when given, else the release formula (:func:`expert_ffn_size`)."""
        return self.ffn if self.ffn is not None else expert_ffn_size(self.d_model, self.widening_factor)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """The MoE layers, ascending (every layer unless ``moe_layers`` names some)."""
        return tuple(range(self.num_layers)) if self.moe_layers is None else tuple(sorted(self.moe_layers))

    @property
    def dense_layer_ids(self) -> tuple[int, ...]:
        """The layers with a dense MLP instead of experts."""
        moe = set(self.moe_layer_ids)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layer_ids

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does attention use the sliding window (``layer_types``; all layers when only
        ``sliding_window`` is set)?"""
        if self.layer_types is not None:
            return tuple(t == "sliding" for t in self.layer_types)
        return (self.sliding_window is not None,) * self.num_layers

    @property
    def sandwich(self) -> bool:
        """Grok's four norms per layer (pre and post around both sublayers) rather than pre-norm only."""
        return self.norm_layout == "sandwich"

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group G); query head j uses KV head j // G."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_width(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> GrokConfig:
        return dataclasses.replace(self, **changes)

    # --- presets ---
    @classmethod
    def grok1(cls) -> GrokConfig:
        """The released Grok-1: 64 layers, 8 experts top-2, 48 query / 8 KV heads of 128, 315,684,820,992 params."""
        return cls(
            name="grok-1",
            vocab_size=128 * 1024,        # 131072
            d_model=GROK1_D_MODEL,        # 6144 = 48 * 128
            num_layers=64,
            num_q_heads=48,
            num_kv_heads=8,               # GQA group 6
            head_dim=128,
            widening_factor=8,            # F = 8*6144*2//3 = 32768
            num_experts=8,
            top_k=2,
            attn_logit_multiplier=ATTN_LOGIT_MULTIPLIER,  # ~1/sqrt(128)
            embedding_multiplier=EMBEDDING_MULTIPLIER,    # sqrt(6144)
            output_multiplier=OUTPUT_MULTIPLIER,          # ~1/sqrt(3)
            attn_softcap=ATTN_SOFTCAP,
            sequence_len=8192,
        )

    @classmethod
    def golden(cls, **overrides) -> GrokConfig:
        """The configuration of the golden reference outputs in ``tests/data/`` (vocab 512, D 64, 2 layers, 4/2 heads
        of 16, F 88), with overrides; a base for small test models. (The bundled trained model is
        ``gv.load("tiny")``.)"""
        base = dict(name="grok1-golden", vocab_size=512, d_model=64, num_layers=2, num_q_heads=4,
                    num_kv_heads=2, head_dim=16, widening_factor=2, sequence_len=32)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_reference(cls, *, ignore_generator_fields: bool = False, **fields: Any) -> GrokConfig:
        """Build from the reference's own field names (``emb_size``, ``key_size``, ...).

        Unknown names raise ``ValueError`` with the closest known names. ``ignore_generator_fields=True``
        drops the extra keys of the golden ``config_json`` (seed, rows, ...) — ``ffn_size`` among them,
        which is then checked against the derived size.
        """
        kwargs, ffn = {}, None
        for key, value in fields.items():
            if key in REFERENCE_FIELDS:
                kwargs[REFERENCE_FIELDS[key]] = value
            elif ignore_generator_fields and key in GENERATOR_FIELDS:
                if key == "ffn_size":
                    ffn = value
            else:
                close = difflib.get_close_matches(key, list(REFERENCE_FIELDS), n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"Unknown reference config field {key!r}.{hint} "
                                 f"Known fields: {', '.join(REFERENCE_FIELDS)}")
        for f in ("attn_logit_multiplier", "embedding_multiplier", "output_multiplier", "attn_softcap",
                  "rms_eps", "rope_base"):
            if f in kwargs:
                kwargs[f] = float(kwargs[f])
        cfg = cls(**kwargs)
        if ffn is not None and ffn != cfg.ffn_size:
            raise ValueError(f"config says ffn_size={ffn} but the release formula gives {cfg.ffn_size} "
                             f"for emb_size={cfg.d_model}, widening_factor={cfg.widening_factor}")
        return cfg

    def to_reference(self) -> dict:
        """The inverse of :meth:`from_reference` (used in converted checkpoints' config JSON)."""
        return {ref: getattr(self, ours) for ref, ours in REFERENCE_FIELDS.items()}

    def describe(self) -> str:
        fam = "" if self.family == "grok" else f" [{self.family}]"
        dense = f" dense={list(self.dense_layer_ids)}" if self.moe_layers is not None else ""
        return (f"{self.name}{fam}: L={self.num_layers} D={self.d_model} heads={self.num_q_heads}/{self.num_kv_heads}"
                f"x{self.head_dim} E={self.num_experts} k={self.top_k} F={self.ffn_size} V={self.vocab_size}{dense}")


#: allowed values of the architecture fields with a fixed set of choices
CHOICES = {
    "norm_layout": ("sandwich", "pre"),
    "qk_norm": (None, "projection", "head"),
    "rope_type": ("default", "yarn"),
    "position_rule": ("index", "real_count"),
    "router_rule": ("softmax_topk", "topk_softmax"),
    "expert_act": ("gelu_tanh", "silu", "swiglu_clamped"),
}


def _check_choices(cfg: GrokConfig) -> None:
    """Validate the architecture fields (one ValueError naming the field, the value and what is allowed)."""
    for f, allowed in CHOICES.items():
        if getattr(cfg, f) not in allowed:
            raise ValueError(f"GrokConfig.{f} must be one of {list(allowed)}, got {getattr(cfg, f)!r}")
    L = cfg.num_layers
    if cfg.layer_types is not None:
        if len(cfg.layer_types) != L or any(t not in ("full", "sliding") for t in cfg.layer_types):
            raise ValueError(f"GrokConfig.layer_types must give 'full' or 'sliding' for each of the {L} layers, "
                             f"got {cfg.layer_types!r}")
        if "sliding" in cfg.layer_types and cfg.sliding_window is None:
            raise ValueError("GrokConfig.layer_types has sliding layers but sliding_window is None")
    if cfg.sliding_window is not None and (not isinstance(cfg.sliding_window, int) or cfg.sliding_window < 1):
        raise ValueError(f"GrokConfig.sliding_window must be a positive int or None, got {cfg.sliding_window!r}")
    if cfg.moe_layers is not None:
        ids = cfg.moe_layers
        if len(set(ids)) != len(ids) or any(not isinstance(i, int) or not 0 <= i < L for i in ids):
            raise ValueError(f"GrokConfig.moe_layers must be distinct layer numbers in [0, {L}), got {ids!r}")
        if len(ids) < L and cfg.dense_ffn <= 0:
            raise ValueError("GrokConfig.moe_layers leaves dense layers, which need dense_ffn > 0")
    if cfg.shared_expert_ffn < 0 or cfg.dense_ffn < 0:
        raise ValueError("GrokConfig.shared_expert_ffn and dense_ffn must be >= 0")
    if cfg.attn_softcap is not None and cfg.attn_softcap <= 0:
        raise ValueError(f"GrokConfig.attn_softcap must be positive or None, got {cfg.attn_softcap!r}")
    if cfg.router_renormalize and cfg.router_rule == "topk_softmax":
        raise ValueError("router_renormalize applies to router_rule 'softmax_topk' (topk_softmax gates already "
                         "sum to 1)")
    if cfg.rope_type == "yarn" and (cfg.rope_factor <= 0 or cfg.rope_original_max <= 0):
        raise ValueError("yarn RoPE needs rope_factor > 0 and rope_original_max > 0")
    if cfg.pad_token < -1 or cfg.pad_token >= cfg.vocab_size:
        raise ValueError(f"GrokConfig.pad_token must be a token id in [0, {cfg.vocab_size}) or -1 (no padding id), "
                         f"got {cfg.pad_token}")



def is_real(tokens, pad_token: int):
    """The one padding predicate (numpy or jax arrays): a position is real iff ``token != pad_token``. For Grok-1
    (pad 0, ids >= 0) this is the reference's ``token > 0``; a config with ``pad_token = -1`` has no padding id.
    Used by the model, training, the dataset runners and the analysis code."""
    return tokens != pad_token


def bucket_length(t: int, max_len: int) -> int:
    """The sequence buckets of :meth:`grokviz.Model.run` and of generation's prompt buffer: the smallest of 16,
    32, 64, 128, 256, then multiples of 256, that holds ``t``, capped at ``max_len`` (never below ``t``). One
    compile per bucket instead of one per length."""
    b = 16
    while b < t:
        b = b * 2 if b < 256 else b + 256
    return max(t, min(b, max_len))

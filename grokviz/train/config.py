"""What a training run is: :class:`TrainConfig` (optimiser, schedule, loss coefficients, cadence) and the presets.

A run is fully determined by the model config, the data and the TrainConfig fields in :data:`RUN_FIELDS`; the
remaining fields (:data:`CADENCE_FIELDS`) only decide how often the loop logs, evaluates and checkpoints, so they
may change between an interrupted run and its resumption without changing the final parameters.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..config import GrokConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TOKENIZER_PATH = ASSETS / "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    aux_coef: float = 0.01
    z_coef: float = 1e-3
    eval_every: int = 250
    eval_batches: int = 8
    ckpt_every: int = 250
    log_every: int = 10
    seed: int = 0
    expert_impl: str = "sparse"


#: fields that only set the logging / evaluation / checkpoint cadence (free to change on resume)
CADENCE_FIELDS = frozenset({"eval_every", "eval_batches", "ckpt_every", "log_every"})
#: fields that shape the optimisation itself: a resumed run must agree with its checkpoint on every one
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in CADENCE_FIELDS)


def tiny_config() -> GrokConfig:
    """The shipped model: Grok-1 architecture at toy size (multipliers rescaled to this width)."""
    d, hd = 128, 32
    return GrokConfig(name="grok1-tiny-trained", vocab_size=4096, d_model=d, num_layers=4, num_q_heads=4,
                      num_kv_heads=2, head_dim=hd, widening_factor=2, num_experts=8, top_k=2,
                      embedding_multiplier=math.sqrt(d), attn_logit_multiplier=1 / math.sqrt(hd),
                      sequence_len=128)


def quick_config() -> GrokConfig:
    d, hd = 64, 16
    return GrokConfig(name="grok1-quick", vocab_size=4096, d_model=d, num_layers=2, num_q_heads=4,
                      num_kv_heads=2, head_dim=hd, widening_factor=2, num_experts=8, top_k=2,
                      embedding_multiplier=math.sqrt(d), attn_logit_multiplier=1 / math.sqrt(hd),
                      sequence_len=64)


PRESETS: dict[str, tuple[GrokConfig, TrainConfig]] = {
    "tiny": (tiny_config(), TrainConfig(steps=1200, batch_size=16, seq_len=128, lr=3e-3, warmup=100,
                                        eval_every=400, ckpt_every=200, aux_coef=0.01, z_coef=1e-3)),
    "quick": (quick_config(), TrainConfig(steps=400, batch_size=16, seq_len=64, lr=5e-3, warmup=30,
                                          eval_every=0, eval_batches=4, ckpt_every=100, aux_coef=0.01,
                                          z_coef=1e-3, log_every=5)),
}


def resolve(tc: TrainConfig | None, *, steps=None, aux_coef=None, z_coef=None, **overrides) -> TrainConfig:
    """``tc`` (default :class:`TrainConfig()`) with the given fields replaced (``None`` keeps a field)."""
    tc = tc or TrainConfig()
    changes = {k: v for k, v in dict(overrides, steps=steps, aux_coef=aux_coef, z_coef=z_coef).items()
               if v is not None}
    unknown = set(changes) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s) {sorted(unknown)}; valid: "
                        f"{[f.name for f in dataclasses.fields(TrainConfig)]}")
    tc = dataclasses.replace(tc, **changes)
    if tc.steps < 0 or tc.batch_size < 1 or tc.seq_len < 1:
        raise ValueError(f"TrainConfig needs steps >= 0, batch_size >= 1 and seq_len >= 1, got steps={tc.steps}, "
                         f"batch_size={tc.batch_size}, seq_len={tc.seq_len}")
    for name in ("ckpt_every", "eval_every"):
        if getattr(tc, name) < 0:
            raise ValueError(f"TrainConfig.{name} must be >= 0 (0 = never), got {getattr(tc, name)}")
    if tc.log_every < 1:
        raise ValueError(f"TrainConfig.log_every must be >= 1, got {tc.log_every}")
    return tc

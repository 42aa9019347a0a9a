"""The pure-JAX Grok-1 forward pass."""

from .attention import attention, attention_mask
from .block import block
from .layers import gelu_tanh, rms_norm, rope, softcap
from .moe import combine, experts_dense, experts_sparse, route
from .transformer import Output, forward

__all__ = ["Output", "attention", "attention_mask", "block", "combine", "experts_dense", "experts_sparse",
           "forward", "gelu_tanh", "rms_norm", "rope", "route", "softcap"]

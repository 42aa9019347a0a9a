"""The pure-JAX forward pass of every family: ``forward = unembed(run_blocks(embed(tokens)))``."""

from .attention import attention, attention_mask
from .block import block
from .kvcache import KVCache
from .layers import gelu_tanh, rms_norm, rope, softcap
from .moe import combine, experts_dense, experts_sparse, route
from .transformer import Blocks, Output, embed, forward, run_blocks, unembed

__all__ = ["Blocks", "KVCache", "Output", "attention", "attention_mask", "block", "combine", "embed", "experts_dense",
           "experts_sparse", "forward", "gelu_tanh", "rms_norm", "rope", "route", "run_blocks", "softcap", "unembed"]

"""The KV cache (docs/grok1.md#kv-cache): per layer the keys (after RoPE) and values of every token written so
far, in the reference's layout ``[layer, batch, slot, kv_head, head_dim]``, with per-row ``step``.

A chunk of ``T`` tokens is written at slots ``step .. step + T - 1`` of each row; its queries attend to the slots
that hold real tokens at or before their own slot (``slot < step + t + 1``, the reference's ``position < step + T``
with the chunk's causal mask) and, in sliding-window layers, less than ``sliding_window`` positions behind. A full
forward over a sequence equals a prefill of it into an empty cache, and a decode step (T = 1) equals the
full forward's row at that position (to fp32 rounding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array         # [layer, batch, slot, kv_head, head_dim], keys after RoPE
    v: jax.Array         # [layer, batch, slot, kv_head, head_dim]
    real: jax.Array      # [batch, slot] bool: the slot holds a real (non-pad) token
    pos: jax.Array       # [batch, slot] int32: the RoPE position of the slot's token
    step: jax.Array      # [batch] int32: the next slot to write (shape (): the same slot for every row)
    #: [batch] int32: the position the next token gets. Position rule ``index``: it advances with every token
    #: (so it equals ``step`` from an empty cache); a caller may start it below 0 so that slots filled with
    #: bucket padding before a prompt do not shift the prompt's positions. ``real_count``: it advances with
    #: real tokens only.
    next_pos: jax.Array

    @classmethod
    def empty(cls, cfg, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        """An empty cache of ``size`` slots per row (nothing real, step 0)."""
        if size < 1 or batch < 1:
            raise ValueError(f"a KV cache needs batch >= 1 and size >= 1, got batch {batch}, size {size}")
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), real=jnp.zeros((batch, size), bool),
                   pos=jnp.zeros((batch, size), jnp.int32), step=jnp.zeros((batch,), jnp.int32),
                   next_pos=jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        return (self.k[0] if isinstance(self.k, tuple) else self.k).shape[-3]

    def split(self) -> KVCache:
        """The same cache with ``k`` and ``v`` as tuples of per-layer arrays [batch, slot, kv_head, head_dim], for
        an unrolled run (``run_blocks(..., unroll=True)``): each layer's buffer is then written in place and read
        by its attention where it lies. From a stacked buffer, XLA CPU copies a layer's slice out before reading
        it and stacks the layers again after writing (three copies of the whole cache per decode step)."""
        if isinstance(self.k, tuple):
            return self
        return dataclasses.replace(self, k=tuple(self.k), v=tuple(self.v))

    def joined(self) -> KVCache:
        """The reference layout again (k, v stacked over layers, ``step`` per row), from :meth:`split` or a scalar
        step."""
        k, v = (jnp.stack(self.k), jnp.stack(self.v)) if isinstance(self.k, tuple) else (self.k, self.v)
        return dataclasses.replace(self, k=k, v=v, step=jnp.broadcast_to(self.step, self.real.shape[:1]))

    def padded(self, size: int) -> KVCache:
        """The same cache with ``size`` slots (more empty slots at the end)."""
        extra = size - self.size
        if extra < 0:
            raise ValueError(f"cannot shrink a KV cache of {self.size} slots to {size}")
        pad = [(0, 0)] * 2 + [(0, extra)]
        return dataclasses.replace(self, k=jnp.pad(self.k, pad + [(0, 0)] * 2), v=jnp.pad(self.v, pad + [(0, 0)] * 2),
                                   real=jnp.pad(self.real, [(0, 0), (0, extra)]),
                                   pos=jnp.pad(self.pos, [(0, 0), (0, extra)]))

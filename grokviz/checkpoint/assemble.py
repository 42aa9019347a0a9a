"""The parameter assembler: a grokviz param pytree built from (name, layer, tensor) triples as a loader reads them.

Every loader (release pickles, converted safetensors) streams tensors one at a time into a
:class:`ParamAssembler`, which stacks per-layer tensors into their ``[layer, ...]`` buffers (on the host, or
straight onto their shards of a mesh) and checks that every (parameter, layer) arrived exactly once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..config import GrokConfig
from ..params import Int8Weight, shapes_dict
from ..sharding import TOP_LEVEL, base_spec, fit_spec
from .release import dequantize_np


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer_fn(sharding):
    def set_layer(buf, value, layer):
        return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), layer, 0)

    return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


class _Stack:
    """One stacked [layer, ...] array being filled one layer at a time (host buffer, or sharded on a mesh)."""

    def __init__(self, name, shape, dtype, mesh):
        self.name, self.shape, self.dtype, self.mesh = name, tuple(shape), np.dtype(dtype), mesh
        if mesh is None:
            self.buf = np.empty(self.shape, self.dtype)
        else:
            spec = fit_spec(base_spec(name), self.shape, mesh)
            self.sharding = NamedSharding(mesh, spec)
            self.slice_sharding = NamedSharding(mesh, P(*spec[1:]))
            self.buf = _zeros_fn(self.shape, self.dtype, self.sharding)()
        self.filled = set()

    def put(self, layer: int, value: np.ndarray):
        if self.mesh is None:
            self.buf[layer] = value
        else:
            v = jax.device_put(np.asarray(value), self.slice_sharding)
            self.buf = _set_layer_fn(self.sharding)(self.buf, v, np.int32(layer))
        self.filled.add(layer)

    def finish(self):
        return jnp.asarray(self.buf) if self.mesh is None else self.buf


class ParamAssembler:
    """Builds a grokviz param pytree from per-layer tensors arriving in any order, one at a time.

    ``quantized=True`` keeps int8 tensors as :class:`Int8Weight` (scales in their stored dtype); otherwise they are
    dequantised exactly in fp32 and cast to ``dtype``. Plain tensors are cast to ``dtype``. With a ``mesh`` every
    tensor is sent straight to its shards (the stacked buffers are sharded device arrays updated in place), so
    host memory holds one tensor at a time.
    """

    def __init__(self, cfg: GrokConfig, *, dtype=jnp.float32, quantized: bool = True, mesh: Mesh | None = None):
        self.cfg, self.dtype, self.quantized, self.mesh = cfg, np.dtype(dtype), quantized, mesh
        self.shapes = shapes_dict(cfg)
        self.top: dict = {}
        self.stacks: dict[str, object] = {}
        self.kind: dict[str, tuple] = {}

    def _place_top(self, name, value):
        value = np.asarray(value).astype(self.dtype)
        if self.mesh is None:
            return jnp.asarray(value)
        return jax.device_put(value, NamedSharding(self.mesh, fit_spec(base_spec(name), value.shape, self.mesh)))

    def put(self, name: str, layer: int | None, value, where: str = ""):
        if isinstance(value, Int8Weight) and not self.quantized:
            value = dequantize_np(value, np.float32)
        if layer is None:
            self.top[name] = self._place_top(name, value)
            return
        L = self.cfg.num_layers
        if isinstance(value, Int8Weight):
            kind = ("int8", tuple(value.scales.shape), np.dtype(value.scales.dtype))
        else:
            kind = ("plain",)
        if name not in self.kind:
            self.kind[name] = kind
            if kind[0] == "int8":
                self.stacks[name] = (_Stack(name, (L, *value.weight.shape), np.int8, self.mesh),
                                     _Stack(name, (L, *kind[1]), kind[2], self.mesh))
            else:
                self.stacks[name] = _Stack(name, (L, *value.shape), self.dtype, self.mesh)
        elif self.kind[name] != kind:
            raise ValueError(f"{where}: {name} layer {layer} is stored as {kind} but earlier layers as "
                             f"{self.kind[name]}; all layers of a parameter must be stored alike")
        if kind[0] == "int8":
            self.stacks[name][0].put(layer, value.weight)
            self.stacks[name][1].put(layer, value.scales)
        else:
            self.stacks[name].put(layer, np.asarray(value).astype(self.dtype))

    def finish(self) -> dict:
        blocks = {}
        for name in self.shapes["blocks"]:
            if name not in self.stacks:
                raise ValueError(f"parameter {name!r} was never loaded")
            st = self.stacks[name]
            first = st[0] if isinstance(st, tuple) else st
            missing = sorted(set(range(self.cfg.num_layers)) - first.filled)
            if missing:
                raise ValueError(f"parameter {name!r} is missing layers {missing}")
            blocks[name] = (Int8Weight(weight=st[0].finish(), scales=st[1].finish()) if isinstance(st, tuple)
                            else st.finish())
        for name in TOP_LEVEL:
            if name not in self.top:
                raise ValueError(f"parameter {name!r} was never loaded")
        return {"embed": self.top["embed"], "final_norm": self.top["final_norm"], "blocks": blocks}



"""The parameter assembler: a grokviz param pytree built from (name, layer, tensor) triples as a loader reads them.

Every loader (release pickles, converted safetensors) streams tensors one at a time into a
:class:`ParamAssembler`, which stacks per-layer tensors into their ``[layer, ...]`` buffers (on the host, or
straight onto their shards of a mesh) and checks that every (parameter, layer) arrived exactly once, with exactly
the shape the config expects (a tensor is never broadcast into its buffer) and a dtype its role allows (int8
weights with float scales, float plain tensors). Errors name the source (file and tensor), the got and the
expected.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import GrokConfig
from ..params import DENSE_LEAVES, MOE_LEAVES, Int8Weight, shapes_dict
from ..sharding import TOP_LEVEL, base_spec, fit_spec
from .release import CheckpointError, dequantize_np


def _is_float(dt) -> bool:
    dt = np.dtype(dt)
    return np.issubdtype(dt, np.floating) or dt == np.dtype(jnp.bfloat16)


#: XLA's CPU client adopts a host buffer aligned to this many bytes without copying it (``jax.device_put``)
_ALIGN = 64


def host_buffer(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is aligned to :data:`_ALIGN` bytes, so that
    :func:`to_device` hands it to a CPU device without a copy (``np.empty`` only guarantees 16 bytes)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def to_device(value, dtype=None):
    """``value`` as a jax array on the default device, copied once: into an aligned host buffer (converting to
    ``dtype`` on the way, straight from a memory map), which the CPU device then adopts as it is. ``jnp.asarray``
    of a numpy array makes a second, device-side copy, so the host buffer and the array coexisted: a loaded
    model's peak memory was twice its weights."""
    value = np.asarray(value)
    buf = host_buffer(value.shape, value.dtype if dtype is None else dtype)
    buf[...] = value
    return jax.device_put(buf, may_alias=True)


@functools.cache
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.cache
def _set_layer_fn(sharding):
    def set_layer(buf, value, layer):
        return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), layer, 0)

    return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


class _Stack:
    """One stacked [layer, ...] array being filled one layer at a time (host buffer, or sharded on a mesh)."""

    def __init__(self, name, shape, dtype, mesh):
        self.name, self.shape, self.dtype, self.mesh = name, tuple(shape), np.dtype(dtype), mesh
        if mesh is None:
            self.buf = host_buffer(self.shape, self.dtype)
        else:
            spec = fit_spec(base_spec(name), self.shape, mesh)
            self.sharding = NamedSharding(mesh, spec)
            self.slice_sharding = NamedSharding(mesh, P(*spec[1:]))
            self.buf = _zeros_fn(self.shape, self.dtype, self.sharding)()
        self.filled = set()

    def put(self, layer: int, value: np.ndarray):
        if tuple(value.shape) != self.shape[1:]:  # the caller checks; never let numpy broadcast
            raise CheckpointError(f"{self.name} layer {layer}: shape {tuple(value.shape)}, buffer expects "
                                  f"{self.shape[1:]}")
        if self.mesh is None:
            self.buf[layer] = value  # converts to the buffer's dtype while copying (no temporary)
        else:
            v = jax.device_put(np.asarray(value), self.slice_sharding)
            self.buf = _set_layer_fn(self.sharding)(self.buf, v, np.int32(layer))
        self.filled.add(layer)

    def finish(self):
        """The stacked array. Host buffers are adopted by a CPU device without a copy (and dropped here, so that
        nothing can write into the returned array); other devices copy them once."""
        if self.mesh is None and isinstance(self.buf, np.ndarray):
            self.buf = jax.device_put(self.buf, may_alias=True)
        return self.buf


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

    def _place(self, name, value):
        if self.mesh is None:
            return to_device(value)
        return jax.device_put(value, NamedSharding(self.mesh, fit_spec(base_spec(name), value.shape, self.mesh)))

    def _place_top(self, name, value):
        if isinstance(value, Int8Weight):
            return Int8Weight(weight=self._place(name, np.asarray(value.weight)),
                              scales=self._place(name, np.asarray(value.scales)))
        if self.mesh is None:
            return to_device(value, self.dtype)
        return self._place(name, np.asarray(value).astype(self.dtype, copy=False))

    def _check(self, name: str, layer, value, where: str):
        """Exact shape (and dtype role) of one tensor against the config; raises naming source, got, expected."""
        src = f"{where}: " if where else ""
        if name in TOP_LEVEL and name in self.shapes:
            if layer is not None:
                raise CheckpointError(f"{src}{name} is a top-level parameter but came with layer {layer}")
            want = tuple(self.shapes[name])
        elif name in self.shapes["blocks"]:
            layers = self._layers_of(name)
            if layer is None or layer not in layers:
                kind = {"moe": "MoE ", "dense": "dense "}.get(self._kind_of(name), "")
                raise CheckpointError(f"{src}{name} layer {layer} is not one of the config's {kind}layers "
                                      f"{_ranges(layers)}")
            want = tuple(self.shapes["blocks"][name][1:])
        else:
            known = [*(n for n in TOP_LEVEL if n in self.shapes), *self.shapes["blocks"]]
            raise CheckpointError(f"{src}unknown parameter {name!r} (known: {', '.join(known)})")
        label = name if layer is None else f"{name} layer {layer}"
        if isinstance(value, Int8Weight):
            w, sc = value.weight, value.scales
            if tuple(w.shape) != want:
                raise CheckpointError(f"{src}{label}: int8 weight has shape {tuple(w.shape)}, config "
                                      f"{self.cfg.name!r} expects {want}")
            if np.dtype(w.dtype) != np.int8:
                raise CheckpointError(f"{src}{label}: quantised weight has dtype {np.dtype(w.dtype)}, expected int8")
            if not _is_float(sc.dtype):
                raise CheckpointError(f"{src}{label}: quantisation scales have dtype {np.dtype(sc.dtype)}, "
                                      f"expected a float type")
            ok = (len(want) >= 2 and sc.ndim == len(want) and tuple(sc.shape[:-2]) == want[:-2]
                  and sc.shape[-1] == want[-1] and sc.shape[-2] > 0 and want[-2] % sc.shape[-2] == 0)
            if not ok:
                raise CheckpointError(f"{src}{label}: scales of shape {tuple(sc.shape)} do not fit an int8 weight "
                                      f"of shape {want} (expected [..., blocks, {want[-1] if want else '?'}] with "
                                      f"blocks dividing {want[-2] if len(want) >= 2 else '?'})")
            return
        shape = tuple(getattr(value, "shape", ()))
        if shape != want:
            raise CheckpointError(f"{src}{label}: shape {shape}, config {self.cfg.name!r} expects {want}")
        dt = np.dtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype)
        if not _is_float(dt):
            raise CheckpointError(f"{src}{label}: dtype {dt}, expected a float type")

    @staticmethod
    def _kind_of(name: str) -> str:
        return "moe" if name in MOE_LEAVES else "dense" if name in DENSE_LEAVES else "all"

    def _layers_of(self, name: str) -> tuple[int, ...]:
        """The model layers a per-layer leaf has a slot for, in slot order (MoE leaves: the MoE layers only)."""
        kind = self._kind_of(name)
        if kind == "moe":
            return self.cfg.moe_layer_ids
        if kind == "dense":
            return self.cfg.dense_layer_ids
        return tuple(range(self.cfg.num_layers))

    def put(self, name: str, layer: int | None, value, where: str = ""):
        """One tensor. ``layer``: the model layer number (None for top-level leaves); MoE and dense-MLP leaves are
        stacked over their own layers (see :func:`grokviz.params.shapes_dict`)."""
        self._check(name, layer, value, where)
        if isinstance(value, Int8Weight) and not self.quantized:
            value = dequantize_np(value, np.float32)
        if layer is None:
            if name in self.top:
                raise CheckpointError(f"{where}: {name} arrived twice")
            self.top[name] = self._place_top(name, value)
            return
        L = len(self._layers_of(name))
        slot = self._layers_of(name).index(layer)
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
            raise CheckpointError(f"{where}: {name} layer {layer} is stored as {kind} but earlier layers as "
                                  f"{self.kind[name]}; all layers of a parameter must be stored alike")
        st = self.stacks[name]
        if slot in (st[0] if isinstance(st, tuple) else st).filled:
            raise CheckpointError(f"{where}: {name} layer {layer} arrived twice")
        if kind[0] == "int8":
            st[0].put(slot, value.weight)
            st[1].put(slot, value.scales)
        else:
            st.put(slot, np.asarray(value))  # _Stack.put converts to its dtype as it copies

    def finish(self) -> dict:
        blocks = {}
        for name in self.shapes["blocks"]:
            if name not in self.stacks:
                raise CheckpointError(f"parameter {name!r} was never loaded")
            st = self.stacks[name]
            first = st[0] if isinstance(st, tuple) else st
            layers = self._layers_of(name)
            missing = [layers[i] for i in sorted(set(range(len(layers))) - first.filled)]
            if missing:
                raise CheckpointError(f"parameter {name!r} is missing layers {missing}")
            blocks[name] = (Int8Weight(weight=st[0].finish(), scales=st[1].finish()) if isinstance(st, tuple)
                            else st.finish())
        top = [n for n in TOP_LEVEL if n in self.shapes]
        for name in top:
            if name not in self.top:
                raise CheckpointError(f"parameter {name!r} was never loaded")
        return {**{n: self.top[n] for n in top}, "blocks": blocks}


def _ranges(layers) -> str:
    """``(0, 1, 2, 5)`` -> ``'0-2, 5'`` (for error messages)."""
    out, run = [], []
    for i in layers:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out) or "(none)"



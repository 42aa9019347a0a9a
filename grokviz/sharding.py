"""Sharding grokviz params over a ``("data", "model")`` device mesh, as the Grok-1 reference does
(docs/grok1.md#sharding).

The reference's partition specs, translated to grokviz's leaf names (:mod:`grokviz.params`); per-layer leaves get
an extra leading ``None`` for the stacked layer axis (never sharded)::

    embed           [V, D]          (None, ("data", "model"))     vocab replicated, D over all devices
    final_norm, *_norm              replicated
    w_q, w_k, w_v   [D, out]        ("data", "model")             column-parallel
    w_o             [in, D]         ("model", "data")             row-parallel
    router          [D, E]          ("data", None)
    w_gate, w_up    [E, D, F]       (None, "data", "model")
    w_down          [E, F, D]       (None, "model", "data")

An :class:`~grokviz.params.Int8Weight` uses its parameter's spec for both weight and scales (as the reference
does). Any mesh shape works: a dimension that a mesh axis (or axis tuple) does not divide falls back to a single
dividing axis of the tuple, else to replicated on that dimension.

:func:`plan_memory` computes the bytes per device for a config, a mesh shape and a dtype without allocating.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import GrokConfig
from .params import NORMS, Int8Weight, shapes_dict

AXES = ("data", "model")
ALL = ("data", "model")

#: spec of each leaf without the layer axis
BASE_SPECS: dict[str, tuple] = {
    "embed": (None, ALL),
    "final_norm": (None,),
    **{n: (None,) for n in NORMS},
    "w_q": ("data", "model"), "w_k": ("data", "model"), "w_v": ("data", "model"),
    "w_o": ("model", "data"),
    "router": ("data", None),
    "w_gate": (None, "data", "model"), "w_up": (None, "data", "model"),
    "w_down": (None, "model", "data"),
    # leaves of the other families (params.shapes_dict): biases and norms follow their matrix's output axis
    "unembed": (None, ALL),
    "b_q": ("model",), "b_k": ("model",), "b_v": ("model",), "b_o": ("data",),
    "q_norm": (None,), "k_norm": (None,), "sinks": (None,),
    "router_b": (None,), "b_gate": (None, "model"), "b_up": (None, "model"), "b_down": (None, "data"),
    "s_gate": ("data", "model"), "s_up": ("data", "model"), "s_down": ("model", "data"), "s_router": ("data",),
    "mlp_gate": ("data", "model"), "mlp_up": ("data", "model"), "mlp_down": ("model", "data"),
}
TOP_LEVEL = ("embed", "final_norm", "unembed")
#: what the release quantises, and its scale row-blocks (docs/grok1.md#checkpoint)
RELEASE_SCALE_BLOCKS = {"w_q": 1, "w_k": 1, "w_v": 1, "w_o": 8, "w_gate": 1, "w_up": 1, "w_down": 8}


def make_mesh(shape: Sequence[int] = (1, 8), devices=None) -> Mesh:
    """A ``("data", "model")`` mesh of ``shape`` over ``devices`` (default: the first prod(shape) devices)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"mesh shape must be (data, model), got {shape}")
    n = math.prod(shape)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"mesh {shape} needs {n} devices but only {len(devices)} are available "
                         f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax)")
    return Mesh(np.array(devices[:n]).reshape(shape), AXES)


def _axis_sizes(mesh) -> dict[str, int]:
    if isinstance(mesh, Mesh):
        return dict(mesh.shape)
    if isinstance(mesh, dict):
        return {a: int(mesh.get(a, 1)) for a in AXES}
    data, model = mesh
    return {"data": int(data), "model": int(model)}


def _fit(entry, dim: int, sizes: dict[str, int]):
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry if dim % sizes[entry] == 0 else None
    if dim % math.prod(sizes[a] for a in entry) == 0:
        return entry
    fits = [a for a in entry if dim % sizes[a] == 0 and sizes[a] > 1]
    return max(fits, key=lambda a: sizes[a]) if fits else None


def fit_spec(base: tuple, shape: Sequence[int], mesh) -> P:
    """``base`` adapted to ``shape`` on ``mesh`` (a Mesh, {axis: size} or (data, model)): non-dividing axes dropped."""
    sizes = _axis_sizes(mesh)
    if len(base) != len(shape):
        raise ValueError(f"spec {base} has rank {len(base)} but the array has shape {tuple(shape)}")
    return P(*(_fit(e, d, sizes) for e, d in zip(base, shape)))


def base_spec(name: str, stacked: bool = True) -> tuple:
    spec = BASE_SPECS[name]
    return spec if name in TOP_LEVEL or not stacked else (None, *spec)


def leaf_spec(name: str, leaf, mesh, stacked: bool = True):
    """PartitionSpec (or Int8Weight of two specs) for the leaf ``name`` of shape ``leaf.shape``."""
    base = base_spec(name, stacked)
    if isinstance(leaf, Int8Weight):
        return Int8Weight(weight=fit_spec(base, leaf.weight.shape, mesh),
                          scales=fit_spec(base, leaf.scales.shape, mesh))
    return fit_spec(base, leaf.shape, mesh)


def param_specs(params, mesh) -> dict:
    """A pytree of PartitionSpecs matching ``params`` (Int8Weight leaves get an Int8Weight of specs)."""
    out = {n: leaf_spec(n, params[n], mesh) for n in TOP_LEVEL if n in params}
    out["blocks"] = {n: leaf_spec(n, v, mesh) for n, v in params["blocks"].items()}
    return out


def param_shardings(params, mesh: Mesh) -> dict:
    specs = param_specs(params, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh) -> dict:
    """Place an existing param pytree on ``mesh`` with the partition specs above."""
    return jax.device_put(params, param_shardings(params, mesh))


# --- memory planning ---------------------------------------------------------------------------------------

_DTYPE_BYTES = {"int8": 1, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    cfg_name: str
    mesh_shape: tuple
    dtype: str
    num_params: int
    total_bytes: int               # all devices together (replicated leaves counted once per copy)
    per_device_bytes: int          # the largest per-device share
    leaves: tuple                  # (name, shape, dtype, spec, bytes per device)

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape)

    def table(self) -> str:
        gb = 1e9
        lines = [f"memory plan: {self.cfg_name}, weights {self.dtype}, mesh (data, model) = {self.mesh_shape} "
                 f"({self.num_devices} devices)",
                 f"  parameters {self.num_params:,}; parameter bytes per device {self.per_device_bytes / gb:.2f} GB "
                 f"({self.per_device_bytes / 2**30:.2f} GiB); all devices {self.total_bytes / gb:.2f} GB",
                 f"  {'leaf':<24}{'shape':<26}{'dtype':<8}{'spec':<38}{'per device':>14}"]
        for name, shape, dt, spec, b in self.leaves:
            lines.append(f"  {name:<24}{str(list(shape)):<26}{dt:<8}{str(spec):<38}{b / gb:>11.3f} GB")
        lines.append("  (parameters only: activations, KV cache and compiler workspace come on top)")
        return "\n".join(lines)


def plan_memory(cfg: GrokConfig, mesh_shape: Sequence[int] = (1, 8), dtype: str = "int8", *,
                plain_dtype: str = "fp32", scale_blocks: dict | None = None) -> MemoryPlan:
    """Bytes per device of ``cfg``'s parameters on a (data, model) mesh, computed from shapes only.

    ``dtype="int8"``: the release's quantised matrices as int8 + bf16 scales (``scale_blocks`` row blocks, default
    the release's), the other leaves in ``plain_dtype`` (the release keeps them fp32). ``"bf16"``/``"fp32"``:
    every leaf in that dtype.
    """
    dtype = dtype.lower()
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    sizes = _axis_sizes(tuple(mesh_shape))
    n_dev = sizes["data"] * sizes["model"]
    blocks = scale_blocks or RELEASE_SCALE_BLOCKS
    shapes = shapes_dict(cfg)
    items = [(n, shapes[n], None) for n in TOP_LEVEL if n in shapes]
    items += [(n, s, None) for n, s in shapes["blocks"].items()]
    leaves, per_dev, total, nparams = [], 0, 0, 0

    def add(label, name, shape, nbytes_per_elt, dt):
        nonlocal per_dev, total
        spec = fit_spec(base_spec(name), shape, sizes)
        split = 1
        for e in spec:
            if e is not None:
                split *= math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e))
        b = int(np.prod(shape, dtype=np.int64)) * nbytes_per_elt
        leaves.append((label, tuple(shape), dt, spec, b // split))
        per_dev += b // split
        total += (b // split) * n_dev

    for name, shape, _ in items:
        nparams += int(np.prod(shape, dtype=np.int64))
        if dtype == "int8" and name in blocks:
            add(name, name, shape, 1, "int8")
            nb = blocks[name] if shape[-2] % blocks[name] == 0 else 1
            add(name + ".scales", name, (*shape[:-2], nb, shape[-1]), 2, "bf16")
        else:
            dt = plain_dtype if dtype == "int8" else dtype
            add(name, name, shape, _DTYPE_BYTES[dt], dt)
    return MemoryPlan(cfg.name, tuple(int(s) for s in mesh_shape), dtype, nparams, total, per_dev, tuple(leaves))


# --- hosts x devices ---------------------------------------------------------------------------------------

def host_plan(plan: MemoryPlan, hosts: int) -> dict:
    """Per-host figures of ``plan`` when its ``data`` axis spans ``hosts`` processes (as
    :func:`grokviz.distributed.global_mesh` lays it out: each host holds a contiguous 1/hosts of the data axis and
    the whole model axis). ``read_bytes``: checkpoint bytes each host reads when it reads only its devices'
    shards (:mod:`grokviz.distributed.sharded`): 1/hosts of every leaf split over ``data``, all of the others."""
    data, model = plan.mesh_shape
    if hosts < 1 or data % hosts:
        raise ValueError(f"the data axis ({data}) must be a multiple of the number of hosts ({hosts}); use a mesh "
                         f"of {hosts * max(data // hosts, 1)} x N")
    per_host_devices = plan.num_devices // hosts
    read = 0
    for _, shape, dt, spec, _ in plan.leaves:
        b = int(np.prod(shape, dtype=np.int64)) * _DTYPE_BYTES[dt]
        axes = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
        read += b // hosts if "data" in axes and hosts > 1 else b
    return {"hosts": hosts, "devices_per_host": per_host_devices,
            "host_bytes": plan.per_device_bytes * per_host_devices, "read_bytes": read,
            "checkpoint_bytes": sum(int(np.prod(s, dtype=np.int64)) * _DTYPE_BYTES[d] for _, s, d, _, _ in
                                    plan.leaves)}


def host_table(plan: MemoryPlan, hosts: int) -> str:
    h = host_plan(plan, hosts)
    gb = 1e9
    return "\n".join([
        f"hosts x devices: {h['hosts']} x {h['devices_per_host']} (the data axis spans hosts, the model axis stays "
        f"inside each)",
        f"  per device {plan.per_device_bytes / gb:.2f} GB; per host {h['host_bytes'] / gb:.2f} GB of device memory "
        f"for parameters",
        f"  each host reads {h['read_bytes'] / gb:.2f} GB of the {h['checkpoint_bytes'] / gb:.2f} GB of tensors "
        f"(only its devices' shards; grokviz.distributed.sharded)"])

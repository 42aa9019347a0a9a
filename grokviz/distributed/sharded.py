"""Parameters loaded so that each process reads only the bytes of the shards its own devices hold.

``load_converted(path, mesh)`` opens a converted checkpoint (grokviz safetensors: :mod:`grokviz.checkpoint.converted`)
and places every leaf with ``jax.make_array_from_callback`` on ``mesh`` with the partition specs of
:mod:`grokviz.sharding`. JAX calls the callback only for this process's devices; the callback reads exactly the
byte ranges of that device's block (``os.pread`` of each contiguous run of the row-major tensor), once per
distinct block even when several local devices hold the same replica. :class:`ReadStats` reports the bytes read.

On a ``(data, model)`` mesh made by :func:`grokviz.distributed.global_mesh`, the data axis spans processes: a
leaf split over ``data`` (most of the weights, docs/grok1.md#sharding) is read half by each of 2 processes,
replicated leaves (norms) by every process. Headers and the index are validated as for a single-process load
(:func:`grokviz.checkpoint.converted.read_index`, :func:`~grokviz.checkpoint.safetensors_io.read_safetensors_header`);
shapes are checked against the config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["ReadStats", "load_converted", "load_hf"]


@dataclasses.dataclass
class ReadStats:
    bytes_read: int = 0        # bytes this process read from tensor data
    tensor_bytes: int = 0      # bytes of all tensor data in the checkpoint
    reads: int = 0             # pread calls

    @property
    def fraction(self) -> float:
        return self.bytes_read / max(self.tensor_bytes, 1)

    def __str__(self):
        return (f"read {self.bytes_read:,} of {self.tensor_bytes:,} tensor bytes ({100 * self.fraction:.1f} %) "
                f"in {self.reads:,} reads")


class _Reader:
    def __init__(self, path: Path, wm: dict | None = None, headers: dict | None = None):
        from ..checkpoint.converted import read_index
        from ..checkpoint.safetensors_io import read_safetensors_header

        self.path = path
        self.wm = read_index(path)["weight_map"] if wm is None else wm
        self.headers = headers if headers is not None else {s: read_safetensors_header(path / s)
                                                             for s in sorted(set(self.wm.values()))}
        self.fds = {s: os.open(path / s, os.O_RDONLY) for s in self.headers}
        self.stats = ReadStats(tensor_bytes=sum(e["data_offsets"][1] - e["data_offsets"][0]
                                                for ents, _ in self.headers.values() for e in ents.values()))

    def close(self):
        for fd in self.fds.values():
            os.close(fd)

    def entry(self, key):
        if key not in self.wm:
            raise ValueError(f"{self.path}: tensor {key} is not in the index")
        s = self.wm[key]
        ents, start = self.headers[s]
        return s, ents[key], start

    def block(self, key: str, index: tuple) -> np.ndarray:
        """The sub-array ``tensor[index]`` (a tuple of slices), reading only its bytes."""
        s, e, start = self.entry(key)
        shape, dt = e["shape"], e["np_dtype"]
        sl = [range(*ix.indices(d)) for ix, d in zip(index, shape)]
        if any(r.step != 1 for r in sl):
            raise ValueError(f"strided shard index {index} for {key}")
        lo = [r.start for r in sl]
        ext = [len(r) for r in sl]
        out = np.empty(ext, dt)
        if 0 in ext:
            return out
        k = len(shape) - 1  # the last axis whose slice is partial: runs are contiguous from there on
        while k > 0 and ext[k] == shape[k]:
            k -= 1
        run = ext[k] * math.prod(shape[k + 1:]) * dt.itemsize
        strides = [math.prod(shape[i + 1:]) * dt.itemsize for i in range(len(shape))]
        flat = out.reshape(-1).view(np.uint8)
        base = start + e["data_offsets"][0]
        for n, idx in enumerate(np.ndindex(*ext[:k])):
            off = base + sum((lo[i] + idx[i]) * strides[i] for i in range(k)) + lo[k] * strides[k]
            got = os.pread(self.fds[s], run, off)
            if len(got) != run:
                raise ValueError(f"{self.path / s}: short read of tensor {key} (truncated file?)")
            flat[n * run:(n + 1) * run] = np.frombuffer(got, np.uint8)
            self.stats.bytes_read += run
            self.stats.reads += 1
        return out


def _stored_kind(reader: _Reader, name: str, layer):
    base = name if layer is None else f"layers.{layer}.{name}"
    if base in reader.wm:
        return "plain", base
    if f"{base}.weight" in reader.wm and f"{base}.scales" in reader.wm:
        return "int8", base
    raise ValueError(f"{reader.path}: tensor {base} (or its .weight/.scales) is missing")


def _global(reader, keys, full_shape, stored_shape, cast, sharding, what):
    """A global array of ``full_shape`` = (len(keys), *stored_shape) (or stored_shape when keys is one str)."""
    import jax

    for key in ([keys] if isinstance(keys, str) else keys):
        got = reader.entry(key)[1]["shape"]
        if tuple(got) != tuple(stored_shape):
            raise ValueError(f"{reader.path}: tensor {key} has shape {list(got)}, the config needs "
                             f"{list(stored_shape)} ({what})")
    cache: dict = {}

    def cb(index):
        sig = tuple(ix.indices(d)[:2] for ix, d in zip(index, full_shape))
        if sig not in cache:  # local devices holding the same block share one read
            if isinstance(keys, str):
                cache[sig] = reader.block(keys, index)
            else:
                layers = range(*index[0].indices(len(keys)))
                cache[sig] = np.stack([reader.block(keys[i], index[1:]) for i in layers]) if len(layers) else \
                    np.empty((0, *[len(range(*ix.indices(d))) for ix, d in zip(index[1:], stored_shape)]))
            if cast is not None:
                cache[sig] = cache[sig].astype(cast, copy=False)
        return cache[sig]

    return jax.make_array_from_callback(tuple(full_shape), sharding, cb)


def load_converted(path, mesh, *, dtype=np.float32, tokenizer=None):
    """(Model, ReadStats): a converted checkpoint placed on ``mesh`` reading only this process's shards.
    Float tensors are cast to ``dtype`` (as :func:`grokviz.load` does); int8 weights stay int8 with their
    scales (:class:`~grokviz.params.Int8Weight`)."""
    from jax.sharding import NamedSharding

    from ..api import Model
    from ..checkpoint.assemble import _is_float
    from ..checkpoint.converted import leaf_layers, read_config
    from ..params import Int8Weight, shapes_dict
    from ..sharding import TOP_LEVEL, base_spec, fit_spec

    path = Path(path)
    cfg = read_config(path)
    shapes = shapes_dict(cfg)
    reader = _Reader(path)
    dtype = np.dtype(dtype)

    def place(name, keys, layer_shape, stacked):
        full = (len(keys), *layer_shape) if stacked else tuple(layer_shape)
        dt = reader.entry(keys[0] if stacked else keys)[1]["np_dtype"]
        cast = dtype if _is_float(dt) and dt != np.int8 else None
        sh = NamedSharding(mesh, fit_spec(base_spec(name, stacked), full, mesh))
        return _global(reader, keys, full, layer_shape, cast, sh, name)

    def leaf(name, layers, shape):
        stacked = layers is not None
        first = layers[0] if stacked else None
        kind, _ = _stored_kind(reader, name, first)
        names = [f"layers.{i}.{name}" for i in layers] if stacked else name
        per_layer = tuple(shape[1:]) if stacked else tuple(shape)
        if kind == "plain":
            return place(name, names, per_layer, stacked)
        w_keys = [f"{n}.weight" for n in names] if stacked else f"{names}.weight"
        s_keys = [f"{n}.scales" for n in names] if stacked else f"{names}.scales"
        s_shape = reader.entry(s_keys[0] if stacked else s_keys)[1]["shape"]
        w = place(name, w_keys, per_layer, stacked)
        full_s = (len(layers), *s_shape) if stacked else tuple(s_shape)
        sh = NamedSharding(mesh, fit_spec(base_spec(name, stacked), full_s, mesh))
        return Int8Weight(weight=w, scales=_global(reader, s_keys, full_s, s_shape, None, sh, name + ".scales"))

    try:
        params = {n: leaf(n, None, shapes[n]) for n in TOP_LEVEL if n in shapes}
        params["blocks"] = {n: leaf(n, leaf_layers(n, cfg), s) for n, s in shapes["blocks"].items()}
    finally:
        reader.close()
    if tokenizer is None:
        from ..loading import _tokenizer

        tok = path / "tokenizer.model"
        tokenizer = _tokenizer(None, tok if tok.is_file() else None)
    return Model(cfg, params, tokenizer or None), reader.stats


# --- Hugging Face folders ----------------------------------------------------------------------------------

def _hf_block(reader: _Reader, name: str, op: str, idx: tuple, stored: tuple) -> np.ndarray:
    """``OPS[op][0](tensor)[idx]`` reading only the source bytes it needs (grokviz.checkpoint.hf_names.OPS)."""
    if op == "copy":
        return reader.block(name, idx)
    if op == "row":
        return reader.block(name, (slice(0, 1), *idx))[0]
    if op == "T":
        return np.swapaxes(reader.block(name, (*idx[:-2], idx[-1], idx[-2])), -1, -2)
    if op in ("half0T", "half1T"):
        off = 0 if op == "half0T" else stored[-2] // 2
        r = range(*idx[-1].indices(stored[-2] // 2))
        return np.swapaxes(reader.block(name, (*idx[:-2], slice(r.start + off, r.stop + off), idx[-2])), -1, -2)
    if op in ("even", "odd"):
        r = range(*idx[-1].indices(stored[-1] // 2))
        got = reader.block(name, (*idx[:-1], slice(2 * r.start, 2 * r.stop)))
        return got[..., 0::2] if op == "even" else got[..., 1::2]
    raise ValueError(f"unknown tensor op {op!r}")


def load_hf(path, mesh, *, dtype=None):
    """(Model, ReadStats): a Hugging Face folder (:mod:`grokviz.checkpoint.hf`) placed on ``mesh``, each process
    reading only the source bytes of its devices' blocks through the family's name table (transposes, fused
    splits, per-expert stacking). Values keep the stored dtype unless ``dtype`` is given, as ``gv.load`` does.
    MXFP4 expert weights are not supported here (use ``gv.load``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from ..api import Model
    from ..checkpoint.hf import HFFolder
    from ..params import shapes_dict
    from ..sharding import TOP_LEVEL, base_spec, fit_spec

    hf = HFFolder(path)
    if hf.mxfp4:
        raise ValueError(f"{path}: MXFP4 expert weights cannot be read shard by shard; load with gv.load")
    cfg = hf.cfg
    dt = hf.dtype if dtype is None else np.dtype(jnp.dtype(dtype))
    reader = _Reader(Path(path), hf.files, hf.headers)
    src: dict = {}  # (leaf, layer, expert) -> (tensor, op, stored shape)
    for name, t in hf.want.items():
        for leaf, op, _ in t.leaves:
            src[(leaf, t.layer, t.expert)] = (name, op, tuple(reader.entry(name)[1]["shape"]))
    shapes = shapes_dict(cfg)

    def leaf_array(name, full, stacked):
        from ..checkpoint.converted import leaf_layers

        layers = leaf_layers(name, cfg) if stacked else (None,)
        per_expert = (name, layers[0], 0) in src

        def read(layer, idx):
            if per_expert:  # idx[0] runs over experts
                es = range(*idx[0].indices(cfg.num_experts))
                return np.stack([_hf_block(reader, *src[(name, layer, e)][:2], idx[1:], src[(name, layer, e)][2])
                                 for e in es]) if len(es) else None
            tensor, op, stored = src[(name, layer, None)]
            return _hf_block(reader, tensor, op, idx, stored)

        cache: dict = {}

        def cb(index):
            sig = tuple(ix.indices(d)[:2] for ix, d in zip(index, full))
            if sig not in cache:
                if stacked:
                    ls = range(*index[0].indices(len(layers)))
                    cache[sig] = np.stack([read(layers[i], index[1:]) for i in ls]).astype(dt, copy=False)
                else:
                    cache[sig] = read(None, index).astype(dt, copy=False)
            return cache[sig]

        return jax.make_array_from_callback(full, NamedSharding(mesh, fit_spec(base_spec(name, stacked), full, mesh)),
                                            cb)

    try:
        params = {n: leaf_array(n, tuple(shapes[n]), False) for n in TOP_LEVEL if n in shapes}
        params["blocks"] = {n: leaf_array(n, tuple(s), True) for n, s in shapes["blocks"].items()}
    finally:
        reader.close()
    tok = None
    if hf.tokenizer is not None:
        from ..hf_tokenizer import HFTokenizer

        tok = HFTokenizer(hf.tokenizer)
    return Model(cfg, params, tok), reader.stats

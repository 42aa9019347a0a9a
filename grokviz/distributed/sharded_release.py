"""The Grok-1 release checkpoint (pickles) placed on a mesh, each process reading only its devices' shards.

Every process validates the directory as :func:`grokviz.load` does (:func:`~grokviz.checkpoint.release.scan_release`:
file set and sizes) and parses every file's pickle without reading its payloads
(:func:`~grokviz.checkpoint.release.read_layout`: the whole loader's opcode pre-scan, inert globals and
checks, so a truncated, corrupt or hostile file is refused with the same error and nothing in it is executed), which
gives each array's shape, dtype and file offset. Every leaf is then placed with ``jax.make_array_from_callback``
(:func:`.sharded.from_blocks`) on the partition specs of :mod:`grokviz.sharding`; a device's block is read with one
``pread`` per contiguous run of the row-major payload (:func:`~grokviz.checkpoint.release_shards.read_block`).

``quantized=True`` (default) keeps the int8 weights with their scales (:class:`~grokviz.params.Int8Weight`, each
sharded as ``gv.load(mesh=...)`` shards it); ``quantized=False`` dequantises each block on the host exactly as the
whole loader does (fp32 product of the int8 weight and its block's scale, then a cast to ``dtype``), reading only the
scale rows the block's weight rows use. Plain tensors are cast to ``dtype``. The result equals ``gv.load(path,
config=..., quantized=..., mesh=mesh)`` on every device, bit for bit.
"""

from __future__ import annotations

import os

import numpy as np

from .shard_io import ReadStats, from_blocks


def _kind(value):
    from ..params import Int8Weight

    if isinstance(value, Int8Weight):
        return ("int8", tuple(value.scales.shape), np.dtype(value.scales.dtype))
    return ("plain", np.dtype(value.dtype))


def _stack(entries, values, name, layers):
    """The per-layer values of leaf ``name`` in slot order; every layer once, all stored alike."""
    from ..checkpoint.release import CheckpointError

    by_layer = {}
    for e, v in zip(entries, values):
        if e.name == name:
            if e.layer in by_layer:
                raise CheckpointError(f"{e.file}: {name} layer {e.layer} arrived twice")
            by_layer[e.layer] = (e, v)
    missing = [i for i in layers if i not in by_layer]
    if missing:
        raise CheckpointError(f"parameter {name!r} is missing layers {missing}")
    first = by_layer[layers[0]]
    for i in layers[1:]:
        e, v = by_layer[i]
        if _kind(v) != _kind(first[1]):
            raise CheckpointError(f"{e.file}: {name} layer {i} is stored as {_kind(v)} but earlier layers as "
                                  f"{_kind(first[1])}; all layers of a parameter must be stored alike")
    return [by_layer[i] for i in layers]


def _dequantized_block(fd, w, s, index, counter, what):
    """``dequantize_np(Int8Weight(w, s))[index]`` reading only the weight block and the scale rows it uses."""
    from ..checkpoint.release_shards import layout_block

    rows, nb = w.shape[-2], s.shape[-2]
    per = rows // nb
    r = range(*index[-2].indices(rows))
    q = layout_block(fd, w, index, counter, what)
    if len(r) == 0 or q.size == 0:
        return np.zeros(q.shape, np.float32)
    b0, b1 = r.start // per, (r.stop - 1) // per + 1
    sc = layout_block(fd, s, (*index[:-2], slice(b0, b1), index[-1]), counter, what + " scales")
    which = (np.arange(r.start, r.stop) // per) - b0  # the scale row of each weight row
    return q.astype(np.float32) * sc.astype(np.float32)[..., which, :]


def load_release(path, mesh, *, config=None, dtype=np.float32, quantized: bool = True, host: int = 0,
                 tokenizer=None):
    """(Model, ReadStats): a release checkpoint placed on ``mesh``, this process reading only its shards (see the
    module docstring). ``config``: as :func:`grokviz.load` takes it (default: Grok-1 if the shapes are Grok-1's)."""
    from jax.sharding import NamedSharding

    from ..api import Model
    from ..checkpoint import release as rl
    from ..checkpoint.config_io import resolve_release_config
    from ..checkpoint.converted import find_sibling_tokenizer, leaf_layers
    from ..checkpoint.release import read_layout
    from ..checkpoint.release_shards import ReadCounter, layout_block
    from ..params import Int8Weight, shapes_dict
    from ..sharding import TOP_LEVEL, base_spec, fit_spec

    cfg = resolve_release_config(path, config)
    entries = rl.scan_release(path, cfg, host=host)
    layouts = [read_layout(e.file, e.ref_path) for e in entries]
    values = [rl.check_tensor(lay.value, e) for lay, e in zip(layouts, entries)]
    counter = ReadCounter()
    dtype = np.dtype(dtype)

    def arrays(v):
        return (v.weight, v.scales) if isinstance(v, Int8Weight) else (v,)

    stats = ReadStats(tensor_bytes=sum(math_nbytes(a) for v in values for a in arrays(v)),
                      header_bytes=sum(lay.header_bytes for lay in layouts),
                      file_bytes=sum(e.file.stat().st_size for e in entries))

    def place(name, items, stacked, part):
        """One global array: ``part`` of each (entry, value) in ``items`` (one per layer when stacked)."""
        v0 = items[0][1]
        if part == "deq":
            per = tuple(v0.shape)
        else:
            per = tuple((getattr(v0, part) if part != "plain" else v0).shape)
        full = (len(items), *per) if stacked else per
        sh = NamedSharding(mesh, fit_spec(base_spec(name), full, mesh))

        def one(e, v, idx):
            what = f"{e.file} ({e.ref_path})"
            fd = os.open(e.file, os.O_RDONLY)
            try:
                if part == "deq":
                    return _dequantized_block(fd, v.weight, v.scales, idx, counter, what).astype(dtype, copy=False)
                got = layout_block(fd, getattr(v, part) if part != "plain" else v, idx, counter, what)
                return got.astype(dtype, copy=False) if part == "plain" else got
            finally:
                os.close(fd)

        def read(index):
            if not stacked:
                return one(*items[0], index)
            ls = range(*index[0].indices(len(items)))
            return np.stack([one(*items[i], index[1:]) for i in ls])

        return from_blocks(full, sh, read)

    def leaf(name, items, stacked):
        v0 = items[0][1]
        if not isinstance(v0, Int8Weight):
            return place(name, items, stacked, "plain")
        if not quantized:
            return place(name, items, stacked, "deq")
        return Int8Weight(weight=place(name, items, stacked, "weight"), scales=place(name, items, stacked, "scales"))

    shapes = shapes_dict(cfg)
    params = {}
    for name in TOP_LEVEL:
        if name in shapes:
            items = [(e, v) for e, v in zip(entries, values) if e.name == name and e.layer is None]
            if len(items) != 1:
                raise rl.CheckpointError(f"{path}: parameter {name!r} " + ("was never loaded" if not items else
                                                                           "arrived twice"))
            params[name] = leaf(name, items, False)
    params["blocks"] = {n: leaf(n, _stack(entries, values, n, leaf_layers(n, cfg)), True) for n in shapes["blocks"]}
    stats.bytes_read, stats.reads = counter.bytes_read, counter.reads
    if tokenizer is None:
        from ..loading import _tokenizer

        tokenizer = _tokenizer(None, find_sibling_tokenizer(rl.release_dir(path)))
    return Model(cfg, params, tokenizer or None), stats


def math_nbytes(a) -> int:
    return int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize


__all__ = ["load_release"]

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

The other formats, each in its own module with the same contract (every device's block equals ``gv.load``'s, bit
for bit; a :class:`ReadStats` per process): :func:`load_release` (the release's pickles:
:mod:`.sharded_release`), :func:`load_hf` (Hugging Face folders, MXFP4 experts included: :mod:`.sharded_hf`);
:func:`load` picks the loader for a path as :func:`grokviz.load` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .shard_io import ReadStats, _Reader, from_blocks

__all__ = ["ReadStats", "load", "load_converted", "load_hf", "load_release", "from_blocks"]


def load(path, mesh, **kw):
    """(Model, ReadStats) of any checkpoint :func:`grokviz.load` opens (release, converted, Hugging Face), placed on
    ``mesh`` reading only this process's shards; ``kw`` go to :func:`load_release` / :func:`load_converted` /
    :func:`load_hf`. ``"tiny"``: the bundled model (a converted checkpoint)."""
    from ..checkpoint import converted as cv
    from ..checkpoint import hf
    from ..checkpoint import release as rl

    if isinstance(path, str) and path == "tiny":
        from ..tiny import TINY_DIR

        path = TINY_DIR
    path = Path(path)
    if hf.is_hf(path):
        return load_hf(path, mesh, **kw)
    if cv.is_converted(path):
        return load_converted(path, mesh, **kw)
    if rl.is_release(path):
        return load_release(path, mesh, **kw)
    raise ValueError(f"{path}: neither a converted grokviz checkpoint, a Hugging Face folder nor a release checkpoint")


def load_release(path, mesh, **kw):
    """(Model, ReadStats): the release checkpoint read shard by shard (:mod:`grokviz.distributed.sharded_release`)."""
    from .sharded_release import load_release as impl

    return impl(path, mesh, **kw)


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


def load_hf(path, mesh, *, dtype=None):
    """(Model, ReadStats): a Hugging Face folder read shard by shard, MXFP4 experts included
    (:mod:`grokviz.distributed.sharded_hf`)."""
    from .sharded_hf import load_hf as impl

    return impl(path, mesh, dtype=dtype)

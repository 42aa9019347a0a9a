"""A Hugging Face folder (:mod:`grokviz.checkpoint.hf`) placed on a mesh, each process reading only the source bytes
of its devices' blocks.

Every leaf block is mapped back through the family's name table (:mod:`grokviz.checkpoint.hf_names`: transposes,
fused splits, per-expert stacking) to the block of the stored tensor it comes from, and only that is read
(:meth:`.sharded._Reader.block`: one ``pread`` per contiguous run). Values keep the stored dtype unless ``dtype`` is
given, as ``gv.load`` does; every device's block equals ``gv.load``'s, bit for bit.

* gpt-oss's fused ``gate_up_proj`` interleaves gate and up columns (``even`` / ``odd``): a gate block and the up
  block on the same devices need the same stored columns, which are read once, kept until the up leaf takes them,
  then dropped (at most one leaf's local share is held on the host meanwhile).
* MXFP4 expert weights (``<name>_blocks`` uint8 ``[E, out, in / 32, 16]``, ``<name>_scales`` ``[E, out, in / 32]``):
  a block ``[e, i0:i1, o0:o1]`` of the dequantised ``[E, in, out]`` tensor reads the blocks and scales of rows
  ``o0:o1`` and the 32-value groups covering ``i0:i1``, dequantises them as the whole loader does
  (:func:`grokviz.checkpoint.hf.dequantize_mxfp4`, exact and element by element) and keeps ``i0:i1``. A scale that
  overflows float32 is found only in the shards that hold it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .shard_io import _Reader, from_blocks

PAIRED = ("even", "odd")


class _Source:
    """``tensor[index]`` of a stored tensor (MXFP4 pairs dequantised), each byte range read once."""

    def __init__(self, reader: _Reader, mxfp4: set, paired: set, where: str):
        self.reader, self.mxfp4, self.paired, self.where = reader, mxfp4, paired, where
        self.kept: dict = {}

    def get(self, name: str, index: tuple, shape: tuple) -> np.ndarray:
        sig = (name, tuple(ix.indices(d)[:2] for ix, d in zip(index, shape)))
        if name in self.paired:  # the second consumer takes what the first one read
            if sig in self.kept:
                raw = self.kept.pop(sig)
            else:
                raw = self.kept[sig] = self._raw(name, index, shape)
        else:
            raw = self._raw(name, index, shape)
        return self._value(name, index, shape, raw)

    def _raw(self, name, index, shape):
        if name not in self.mxfp4:
            return self.reader.block(name, index)
        e, i, o = (range(*ix.indices(d)) for ix, d in zip(index, shape))
        g = slice(i.start // 32, -(-i.stop // 32)) if len(i) else slice(0, 0)
        rows = (slice(e.start, e.stop), slice(o.start, o.stop), g)
        return self.reader.block(name + "_blocks", (*rows, slice(None))), self.reader.block(name + "_scales", rows)

    def _value(self, name, index, shape, raw):
        if name not in self.mxfp4:
            return raw
        from ..checkpoint.hf import dequantize_mxfp4

        i = range(*index[1].indices(shape[1]))
        if len(i) == 0:
            return np.zeros([len(range(*ix.indices(d))) for ix, d in zip(index, shape)], np.float32)
        full = dequantize_mxfp4(*raw, f"{self.where}: tensor {name}_{{blocks,scales}}")
        lo = i.start - (i.start // 32) * 32
        return full[:, lo:lo + len(i), :]


def _hf_block(src: _Source, name: str, op: str, idx: tuple, stored: tuple) -> np.ndarray:
    """``OPS[op][0](tensor)[idx]`` reading only the source bytes it needs (grokviz.checkpoint.hf_names.OPS)."""
    if op == "copy":
        return src.get(name, idx, stored)
    if op == "row":
        return src.get(name, (slice(0, 1), *idx), stored)[0]
    if op == "T":
        return np.swapaxes(src.get(name, (*idx[:-2], idx[-1], idx[-2]), stored), -1, -2)
    if op in ("half0T", "half1T"):
        off = 0 if op == "half0T" else stored[-2] // 2
        r = range(*idx[-1].indices(stored[-2] // 2))
        return np.swapaxes(src.get(name, (*idx[:-2], slice(r.start + off, r.stop + off), idx[-2]), stored), -1, -2)
    if op in PAIRED:
        r = range(*idx[-1].indices(stored[-1] // 2))
        got = src.get(name, (*idx[:-1], slice(2 * r.start, 2 * r.stop)), stored)
        return got[..., 0::2] if op == "even" else got[..., 1::2]
    raise ValueError(f"unknown tensor op {op!r}")


def load_hf(path, mesh, *, dtype=None):
    """(Model, ReadStats): a Hugging Face folder placed on ``mesh`` (see the module docstring)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from ..api import Model
    from ..checkpoint.converted import leaf_layers
    from ..checkpoint.hf import HFFolder
    from ..params import shapes_dict
    from ..sharding import TOP_LEVEL, base_spec, fit_spec

    hf = HFFolder(path)
    cfg = hf.cfg
    dt = hf.dtype if dtype is None else np.dtype(jnp.dtype(dtype))
    reader = _Reader(Path(path), hf.files, hf.headers)
    src: dict = {}  # (leaf, layer, expert) -> (tensor, op, stored shape; MXFP4: the dequantised one)
    mx, paired = set(), set()
    for name, t in hf.want.items():
        key = t.name if t.mxfp4 else name
        if t.mxfp4:
            mx.add(key)
        for leaf, op, _ in t.leaves:
            src[(leaf, t.layer, t.expert)] = (key, op, tuple(t.shape if t.mxfp4 else reader.entry(name)[1]["shape"]))
            if op in PAIRED:
                paired.add(key)
    source = _Source(reader, mx, paired, str(path))
    shapes = shapes_dict(cfg)

    def leaf_array(name, full, stacked):
        layers = leaf_layers(name, cfg) if stacked else (None,)
        per_expert = (name, layers[0], 0) in src

        def one(layer, idx):
            if per_expert:  # idx[0] runs over experts
                es = range(*idx[0].indices(cfg.num_experts))
                return np.stack([_hf_block(source, src[(name, layer, e)][0], src[(name, layer, e)][1], idx[1:],
                                           src[(name, layer, e)][2]) for e in es])
            tensor, op, stored = src[(name, layer, None)]
            return _hf_block(source, tensor, op, idx, stored)

        def read(index):
            if stacked:
                ls = range(*index[0].indices(len(layers)))
                return np.stack([one(layers[i], index[1:]) for i in ls]).astype(dt, copy=False)
            return one(None, index).astype(dt, copy=False)

        return from_blocks(full, NamedSharding(mesh, fit_spec(base_spec(name, stacked), full, mesh)), read)

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

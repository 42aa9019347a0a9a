"""Shard-by-shard reading in one process: the release's layout reader refuses exactly what the whole reader refuses
(a fuzzed golden file: truncations and flipped header bytes) and never changes the standard unpickler; block reads of
random slices equal slices of the whole arrays (row-major byte ranges, int8 dequantisation, MXFP4 groups); the
release, converted and MXFP4 loaders on a one-device mesh equal gv.load. The multi-device, multi-process reads
(bytes per process) are in tests/test_distributed.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest

import grokviz as gv
from grokviz.checkpoint.release import CheckpointError, dequantize_np, read_layout, read_tensor
from grokviz.checkpoint.release_shards import ReadCounter, read_block
from grokviz.distributed import sharded
from grokviz.params import Int8Weight
from grokviz.sharding import make_mesh

DATA = Path(__file__).parent / "data"
CKPT = DATA / "grok1_golden_ckpt"
FILES = sorted((CKPT / "ckpt-0").iterdir())


def _outcome(fn, path):
    try:
        v = fn(path)
    except CheckpointError as e:
        return type(e).__name__, str(e).split(" (")[0]  # the interpreter's own wording may follow
    v = getattr(v, "value", v)
    w = v.weight if isinstance(v, Int8Weight) else v
    return "ok", tuple(v.shape), str(w.dtype)


def test_layout_reader_refuses_what_the_whole_reader_refuses(tmp_path):
    raw = FILES[5].read_bytes()  # a QuantizedWeight8bit: both payload kinds (BINBYTES, SHORT_BINBYTES)
    cands = [raw[:n] for n in range(0, len(raw), 97)]
    for i in [*range(0, 200), *range(len(raw) - 100, len(raw))]:
        for bit in (0x01, 0x80):
            b = bytearray(raw)
            b[i] ^= bit
            cands.append(bytes(b))
    evil = pickle.dumps(type("Evil", (), {"__reduce__": lambda self: (os.system, ("true",))})(), protocol=4)
    cands.append(evil)
    dispatch = dict(pickle._Unpickler.dispatch)
    p = tmp_path / "tensor00005_000"
    kinds = set()
    for c in cands:
        p.write_bytes(c)
        whole, layout = _outcome(read_tensor, p), _outcome(read_layout, p)
        assert whole == layout, (c[:40], whole, layout)
        kinds.add(whole[0])
    assert kinds == {"ok", "CheckpointError", "UnsafePickleError"}
    assert pickle._Unpickler.dispatch == dispatch  # the standard unpickler is untouched


def test_layouts_are_the_arrays_without_reading_the_payloads():
    for f in FILES:
        lay, whole = read_layout(f), read_tensor(f)
        assert lay.header_bytes < 4096 and lay.shape == tuple(whole.shape)
        fd = os.open(f, os.O_RDONLY)
        try:
            pairs = ((lay.value.weight, whole.weight), (lay.value.scales, whole.scales)) \
                if isinstance(whole, Int8Weight) else ((lay.value, whole),)
            for a, b in pairs:
                if type(a) is np.ndarray:  # a short payload, read with the opcodes
                    assert a.dtype == b.dtype and np.array_equal(a, b)
                    continue
                full = read_block(fd, a.offset, a.shape, a.dtype, tuple(slice(None) for _ in a.shape))
                assert full.dtype == b.dtype and np.array_equal(full, b)
        finally:
            os.close(fd)


def _slices(rng, shape):
    out = []
    for d in shape:
        lo = int(rng.integers(0, d))
        out.append(slice(lo, int(rng.integers(lo + 1, d + 1))))
    return tuple(out)


def test_block_reads_and_dequantisation_of_random_slices(tmp_path, rng):
    from grokviz.checkpoint.safe_pickle import ArrayLayout
    from grokviz.distributed.sharded_release import _dequantized_block

    q = rng.integers(-128, 128, (3, 12, 5)).astype(np.int8)
    s = rng.normal(size=(3, 4, 5)).astype(np.float32)
    f = tmp_path / "raw"
    f.write_bytes(b"xyz" + q.tobytes() + s.tobytes())
    lq, ls = ArrayLayout(q.shape, q.dtype, 3), ArrayLayout(s.shape, s.dtype, 3 + q.nbytes)
    full = dequantize_np(Int8Weight(weight=q, scales=s))
    fd = os.open(f, os.O_RDONLY)
    try:
        for _ in range(30):
            idx = _slices(rng, q.shape)
            c = ReadCounter()
            assert np.array_equal(read_block(fd, 3, q.shape, q.dtype, idx, c), q[idx])
            assert c.bytes_read == q[idx].nbytes
            assert np.array_equal(_dequantized_block(fd, lq, ls, idx, None, "t"), full[idx])
        with pytest.raises(CheckpointError, match="short read"):
            read_block(fd, 10, (200,), np.float32, (slice(0, 200),))
    finally:
        os.close(fd)


def test_mxfp4_blocks_of_random_slices(tmp_path, rng):
    from grokviz.checkpoint.hf import dequantize_mxfp4
    from grokviz.checkpoint.safetensors_io import _ShardWriter, read_safetensors_header
    from grokviz.distributed.sharded import _Reader
    from grokviz.distributed.sharded_hf import _Source

    blocks = rng.integers(0, 256, (2, 6, 3, 16)).astype(np.uint8)
    scales = rng.integers(120, 132, (2, 6, 3)).astype(np.uint8)
    w = _ShardWriter(tmp_path / "m.safetensors", 4096)
    w.add("x_blocks", blocks)
    w.add("x_scales", scales)
    w.close()
    headers = {"m.safetensors": read_safetensors_header(tmp_path / "m.safetensors")}
    reader = _Reader(tmp_path, {"x_blocks": "m.safetensors", "x_scales": "m.safetensors"}, headers)
    full = dequantize_mxfp4(blocks, scales)  # [2, 96, 6]
    try:
        src = _Source(reader, {"x"}, set(), "t")
        for _ in range(30):
            idx = _slices(rng, full.shape)
            assert np.array_equal(src.get("x", idx, full.shape), full[idx])
    finally:
        reader.close()


@pytest.fixture(scope="module")
def golden_cfg():
    from grokviz.testing import load_golden

    return load_golden()[0]


@pytest.mark.parametrize("quantized", [True, False])
def test_release_loader_equals_gv_load(golden_cfg, quantized):
    mesh = make_mesh((1, 1))
    model, stats = sharded.load(CKPT, mesh, config=golden_cfg, quantized=quantized)
    ref = gv.load(CKPT, config=golden_cfg, quantized=quantized, progress=False)
    la, lb = jax.tree_util.tree_leaves_with_path(model.params), jax.tree_util.tree_leaves_with_path(ref.params)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, a), (_, b) in zip(la, lb):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
    files = sum(f.stat().st_size for f in FILES)
    assert stats.file_bytes == files and 0.99 < stats.fraction < 1.05 and "parsing the pickles" in str(stats)


def test_release_loader_refuses_a_damaged_file_as_gv_load_does(golden_cfg, tmp_path):
    import shutil

    d = tmp_path / "ckpt" / "ckpt-0"
    shutil.copytree(CKPT / "ckpt-0", d)
    f = d / FILES[5].name
    raw = bytearray(f.read_bytes())
    raw[raw.index(b"QuantizedWeight8bit")] = ord("X")  # another global: refused before anything runs
    f.write_bytes(bytes(raw))
    for load in (lambda: gv.load(d.parent, config=golden_cfg, progress=False),
                 lambda: sharded.load_release(d.parent, make_mesh((1, 1)), config=golden_cfg)):
        with pytest.raises(CheckpointError, match="refused to load global __main__.XuantizedWeight8bit"):
            load()

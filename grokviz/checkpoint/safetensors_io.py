"""Safetensors files written and read by grokviz: streamed writing, header parsing, memory-mapped tensors.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{tensor: {"dtype", "shape", "data_offsets": [lo, hi]}, "__metadata__": {...}}``, offsets relative to the end
of the header) and the raw little-endian data (format description: https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from .release import CheckpointError

_ST_DTYPES = {np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16",
              np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16",
              np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(bool): "BOOL"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class ConvertedCheckpointError(CheckpointError):
    """A converted checkpoint that is incomplete, inconsistent or fails its hashes (the message names the file)."""


class SafetensorsError(ConvertedCheckpointError):
    """A safetensors file whose header or data is malformed (the message names the file and the tensor)."""


def _header_bytes(entries: dict) -> bytes:
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # pad with spaces (allowed) so the data is 8-byte aligned


class _ShardWriter:
    """Writes one safetensors file incrementally: data first, header (reserved space) written last."""

    def __init__(self, path: Path, reserve: int):
        self.path, self.reserve = path, reserve
        self.f = open(path, "wb")
        self.f.write(b"\0" * (8 + reserve))
        self.entries: dict = {}
        self.offset = 0

    def fits(self, key, arr) -> bool:
        trial = dict(self.entries)
        trial[key] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [10**15, 10**15]}
        return len(_header_bytes(trial)) <= self.reserve

    def add(self, key: str, arr: np.ndarray):
        dt = np.dtype(arr.dtype)
        if dt not in _ST_DTYPES:
            raise ValueError(f"tensor {key}: dtype {dt} cannot be stored in safetensors")
        arr = np.ascontiguousarray(arr)
        n = arr.nbytes
        self.f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self.entries[key] = {"dtype": _ST_DTYPES[dt], "shape": list(arr.shape),
                             "data_offsets": [self.offset, self.offset + n]}
        self.offset += n

    def close(self):
        hdr = _header_bytes({"__metadata__": {"format": "np"}, **self.entries})
        if len(hdr) > self.reserve:  # fits() keeps this from happening
            raise ValueError(f"{self.path}: safetensors header overflow")
        hdr = hdr + b" " * (self.reserve - len(hdr))  # trailing spaces are allowed in the header
        self.f.seek(0)
        self.f.write(struct.pack("<Q", len(hdr)))
        self.f.write(hdr)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


#: the largest header we accept (ours are 64 KiB; the format's own reader caps it at 100 MB)
MAX_HEADER_BYTES = 100 << 20


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, data start offset) of a safetensors file, every entry validated.

    Each entry must have a known dtype, a shape of non-negative ints and two int ``data_offsets`` whose span is
    exactly ``prod(shape) * itemsize`` bytes; sorted by offset, the entries must tile the data section from its
    first byte to the end of the file with no gap or overlap. Anything else raises :class:`SafetensorsError`
    naming the file and the tensor. The returned entries carry ``"np_dtype"`` and a tuple ``"shape"``.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: corrupt safetensors header length {n:,} (at most "
                                   f"{MAX_HEADER_BYTES:,} bytes)")
        if n > size - 8:
            raise SafetensorsError(f"{path}: truncated safetensors file (header of {n:,} bytes, file of {size:,})")
        try:
            raw = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(raw, dict):
        raise SafetensorsError(f"{path}: safetensors header is a JSON {type(raw).__name__}, expected an object")
    meta = raw.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise SafetensorsError(f"{path}: __metadata__ is a {type(meta).__name__}, expected an object")
    start, data_len = 8 + n, size - 8 - n
    entries = {key: _check_entry(path, key, e) for key, e in raw.items()}
    pos, prev = 0, None
    for key, e in sorted(entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        lo, hi = e["data_offsets"]
        if lo != pos:
            what = (f"overlaps {prev}" if lo < pos else f"leaves a gap of {lo - pos:,} bytes after "
                                                        f"{prev or 'the header'}")
            raise SafetensorsError(f"{path}: tensor {key}: data_offsets [{lo}, {hi}] {what} (expected to start at "
                                   f"{pos})")
        if hi > data_len:
            raise SafetensorsError(f"{path}: tensor {key} extends past the end of the file (truncated): data "
                                   f"offsets [{lo}, {hi}] but the data section holds {data_len:,} bytes")
        pos, prev = hi, key
    if pos != data_len:
        raise SafetensorsError(f"{path}: {data_len - pos:,} bytes after the last tensor that no header entry "
                               f"covers")
    return entries, start


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: Path, key: str, e) -> dict:
    where = f"{path}: tensor {key}"
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        got = sorted(e) if isinstance(e, dict) else type(e).__name__
        raise SafetensorsError(f"{where}: header entry must have dtype, shape and data_offsets, got {got}")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _NP_DTYPES:
        raise SafetensorsError(f"{where}: dtype {dtype!r} is not one grokviz reads ({', '.join(sorted(_NP_DTYPES))})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r} are not two ints 0 <= begin <= end")
    dt = _NP_DTYPES[dtype]
    want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if offsets[1] - offsets[0] != want:
        raise SafetensorsError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]:,} bytes but "
                               f"{dtype} {shape} needs {want:,}")
    return {"dtype": dtype, "np_dtype": dt, "shape": tuple(shape), "data_offsets": tuple(offsets)}


def memmap_tensor(path: Path, entry: dict, start: int) -> np.ndarray:
    """A read-only memory map of one validated entry (from :func:`read_safetensors_header`)."""
    dt = entry["np_dtype"]
    lo, hi = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if hi == lo:
        return np.zeros(shape, dt)
    return np.memmap(path, dtype=dt, mode="r", offset=start + lo, shape=shape)


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()



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

_ST_DTYPES = {np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16",
              np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16",
              np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(bool): "BOOL"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsError(ValueError):
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


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, data start offset) of a safetensors file; validates sizes against the file length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise SafetensorsError(f"{path}: corrupt safetensors header length {n}")
        try:
            entries = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    entries.pop("__metadata__", None)
    start = 8 + n
    for key, e in entries.items():
        end = e["data_offsets"][1]
        if start + end > size:
            raise SafetensorsError(f"{path}: tensor {key} extends past the end of the file (truncated)")
    return entries, start


def memmap_tensor(path: Path, entry: dict, start: int) -> np.ndarray:
    dt = _NP_DTYPES[entry["dtype"]]
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



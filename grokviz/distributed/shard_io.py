"""What the shard-by-shard loaders share: :class:`ReadStats` (bytes read per process), the safetensors block reader
and :func:`from_blocks` (``jax.make_array_from_callback`` with one read per distinct block). See
:mod:`grokviz.distributed.sharded`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class ReadStats:
    bytes_read: int = 0        # bytes this process read from tensor data
    tensor_bytes: int = 0      # bytes of all tensor data in the checkpoint
    reads: int = 0             # pread calls
    header_bytes: int = 0      # release format: bytes read parsing the pickles (opcodes, payloads < 256 bytes)
    file_bytes: int = 0        # release format: bytes of all its tensor files

    @property
    def fraction(self) -> float:
        """Share of the checkpoint this process read: tensor data (release format: all bytes read, of the files)."""
        if self.file_bytes:
            return (self.bytes_read + self.header_bytes) / self.file_bytes
        return self.bytes_read / max(self.tensor_bytes, 1)

    def __str__(self):
        head = (f" + {self.header_bytes:,} parsing the pickles ({100 * self.fraction:.1f} % of the files' "
                f"{self.file_bytes:,} bytes)" if self.file_bytes else "")
        return (f"read {self.bytes_read:,} of {self.tensor_bytes:,} tensor bytes "
                f"({100 * self.bytes_read / max(self.tensor_bytes, 1):.1f} %) in {self.reads:,} reads{head}")


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
        from ..checkpoint.release_shards import read_block

        s, e, start = self.entry(key)
        try:
            return read_block(self.fds[s], start + e["data_offsets"][0], e["shape"], e["np_dtype"], index,
                              self.stats, f"{self.path / s}: tensor {key}")
        except ValueError as err:
            if "short read" in str(err):
                raise ValueError(f"{self.path / s}: short read of tensor {key} (truncated file?)") from None
            raise


def from_blocks(full: tuple, sharding, read):
    """``jax.make_array_from_callback`` with ``read(index) -> np.ndarray`` called once per distinct block (local
    devices holding the same replica share one read)."""
    import jax

    cache: dict = {}

    def cb(index):
        sig = tuple(ix.indices(d)[:2] for ix, d in zip(index, full))
        if sig not in cache:
            cache[sig] = read(index)
        return cache[sig]

    return jax.make_array_from_callback(tuple(full), sharding, cb)

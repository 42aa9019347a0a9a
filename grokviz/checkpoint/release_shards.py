"""The release's tensor files read one shard at a time: where each array's bytes are, then only the ranges a shard
needs.

:func:`.release.read_layout` is :func:`~.release.read_tensor` without the payloads, through this module's
reader: the same opcode pre-scan (seeking over every ``BINBYTES``/``BINBYTES8`` payload instead of reading it), the
same inert globals and canonical-state sketches, the same checks of dtypes, layouts and scales
(:func:`~.release.checked_value`), so a file the whole loader refuses is refused with the same error. It returns
:class:`~.safe_pickle.ArrayLayout` records (shape, dtype, file offset of the raw C-ordered payload) instead of
arrays, or an :class:`~grokviz.params.Int8Weight` of two. Payloads short enough for ``SHORT_BINBYTES`` (< 256
bytes) are read with the opcodes and kept in memory.

The unpickler is the standard library's pure-Python one with this module's own dispatch table (a copy: the
standard one is never changed): ``FRAME`` only groups the opcodes that follow, so the opcodes are read straight from
the file; the two payload opcodes record the payload's offset and length and seek past it.

:func:`read_block` reads ``array[index]`` (a tuple of slices) of a C-ordered array at a file offset: one read per
contiguous run (a slice of the leading axis is one range; a slice of a later axis one range per row of the axes
before it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import struct

import numpy as np

from .safe_pickle import (
    ArrayLayout,
    CheckpointError,
    Payload,
    QuantizedRecord,
    RestrictedUnpickler,
    UnsafePickleError,
    _ArraySketch,
    scan_pickle,
)

__all__ = ["read_block", "layout_block", "ReadCounter"]


@dataclasses.dataclass
class ReadCounter:
    bytes_read: int = 0   # payload bytes read from files
    reads: int = 0        # read calls


class _LayoutUnpickler(pickle._Unpickler):
    """Restricted like :class:`~.safe_pickle.RestrictedUnpickler` (same globals, no persistent ids); payloads are
    skipped (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)  # our own copy
    find_class = RestrictedUnpickler.find_class
    persistent_load = RestrictedUnpickler.persistent_load

    def __init__(self, f, size: int, name: str):
        super().__init__(f)
        self._f, self._size, self.name = f, size, name

    def _payload(self, n: int):
        off = self._f.tell()
        if n > self._size - off:
            raise CheckpointError(f"{self.name}: truncated or corrupt pickle (a payload of {n:,} bytes at byte {off} "
                                  f"runs past the end of the file)")
        self._f.seek(n, os.SEEK_CUR)
        self.append(Payload(off, n))

    def _frame(self):
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._size - self._f.tell():
            raise CheckpointError(f"{self.name}: truncated or corrupt pickle (a frame of {n:,} bytes runs past the "
                                  f"end of the file)")

    def _binbytes(self):
        self._payload(struct.unpack("<I", self.read(4))[0])

    def _binbytes8(self):
        self._payload(struct.unpack("<Q", self.read(8))[0])

    dispatch[pickle.FRAME[0]] = _frame
    dispatch[pickle.BINBYTES[0]] = _binbytes
    dispatch[pickle.BINBYTES8[0]] = _binbytes8


def _unpickle_layout(f, label: str):
    scan_pickle(f, label, skip_payloads=True)
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    obj = _LayoutUnpickler(f, size, label).load()
    if type(obj) is _ArraySketch:
        if obj.array is None:
            raise UnsafePickleError(f"{label}: the array was never given its data")
        return obj.array
    if type(obj) is QuantizedRecord:
        return obj
    raise CheckpointError(f"{label}: the pickled object is a {type(obj).__name__}, expected a numpy array or a "
                          f"QuantizedWeight8bit")


class _CountingFile:
    """A binary file that counts the bytes read through it (seeks are free)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, n=-1):
        got = self.f.read(n)
        self.n += len(got)
        return got

    def readline(self, n=-1):
        got = self.f.readline(n)
        self.n += len(got)
        return got

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()


def read_block(fd: int, offset: int, shape: tuple, dtype, index: tuple, counter: ReadCounter | None = None,
               what: str = "tensor") -> np.ndarray:
    """``array[index]`` (a tuple of unit-step slices) of the C-ordered ``shape`` x ``dtype`` array at byte ``offset``
    of the open file ``fd``, reading only its bytes (``os.pread`` of each contiguous run)."""
    dt = np.dtype(dtype)
    shape = tuple(shape)
    if len(index) != len(shape):
        raise ValueError(f"{what}: index {index} has {len(index)} entries for shape {shape}")
    sl = [range(*ix.indices(d)) for ix, d in zip(index, shape)]
    if any(r.step != 1 for r in sl):
        raise ValueError(f"strided shard index {index} for {what}")
    lo = [r.start for r in sl]
    ext = [len(r) for r in sl]
    out = np.empty(ext, dt)
    if 0 in ext:
        return out
    if not shape:
        k = 0
        run = dt.itemsize
    else:
        k = len(shape) - 1  # the last axis whose slice is partial: runs are contiguous from there on
        while k > 0 and ext[k] == shape[k]:
            k -= 1
        run = ext[k] * math.prod(shape[k + 1:]) * dt.itemsize
    strides = [math.prod(shape[i + 1:]) * dt.itemsize for i in range(len(shape))]
    flat = out.reshape(-1).view(np.uint8)
    for n, idx in enumerate(np.ndindex(*ext[:k])):
        off = offset + sum((lo[i] + idx[i]) * strides[i] for i in range(k)) + (lo[k] * strides[k] if shape else 0)
        got = os.pread(fd, run, off)
        if len(got) != run:
            raise CheckpointError(f"{what}: short read at byte {off:,} (the file was truncated?)")
        flat[n * run:(n + 1) * run] = np.frombuffer(got, np.uint8)
        if counter is not None:
            counter.bytes_read += run
            counter.reads += 1
    return out


def layout_block(fd: int, a, index: tuple, counter: ReadCounter | None = None, what: str = "tensor") -> np.ndarray:
    """``a[index]`` of an ArrayLayout (read from ``fd``) or of an array already in memory (a short payload)."""
    if type(a) is ArrayLayout:
        return read_block(fd, a.offset, a.shape, a.dtype, index, counter, what)
    return np.ascontiguousarray(a[index])

"""Unpickling the release's tensor files so that nothing a file contains can run, mutate or allocate at will.

A release file is a protocol-4 pickle of a numpy array, or of a ``QuantizedWeight8bit`` record holding two. A
pickle is a small program; this module lets it do only what such a program needs, in three layers:

1. **Opcode pre-scan** (:func:`scan_pickle`). Before the unpickler sees a byte, the opcode stream is walked with
   :func:`pickletools.genops`, seeking over the payloads rather than reading them. Only protocols 3 and 4 and
   the opcodes that numpy's and the record's pickles use are allowed; anything else (``INST``, ``OBJ``,
   ``NEWOBJ_EX``, the ``EXT`` registry, persistent ids, out-of-band buffers, lists, sets, floats, ...) is refused
   with the opcode and its byte offset. Memo slots must be filled in order and read only once filled, so a
   crafted index (say ``LONG_BINPUT 2**27``) cannot make the unpickler allocate a memo table of gigabytes; the
   number of opcodes is bounded too.
2. **Inert globals** (:meth:`RestrictedUnpickler.find_class`). The few globals the format names are resolved to
   objects of this module that stand in for them, never to numpy's or ml_dtypes' real objects, nor to a function
   or class whose attributes could be set: the array reconstructor and ``numpy.dtype`` become callables that
   only accept the exact arguments numpy writes and return fresh *sketches*; ``numpy.ndarray`` and any
   ``*.bfloat16`` become tokens; ``QuantizedWeight8bit`` becomes a sealed record class. ``BUILD`` on any of
   them is refused. Every other global is refused before it can be called.
3. **Sketches that only accept the canonical state.** ``BUILD`` on a dtype sketch checks the state against the
   one numpy writes for that dtype and then stands for numpy's own dtype object, which is never handed to the
   pickle and so can never be modified through it. ``BUILD`` on an array sketch checks version, shape (plain
   non-negative ints), C order, the dtype sketch and that the payload is a ``bytes`` object of exactly
   ``prod(shape) * itemsize`` bytes; only then is a new array made from a copy of those bytes. The caller gets
   the finished arrays back and checks their layout once more (:func:`check_layout`).

The shard-by-shard reader (:mod:`.release_shards`) runs the same three layers without reading the payloads: its
pre-scan seeks over them, and its unpickler hands the array sketch a :class:`Payload` (offset and length) instead of
the bytes, from which the sketch makes an :class:`ArrayLayout` after the same checks.

The unpickler reads the file again after the pre-scan. A file that changes in between escapes only layer 1; the
other two layers do not depend on it.
"""

from __future__ import annotations

import math
import os
import pickle
import pickletools
import reprlib

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be loaded; the message names the file and the parameter."""


class UnsafePickleError(CheckpointError, pickle.UnpicklingError):
    """A pickle that steps outside what the release format needs; nothing from it was executed."""


#: the opcodes numpy-array and QuantizedWeight8bit pickles use (protocols 3 and 4)
ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "NEWOBJ",
    "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1",
    "SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_DICT", "SETITEM", "SETITEMS",
})
_PUTS = frozenset({"BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"BINGET", "LONG_BINGET"})
#: a genuine file has under 200 opcodes whatever its size
MAX_OPCODES = 10_000
_SMALL_READ = 1 << 16
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


class _Span:
    """What a skimmed payload read returns: only its length, which is all genops checks."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


_PAYLOAD_OPS = (pickle.BINBYTES, pickle.BINBYTES8)


class _SkimReader:
    """The file interface genops needs; reads longer than 64 KiB are skipped over (seek), not read. With
    ``payloads=True`` the payload of every ``BINBYTES``/``BINBYTES8`` is skipped whatever its length: genops asks
    for the position, reads the opcode byte, then the argument (the length, then the payload)."""

    def __init__(self, f, size: int, payloads: bool = False):
        self.f, self.size, self.payloads, self.state = f, size, payloads, ""

    def tell(self) -> int:
        self.state = "op"  # genops calls tell() right before each opcode byte
        return self.f.tell()

    def read(self, n: int):
        if self.payloads:
            state, self.state = self.state, ""
            if state == "op":
                got = self.f.read(n)
                self.state = "len" if got in _PAYLOAD_OPS else ""
                return got
            if state == "len":
                self.state = "payload"
            elif state == "payload":
                return self._skip(n)
        if n <= _SMALL_READ:
            return self.f.read(max(n, 0))
        return self._skip(n)

    def _skip(self, n: int):
        n = max(min(n, self.size - self.f.tell()), 0)
        self.f.seek(n, 1)
        return _Span(n)

    def readline(self) -> bytes:
        return self.f.readline(4096)


def scan_pickle(f, label: str, *, skip_payloads: bool = False) -> None:
    """Layer 1: walk the opcodes of the seekable binary file ``f``; raise naming ``label`` unless it may be
    unpickled. ``skip_payloads``: seek over every bytes payload but the short ones (the layout reader)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    _scan(_SkimReader(f, size, skip_payloads), label)


def _scan(reader: _SkimReader, label: str) -> None:
    filled = 0  # memo slots 0 .. filled-1 hold a value
    try:
        for n, (op, arg, pos) in enumerate(pickletools.genops(reader)):
            name = op.name
            if n >= MAX_OPCODES:
                raise UnsafePickleError(f"{label}: more than {MAX_OPCODES:,} pickle opcodes; a checkpoint tensor "
                                        f"needs a few dozen")
            if n == 0 and name != "PROTO":
                raise CheckpointError(f"{label}: truncated or corrupt pickle (it does not start with a protocol "
                                      f"header; the release writes protocol 4)")
            if name not in ALLOWED_OPCODES:
                raise UnsafePickleError(f"{label}: refused opcode {name} at byte {pos}: it is not used by the "
                                        f"Grok-1 checkpoint format (numpy arrays and QuantizedWeight8bit only); "
                                        f"nothing from this file was executed")
            if name == "FRAME" and arg > reader.size - (pos + 9):
                raise CheckpointError(f"{label}: truncated or corrupt pickle (a frame of {arg:,} bytes at byte {pos} "
                                      f"runs past the end of the file)")
            if name == "PROTO" and not 3 <= arg <= 4:
                raise UnsafePickleError(f"{label}: pickle protocol {arg} is not the checkpoint format's "
                                        f"(protocol 4, or 3); nothing from this file was executed")
            if name == "MEMOIZE" or (name in _PUTS and arg == filled):
                filled += 1
            elif name in _PUTS and arg > filled:
                raise UnsafePickleError(f"{label}: memo index {arg:,} at byte {pos} skips ahead of the {filled} "
                                        f"slot(s) filled so far (a pickler numbers them in order); refused "
                                        f"before anything was allocated")
            elif name in _GETS and arg >= filled:
                raise CheckpointError(f"{label}: truncated or corrupt pickle (byte {pos} reads memo slot {arg:,} "
                                      f"but only {filled} are filled)")
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:  # genops: unknown opcode, short argument, no STOP
        raise CheckpointError(f"{label}: truncated or corrupt pickle ({e})") from None


# --- layer 2: what find_class hands out ---------------------------------------------------------------------

class _Inert:
    """Base of everything the unpickler can reach: no instance dict, and ``BUILD`` is refused."""

    __slots__ = ()
    what = "this object"

    def __setstate__(self, state):
        raise UnsafePickleError(f"a pickle may not set the state of {self.what}")


class _Token(_Inert):
    __slots__ = ("what",)

    def __init__(self, what: str):
        object.__setattr__(self, "what", what)

    def __setattr__(self, key, value):
        raise UnsafePickleError(f"a pickle may not modify {self.what}")

    def __repr__(self):
        return self.what


_NDARRAY = _Token("numpy.ndarray")
_BF16 = _Token("bfloat16")


class _Reconstruct(_Token):
    """``numpy.core.multiarray._reconstruct``: only ``(ndarray, (0,), b'b')``, as numpy writes it."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != 3 or args[0] is not _NDARRAY or not _is(args[1], (0,)) or not _is(args[2], b"b"):
            raise UnsafePickleError(f"the array reconstructor accepts only (numpy.ndarray, (0,), b'b'), "
                                    f"got {_short.repr(args)}")
        return _ArraySketch()


class _Dtype(_Token):
    """``numpy.dtype``: only ``(code, False, True)`` for the codes below, as numpy writes it."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        if (kwargs or len(args) != 3 or not (args[0] is _BF16 or (type(args[0]) is str and args[0] in _DTYPES))
                or args[1] is not False or args[2] is not True):
            raise UnsafePickleError(f"numpy.dtype accepts only (code, False, True) with one of the codes "
                                    f"{sorted(_DTYPES)} or bfloat16, got {_short.repr(args)}")
        return _DtypeSketch(args[0])


_RECONSTRUCT = _Reconstruct("numpy.core.multiarray._reconstruct")
_DTYPE = _Dtype("numpy.dtype")


def _is(value, expected) -> bool:
    """Equal and of exactly the same types, element by element (so True is not 1 and a str is not bytes)."""
    if type(value) is not type(expected):
        return False
    if type(value) is tuple:
        return len(value) == len(expected) and all(_is(a, b) for a, b in zip(value, expected))
    return value == expected


# --- layer 3: sketches that become real numpy objects only from the canonical state -------------------------

#: dtype code numpy writes -> (numpy's dtype, the byte-order character in its pickled state)
_DTYPES = {c: (np.dtype(c), "|" if np.dtype(c).itemsize == 1 else "<")
           for c in ("b1", "i1", "u1", "i2", "i4", "i8", "f2", "f4", "f8")}
_BF16_DTYPE = np.dtype(ml_dtypes.bfloat16)
_ITEMSIZE = {dtype: int(code[1:]) for code, (dtype, _) in _DTYPES.items()}


class _DtypeSketch(_Inert):
    __slots__ = ("code", "dtype")
    what = "a dtype"

    def __init__(self, code):
        self.code, self.dtype = code, None

    def __setstate__(self, state):
        if self.dtype is not None:
            raise UnsafePickleError(f"numpy.dtype({self.code!r}) is built twice")
        if self.code is _BF16:
            # a user-defined dtype records its size, alignment and flags; the flags vary with the writer's
            # ml_dtypes version and are never applied to anything here
            ok = (type(state) is tuple and len(state) == 8 and _is(state[:7], (3, "<", None, None, None, 2, 2))
                  and type(state[7]) is int and 0 <= state[7] < 256)
            dtype, want = _BF16_DTYPE, "(3, '<', None, None, None, 2, 2, flags)"
        else:
            dtype, order = _DTYPES[self.code]
            want = (3, order, None, None, None, -1, -1, 0)
            ok = _is(state, want)
        if not ok:
            raise UnsafePickleError(f"numpy.dtype({self.code!r}) has state {_short.repr(state)}; numpy writes "
                                    f"{want}")
        if dtype.itemsize != (2 if self.code is _BF16 else int(self.code[1:])):
            raise UnsafePickleError(f"this process's {dtype} dtype has itemsize {dtype.itemsize}: it was "
                                    f"modified by other code; refusing to read arrays with it")
        self.dtype = dtype


class _ArraySketch(_Inert):
    __slots__ = ("array",)
    what = "an array"

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if self.array is not None:
            raise UnsafePickleError("an array is built twice")
        if type(state) is not tuple or len(state) != 5:
            raise UnsafePickleError(f"array state must be (1, shape, dtype, False, bytes), got "
                                    f"{_short.repr(state)}")
        version, shape, dt, fortran, raw = state
        if not _is(version, 1):
            raise UnsafePickleError(f"array state version {_short.repr(version)}, expected 1")
        if type(shape) is not tuple or len(shape) > 32 or any(type(d) is not int or d < 0 for d in shape):
            raise UnsafePickleError(f"array shape {_short.repr(shape)} is not a tuple of non-negative ints")
        if type(dt) is not _DtypeSketch or dt.dtype is None:
            raise UnsafePickleError(f"array dtype {_short.repr(dt)} is not a finished numpy.dtype of the format")
        if fortran is not False:
            raise UnsafePickleError(f"array is stored in Fortran order ({_short.repr(fortran)}); the release "
                                    f"writes C order")
        if type(raw) is not bytes and type(raw) is not Payload:
            raise UnsafePickleError(f"array data is a {type(raw).__name__}, expected bytes")
        count = math.prod(shape)
        if len(raw) != count * dt.dtype.itemsize:
            raise UnsafePickleError(f"array data has {len(raw):,} bytes but shape {shape} of {dt.dtype} needs "
                                    f"{count * dt.dtype.itemsize:,}")
        if type(raw) is Payload:  # the layout reader's stand-in for bytes it did not read
            self.array = ArrayLayout(shape, dt.dtype, raw.offset)
            return
        flat = np.frombuffer(raw, dtype=dt.dtype, count=count) if count else np.empty(0, dt.dtype)
        self.array = flat.reshape(shape).copy(order="C")


class Payload:
    """Where the layout reader (:mod:`.release_shards`) found an array's payload: ``n`` bytes at file ``offset``,
    which it skipped instead of reading. Only that reader makes these; no global resolves to this class."""

    __slots__ = ("offset", "n")

    def __init__(self, offset: int, n: int):
        self.offset, self.n = offset, n

    def __len__(self) -> int:
        return self.n

    def __repr__(self):
        return f"<{self.n:,} payload bytes at byte {self.offset:,}>"


class ArrayLayout:
    """A checked array whose bytes were not read: C-ordered ``shape`` of ``dtype`` at file ``offset``."""

    __slots__ = ("shape", "dtype", "offset")

    def __init__(self, shape: tuple, dtype: np.dtype, offset: int):
        self.shape, self.dtype, self.offset = tuple(shape), dtype, offset

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __repr__(self):
        return f"ArrayLayout({self.shape}, {self.dtype}, offset={self.offset})"


class _Sealed(type):
    """Metaclass of the record class: its attributes cannot be set, it cannot be called, BUILD on it fails."""

    def __setattr__(cls, key, value):
        raise UnsafePickleError(f"a pickle may not modify {cls.__name__}")

    def __delattr__(cls, key):
        raise UnsafePickleError(f"a pickle may not modify {cls.__name__}")

    def __call__(cls, *args, **kwargs):
        raise UnsafePickleError(f"{cls.__name__} may only be created by NEWOBJ with no arguments")

    @property
    def __setstate__(cls):  # looked up on the class itself by BUILD; a data descriptor wins over the class dict
        raise UnsafePickleError(f"a pickle may not set the state of the class {cls.__name__}")


class QuantizedRecord(metaclass=_Sealed):
    """Stands in for the release's ``QuantizedWeight8bit``: accepts exactly the state ``{weight, scales}``."""

    __slots__ = ("weight", "scales")

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise UnsafePickleError(f"QuantizedWeight8bit takes no constructor arguments, got {_short.repr(args)}")
        return object.__new__(cls)

    def __setattr__(self, key, value):
        raise UnsafePickleError("a pickle may not set attributes of QuantizedWeight8bit")

    def __setstate__(self, state):
        if hasattr(self, "weight"):
            raise UnsafePickleError("QuantizedWeight8bit is built twice")
        if type(state) is not dict or set(state) != {"weight", "scales"}:
            keys = sorted(map(str, state)) if type(state) is dict else type(state).__name__
            raise UnsafePickleError(f"QuantizedWeight8bit state must be {{weight, scales}}, got {keys}")
        for k in ("weight", "scales"):
            v = state[k]
            if type(v) is not _ArraySketch or v.array is None:
                raise UnsafePickleError(f"QuantizedWeight8bit.{k} must be a numpy array, got {type(v).__name__}")
            object.__setattr__(self, k, v.array)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("__main__", "QuantizedWeight8bit"): QuantizedRecord,
    ("model", "QuantizedWeight8bit"): QuantizedRecord,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are this module's inert stand-ins (see the module docstring)."""

    def __init__(self, file, *, name: str = "<pickle>"):
        super().__init__(file)
        self.name = name

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if name == "bfloat16":  # the module of the bf16 type is not fixed across writers (ml_dtypes, jax, ...)
            return _BF16
        raise UnsafePickleError(f"{self.name}: refused to load global {module}.{name}: it is not part of the "
                                f"Grok-1 checkpoint format (only numpy arrays/dtypes and QuantizedWeight8bit "
                                f"are allowed); nothing from this file was executed")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.name}: persistent ids are not part of the checkpoint format")


def unpickle(f, label: str):
    """Layers 1-3 on the open binary file ``f`` -> ``np.ndarray`` or :class:`QuantizedRecord` of arrays."""
    scan_pickle(f, label)
    f.seek(0)
    obj = RestrictedUnpickler(f, name=label).load()
    if type(obj) is _ArraySketch:
        if obj.array is None:
            raise UnsafePickleError(f"{label}: the array was never given its data")
        return obj.array
    if type(obj) is QuantizedRecord:
        return obj
    raise CheckpointError(f"{label}: the pickled object is a {type(obj).__name__}, expected a numpy array or a "
                          f"QuantizedWeight8bit")


def c_strides(shape: tuple, itemsize: int) -> tuple:
    """The strides of a C-ordered array with at least one element."""
    out, step = [], itemsize
    for d in reversed(shape):
        out.append(step)
        step *= d
    return tuple(reversed(out))


def check_layout(a: np.ndarray, what: str, label: str) -> np.ndarray:
    """A freshly read array must own a C-ordered buffer of exactly ``size * itemsize`` bytes of a sane dtype, with
    the strides numpy gives such an array."""
    itemsize = 2 if a.dtype == _BF16_DTYPE else _ITEMSIZE.get(a.dtype)
    ok = (type(a) is np.ndarray and itemsize is not None and a.dtype.itemsize == a.itemsize == itemsize
          and a.flags.c_contiguous and a.flags.owndata
          and (a.size == 0 or a.strides == c_strides(a.shape, itemsize))  # numpy versions differ on empty ones
          and a.nbytes == math.prod(a.shape) * itemsize)
    if not ok:
        raise CheckpointError(f"{label}: {what} has a non-canonical layout (dtype {a.dtype}, itemsize "
                              f"{a.dtype.itemsize}, shape {a.shape}, strides {a.strides}); refusing it")
    return a

"""Hand-written hostile pickles against the release reader: each is refused, and nothing in the process changes.

The files are assembled opcode by opcode (the helpers below), because Python's pickler never writes them.
"""

import io
import pickle
import pickletools
import struct
import time
import tracemalloc
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from grokviz.checkpoint import safe_pickle
from grokviz.checkpoint.release import CheckpointError, UnsafePickleError, read_tensor
from grokviz.checkpoint.safe_pickle import RestrictedUnpickler, check_layout, unpickle

CKPT = Path(__file__).resolve().parent / "data" / "grok1_golden_ckpt" / "ckpt-0"
BF16 = np.dtype(ml_dtypes.bfloat16)


# --- a tiny pickle assembler ---------------------------------------------------------------------------------

def glob(module, name):
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def s(text):
    raw = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def b(raw):
    return pickle.SHORT_BINBYTES + bytes([len(raw)]) + raw if len(raw) < 256 else \
        pickle.BINBYTES + struct.pack("<I", len(raw)) + raw


def i(n):
    return pickle.BININT + struct.pack("<i", n)


def tup(*items):
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def put(k):
    return pickle.BINPUT + bytes([k])


def get(k):
    return pickle.BINGET + bytes([k])


def dtype(code, align=pickle.NEWFALSE, copy=pickle.NEWTRUE):
    return glob("numpy", "dtype") + tup(code, align, copy) + pickle.REDUCE


def dtype_state(elsize, align, flags=64, order="<"):
    return tup(i(3), s(order), pickle.NONE * 3, i(elsize), i(align), i(flags))


def array_head():
    return glob("numpy.core.multiarray", "_reconstruct") + tup(glob("numpy", "ndarray"), tup(i(0)), b(b"b")) \
        + pickle.REDUCE


def array(shape, dtype_ops, raw, fortran=pickle.NEWFALSE, version=1):
    return array_head() + tup(i(version), tup(*map(i, shape)), dtype_ops, fortran, b(raw)) + pickle.BUILD


def program(*parts):
    return pickle.PROTO + b"\x04" + b"".join(parts) + pickle.STOP


def write(tmp_path, name, data):
    p = Path(tmp_path) / name
    p.write_bytes(data)
    return p


def bf16_is_intact():
    return (BF16.itemsize == 2 and BF16.alignment == 2
            and np.array([1.5, -2.0], BF16).tobytes() == b"\xc0\x3f\x00\xc0")


@pytest.fixture
def guard_bf16():
    """Fails the test if numpy's process-wide bf16 dtype was changed, then repairs it for the tests that follow."""
    yield
    intact = bf16_is_intact()
    if not intact:
        BF16.__setstate__((3, "<", None, None, None, 2, 2, 64))
    assert intact, "numpy's bfloat16 dtype was modified by a file"


def test_the_assembler_writes_what_numpy_writes():
    """Sanity of the helpers: a hand-assembled f32 array loads exactly like numpy's own pickle of it."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    p = program(array((2, 3), dtype(s("f4")) + dtype_state(-1, -1, 0) + pickle.BUILD, x.tobytes()))
    got = unpickle(io.BytesIO(p), "hand")
    np.testing.assert_array_equal(got, x)
    assert got.flags.writeable and got.flags.owndata and got.dtype == np.float32


# --- the bf16 exploit: BUILD on numpy's dtype, and an array spanning nothing ---------------------------------

# numpy.dtype(bfloat16, copy=False) is the process-wide descriptor; BUILD sets its size to 0 and leaves it so
GLOBAL_BF16 = program(
    dtype(glob("ml_dtypes", "bfloat16"), copy=pickle.NEWFALSE), put(0), dtype_state(0, 1), pickle.BUILD,
    array((1 << 16,), get(0), b""))

# canonical dtype arguments: size 0 while the array is built over b"", then size 2 again, so that the array's
# 65,536 elements are 128 KiB of whatever follows its 0-byte allocation on the heap
HEAP_READ = program(
    dtype(glob("ml_dtypes", "bfloat16")), put(0), dtype_state(0, 1), pickle.BUILD,
    array((1 << 16,), get(0), b""), put(1),
    get(0), dtype_state(2, 2), pickle.BUILD, get(1))


@pytest.mark.parametrize("data", [GLOBAL_BF16, HEAP_READ], ids=["process-wide-dtype", "array-over-heap"])
def test_bf16_exploit_is_refused_and_bf16_stays_intact(tmp_path, data, guard_bf16):
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert ops <= safe_pickle.ALLOWED_OPCODES  # it passes the opcode scan: the stand-ins must stop it
    p = write(tmp_path, "tensor00001_000", data)
    with pytest.raises(UnsafePickleError, match=r"tensor00001_000 \(language_model/rms_norm/scale\).*numpy\.dtype"):
        read_tensor(p, "language_model/rms_norm/scale")
    with pytest.raises(UnsafePickleError, match=r"numpy\.dtype"):  # the stand-ins alone, without the scan
        RestrictedUnpickler(io.BytesIO(data)).load()
    assert bf16_is_intact()


def test_array_state_must_be_canonical(tmp_path, guard_bf16):
    f4 = dtype(s("f4")) + dtype_state(-1, -1, 0) + pickle.BUILD
    x = np.arange(4, dtype=np.float32).tobytes()
    cases = {
        "bytes": (array((1 << 20,), f4, x), r"16 bytes but shape \(1048576,\) of float32 needs 4,194,304"),
        "short": (array((4,), f4, x[:-1]), r"15 bytes"),
        "fortran": (array((2, 2), f4, x, fortran=pickle.NEWTRUE), r"Fortran order"),
        "version": (array((4,), f4, x, version=2), r"version 2"),
        "negative": (array((-4,), f4, x), r"non-negative ints"),
        "bool-dim": (array_head() + tup(i(1), tup(pickle.NEWTRUE), f4, pickle.NEWFALSE, b(x[:4])) + pickle.BUILD,
                     r"non-negative ints"),
        "str-data": (array_head() + tup(i(1), tup(i(1)), f4, pickle.NEWFALSE, s("abcd")) + pickle.BUILD,
                     r"array data is a str"),
        "unbuilt-dtype": (array((4,), dtype(s("f4")), x), r"not a finished numpy\.dtype"),
        "built-twice": (array((4,), f4 + put(0), x) + tup(i(1), tup(i(1)), get(0), pickle.NEWFALSE, b(x[:4]))
                        + pickle.BUILD, r"an array is built twice"),
        "object-dtype": (array((1,), dtype(s("O8")) + dtype_state(-1, -1, 63), x[:8]), r"numpy\.dtype accepts"),
        "big-endian": (array((4,), dtype(s("f4")) + dtype_state(-1, -1, 0, ">") + pickle.BUILD, x), r"numpy writes"),
        "bf16-size": (array((2,), dtype(glob("jax.numpy", "bfloat16")) + dtype_state(4, 4) + pickle.BUILD, x[:8]),
                      r"numpy writes"),
        "subtype": (glob("numpy.core.multiarray", "_reconstruct") + tup(glob("numpy", "dtype"), tup(i(0)), b(b"b"))
                    + pickle.REDUCE, r"reconstructor accepts only"),
    }
    for name, (ops, msg) in cases.items():
        p = write(tmp_path, f"case-{name}", program(ops))
        with pytest.raises(UnsafePickleError, match=rf"case-{name}.*{msg}"):
            read_tensor(p)


def test_what_find_class_returns_is_no_function_or_class_of_ours_or_numpys():
    u = RestrictedUnpickler(io.BytesIO(b""))
    for module, name in [*safe_pickle._ALLOWED, ("ml_dtypes", "bfloat16"), ("jax.numpy", "bfloat16")]:
        obj = u.find_class(module, name)
        assert not isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)), name
        assert obj not in (np.dtype, np.ndarray, ml_dtypes.bfloat16, BF16), name
        assert not hasattr(obj, "__dict__") or isinstance(obj, type), name  # no instance dict to fill
        with pytest.raises(UnsafePickleError):
            obj.__defaults__ = (True, True)


def _snapshot(obj):
    return (getattr(obj, "__defaults__", None), getattr(obj, "__kwdefaults__", None),
            sorted(vars(obj)) if hasattr(obj, "__dict__") else None)


ATTRS = pickle.EMPTY_DICT + pickle.MARK + s("__defaults__") + tup(pickle.NEWTRUE, pickle.NEWTRUE) \
    + s("pwned") + i(1) + pickle.SETITEMS


@pytest.mark.parametrize("form", ["dict-state", "slot-state"])
@pytest.mark.parametrize("target", [*safe_pickle._ALLOWED, ("ml_dtypes", "bfloat16")], ids=".".join)
def test_a_file_cannot_modify_the_loader(tmp_path, target, form):
    """BUILD on a global the file got from find_class (e.g. to set the dtype check's ``__defaults__``)."""
    obj = RestrictedUnpickler(io.BytesIO(b"")).find_class(*target)
    before = _snapshot(obj)
    state = ATTRS if form == "dict-state" else tup(pickle.NONE, ATTRS)
    p = write(tmp_path, "tensor00001_000", program(glob(*target), state, pickle.BUILD))
    with pytest.raises(UnsafePickleError, match=r"tensor00001_000.*may not"):
        read_tensor(p)
    assert _snapshot(obj) == before and not hasattr(obj, "pwned")


@pytest.mark.parametrize("ops, msg", [
    (glob("__main__", "QuantizedWeight8bit") + pickle.EMPTY_TUPLE + pickle.REDUCE, r"only be created by NEWOBJ"),
    (glob("__main__", "QuantizedWeight8bit") + tup(i(1)) + pickle.NEWOBJ, r"takes no constructor arguments"),
    (glob("numpy", "ndarray") + tup(i(3)) + pickle.REDUCE, r"not callable|may not"),
], ids=["call-record", "record-args", "call-ndarray"])
def test_stand_ins_cannot_be_called_their_way(tmp_path, ops, msg):
    p = write(tmp_path, "callme", program(ops))
    with pytest.raises(CheckpointError, match=rf"callme.*({msg})"):
        read_tensor(p)


# --- the opcode pre-scan ------------------------------------------------------------------------------------

F4_ARRAY = array((1,), dtype(s("f4")) + dtype_state(-1, -1, 0) + pickle.BUILD, b"\0" * 4)


@pytest.mark.parametrize("name, ops", [
    ("INST", pickle.MARK + s("f4") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.INST + b"numpy\ndtype\n"),
    ("OBJ", pickle.MARK + glob("numpy", "dtype") + s("f4") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.OBJ),
    ("NEWOBJ_EX", glob("__main__", "QuantizedWeight8bit") + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT
     + pickle.NEWOBJ_EX),
    ("EXT1", pickle.EXT1 + b"\x01"),
    ("PERSID", pickle.PERSID + b"x\n"),
    ("BINPERSID", s("x") + pickle.BINPERSID),
    ("EMPTY_LIST", pickle.EMPTY_LIST + F4_ARRAY + pickle.APPEND),
    ("BINFLOAT", F4_ARRAY + pickle.BINFLOAT + struct.pack(">d", 1.0) + tup()),
    ("POP", F4_ARRAY + i(1) + pickle.POP),
    ("DUP", F4_ARRAY + pickle.DUP),
    ("BYTEARRAY8", pickle.BYTEARRAY8 + struct.pack("<Q", 4) + b"\0" * 4),
])
def test_opcodes_outside_the_format_are_refused_before_loading(tmp_path, name, ops):
    p = write(tmp_path, "tensor00003_000", program(ops))
    with pytest.raises(UnsafePickleError, match=rf"tensor00003_000 \(w\): refused opcode {name} at byte \d+"):
        read_tensor(p, "w")


def test_other_protocols_are_refused(tmp_path):
    p = write(tmp_path, "p5", pickle.dumps(np.ones(3, np.float32), protocol=5))
    with pytest.raises(UnsafePickleError, match=r"p5: pickle protocol 5"):
        read_tensor(p)
    p = write(tmp_path, "p0", pickle.dumps(np.ones(3, np.float32), protocol=0))
    with pytest.raises(CheckpointError, match=r"p0: truncated or corrupt.*protocol header"):
        read_tensor(p)


def test_memo_bomb_is_refused_without_allocating(tmp_path):
    """A genuine 406-byte file plus ``LONG_BINPUT 2**27`` before its last BUILD: without the bound the unpickler
    grows its memo table to 2 GiB, then loads the file normally."""
    genuine = (CKPT / "tensor00001_000").read_bytes()
    assert genuine[2:3] == pickle.FRAME and len(genuine) == 406 and genuine[404:] == pickle.BUILD + pickle.STOP
    frame = struct.unpack("<Q", genuine[3:11])[0]
    bomb = pickle.LONG_BINPUT + struct.pack("<I", 1 << 27)
    data = genuine[:2] + pickle.FRAME + struct.pack("<Q", frame + len(bomb)) + genuine[11:404] + bomb + genuine[404:]
    p = write(tmp_path, "tensor00001_000", data)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(UnsafePickleError, match=r"tensor00001_000.*memo index 134,217,728 at byte 404"):
            read_tensor(p)
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak:,} bytes allocated"
    assert took < 2.0, took


def test_memo_reads_and_opcode_count_are_bounded(tmp_path):
    p = write(tmp_path, "get", program(s("x"), get(5)))
    with pytest.raises(CheckpointError, match=r"get: truncated or corrupt.*reads memo slot 5 but only 0"):
        read_tensor(p)
    p = write(tmp_path, "many", program(pickle.NONE * 20_000, F4_ARRAY))
    with pytest.raises(UnsafePickleError, match=r"many: more than 10,000 pickle opcodes"):
        read_tensor(p)


def test_huge_declared_payload_is_not_allocated(tmp_path):
    p = write(tmp_path, "huge", program(pickle.BINBYTES8 + struct.pack("<Q", 1 << 40) + b"\0" * 16))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"huge: truncated or corrupt.*1099511627776 bytes"):
            read_tensor(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak:,} bytes allocated"


# --- genuine files and the layout check ---------------------------------------------------------------------

def test_genuine_files_use_only_allowed_opcodes_and_globals():
    ops, globals_ = set(), set()

    class Recording(RestrictedUnpickler):
        def find_class(self, module, name):
            globals_.add((module, name))
            return super().find_class(module, name)

    for p in sorted(CKPT.iterdir()):
        ops |= {op.name for op, _, _ in pickletools.genops(p.read_bytes())}
        Recording(io.BytesIO(p.read_bytes())).load()
    assert ops <= safe_pickle.ALLOWED_OPCODES, ops - safe_pickle.ALLOWED_OPCODES
    assert globals_ == {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                        ("ml_dtypes", "bfloat16"), ("__main__", "QuantizedWeight8bit")}


@pytest.mark.parametrize("protocol", [3, 4])
@pytest.mark.parametrize("dt", ["float32", "float16", "float64", "bfloat16", "int8", "uint8", "int32", "int64",
                                "bool"])
def test_numpy_pickles_of_every_allowed_dtype_round_trip(dt, protocol):
    x = (np.arange(24).reshape(2, 3, 4) % 5).astype(ml_dtypes.bfloat16 if dt == "bfloat16" else dt)
    for a in (x, x[:1, :1, :1].reshape(()), x[:0]):  # also 0-d and empty
        got = unpickle(io.BytesIO(pickle.dumps(a, protocol=protocol)), "rt")
        assert got.dtype == a.dtype and got.shape == a.shape and got.tobytes() == a.tobytes()
        assert got.flags.writeable and got.flags.owndata and got.flags.c_contiguous


def test_layout_check_refuses_views_and_odd_strides():
    a = np.zeros((4, 4), np.float32)
    check_layout(a.copy(), "ok", "f")
    for bad in (a[:, ::2], a.T, a[1:], np.zeros(3, ">f4"),
                np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (8,), (0,))):
        with pytest.raises(CheckpointError, match=r"f: w has a non-canonical layout"):
            check_layout(bad, "w", "f")
    for shape in ((2, 1, 3), (5,), (1, 1), ()):
        assert safe_pickle.c_strides(shape, 4) == np.zeros(shape, np.float32).strides

"""Reading the Grok-1 release checkpoint (spec §5) without executing anything from it.

The release is a directory ``ckpt-0/`` of pickles named ``tensor{i:05d}_{host:03d}``, one per parameter, in the
reference's sorted-key order (:func:`grokviz.checkpoint.reference_paths`: lexicographic layer numbers). Each file
holds a float numpy array or a ``__main__.QuantizedWeight8bit`` (int8 weight + bf16 scales).

Safety: :class:`RestrictedUnpickler` resolves only the handful of globals this format needs — numpy's array
reconstructor (wrapped so that it can build nothing but a plain ``ndarray``), ``numpy.dtype`` (numeric dtypes
only), any global named ``bfloat16`` (mapped to ``ml_dtypes.bfloat16``) and ``QuantizedWeight8bit`` (mapped to a
passive two-field record that becomes :class:`grokviz.params.Int8Weight`). Any other global is refused with an
:class:`UnsafePickleError` naming the file and the class, *before* it can be called.

Validation happens in two stages: :func:`scan_release` checks the file set (missing / extra / duplicated) and each
file's size against the config (truncated, or too large to fit) before anything is read; then each tensor is
checked against its expected shape as it is read (:func:`iter_release`), one file at a time.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from .names import reference_paths
from ..config import GrokConfig
from ..params import Int8Weight, shapes_dict

RELEASE_SUBDIR = "ckpt-0"
FILE_RE = re.compile(r"^tensor(\d{5})_(\d{3})$")
#: parameters the release stores as int8 + scales (spec §5.1); the others are plain float arrays
QUANTIZABLE = frozenset({"w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down"})
#: pickle bytes beyond the raw payload that we tolerate before calling a file "too large for its parameter"
PICKLE_OVERHEAD = 4096

_NUMERIC_CODES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8",
                            "?", "b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "e", "f", "d"})
_ALLOWED_DTYPES = frozenset(np.dtype(c) for c in ("int8", "uint8", "int16", "int32", "int64", "float16",
                                                  "float32", "float64", "bool")) | {np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be loaded; the message names the file and the parameter."""


class UnsafePickleError(CheckpointError, pickle.UnpicklingError):
    """A pickle asked for a global outside the release format's allow-list; nothing from it was executed."""


class _NdarrayClass:
    """Stands in for ``numpy.ndarray`` inside a pickle: only usable as the subtype argument of the reconstructor."""

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError("numpy.ndarray may only appear as an argument of the array reconstructor")


_NDARRAY = _NdarrayClass()


class QuantizedRecord:
    """Passive stand-in for the release's ``QuantizedWeight8bit``: accepts exactly the state {weight, scales}."""

    __slots__ = ("weight", "scales")

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]  # (dict-state, slot-state) form
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise UnsafePickleError(f"QuantizedWeight8bit state must be {{weight, scales}}, got {keys}")
        for k, v in state.items():
            if not isinstance(v, np.ndarray):
                raise UnsafePickleError(f"QuantizedWeight8bit.{k} must be an ndarray, got {type(v).__name__}")
            object.__setattr__(self, k, v)


def _safe_reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"the array reconstructor may only build numpy.ndarray, not {subtype!r}")
    if not isinstance(typecode, (bytes, str)) or len(typecode) != 1:
        raise UnsafePickleError(f"bad array typecode {typecode!r}")
    # an empty placeholder: the BUILD step (ndarray.__setstate__) sets the real shape, dtype and data
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _safe_dtype(obj, align=False, copy=True):
    if not (isinstance(align, bool) and isinstance(copy, bool)):
        raise UnsafePickleError("numpy.dtype arguments must be booleans")
    if obj is ml_dtypes.bfloat16 or (isinstance(obj, str) and obj in _NUMERIC_CODES):
        return np.dtype(obj, align, copy)
    raise UnsafePickleError(f"numpy.dtype({obj!r}) is not a numeric dtype this format uses")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _safe_dtype,
    ("__main__", "QuantizedWeight8bit"): QuantizedRecord,
    ("model", "QuantizedWeight8bit"): QuantizedRecord,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the release format's globals (see the module docstring)."""

    def __init__(self, file, *, name: str = "<pickle>"):
        super().__init__(file)
        self.name = name

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if name == "bfloat16":  # the module of the bf16 type is not fixed across writers (spec §5.2)
            return ml_dtypes.bfloat16
        raise UnsafePickleError(f"{self.name}: refused to load global {module}.{name}: it is not part of the "
                                f"Grok-1 checkpoint format (only numpy arrays/dtypes and QuantizedWeight8bit "
                                f"are allowed); nothing from this file was executed")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.name}: persistent ids are not part of the checkpoint format")


def _check_array(a, what: str, file: str) -> np.ndarray:
    if type(a) is not np.ndarray:
        raise CheckpointError(f"{file}: {what} is a {type(a).__name__}, expected a numpy array")
    if a.dtype not in _ALLOWED_DTYPES:
        raise CheckpointError(f"{file}: {what} has dtype {a.dtype}, which the checkpoint format does not use")
    return a


def read_tensor(path: str | os.PathLike, param: str | None = None):
    """Unpickle one release file safely -> ``np.ndarray`` or ``Int8Weight`` of numpy arrays.

    Errors (:class:`CheckpointError`) name the file and, when given, the parameter it should hold.
    """
    path = Path(path)
    label = f"{path}" + (f" ({param})" if param else "")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(io.BufferedReader(f, 1 << 20), name=label).load()
    except UnsafePickleError as e:
        if label not in str(e):
            raise UnsafePickleError(f"{label}: {e}") from None
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{label}: file is missing") from None
    except Exception as e:  # EOFError, UnpicklingError, ValueError, struct errors, ...
        raise CheckpointError(f"{label}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, QuantizedRecord):
        if not hasattr(obj, "weight") or not hasattr(obj, "scales"):
            raise CheckpointError(f"{label}: QuantizedWeight8bit without weight/scales")
        w = _check_array(obj.weight, "QuantizedWeight8bit.weight", label)
        s = _check_array(obj.scales, "QuantizedWeight8bit.scales", label)
        if w.dtype != np.int8:
            raise CheckpointError(f"{label}: quantised weight has dtype {w.dtype}, expected int8")
        if not np.issubdtype(s.dtype, np.floating) and s.dtype != ml_dtypes.bfloat16:
            raise CheckpointError(f"{label}: quantisation scales have dtype {s.dtype}, expected a float type")
        ok = (w.ndim >= 2 and s.ndim == w.ndim and s.shape[:-2] == w.shape[:-2] and s.shape[-1] == w.shape[-1]
              and s.shape[-2] > 0 and w.shape[-2] % s.shape[-2] == 0)
        if not ok:
            raise CheckpointError(f"{label}: scales of shape {s.shape} do not fit int8 weight of shape {w.shape}")
        return Int8Weight(weight=w, scales=s)
    arr = _check_array(obj, "the pickled object", label)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != ml_dtypes.bfloat16:
        raise CheckpointError(f"{label}: plain tensor has dtype {arr.dtype}, expected a float type")
    return arr


def dequantize_np(w: Int8Weight, dtype=np.float32) -> np.ndarray:
    """Exact fp32 dequantisation on the host (spec §5.1), then a cast to ``dtype``."""
    q, s = np.asarray(w.weight), np.asarray(w.scales).astype(np.float32)
    nb, rows = s.shape[-2], q.shape[-2]
    blocked = q.reshape(*q.shape[:-2], nb, rows // nb, q.shape[-1]).astype(np.float32) * s[..., :, None, :]
    return blocked.reshape(q.shape).astype(dtype)


# --- the directory ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReleaseEntry:
    index: int
    file: Path
    ref_path: str          # reference haiku path
    name: str              # grokviz leaf name
    layer: int | None
    shape: tuple           # expected logical shape (one layer)


def release_dir(path: str | os.PathLike) -> Path:
    """The directory holding the tensor files: ``path/ckpt-0`` if it exists, else ``path`` itself."""
    p = Path(path)
    if (p / RELEASE_SUBDIR).is_dir():
        return p / RELEASE_SUBDIR
    return p


def is_release(path: str | os.PathLike) -> bool:
    d = release_dir(path)
    return d.is_dir() and any(FILE_RE.match(n) for n in os.listdir(d))


def tensor_files(path) -> dict[int, Path]:
    """{index: file} for one host, raising on duplicate indices across hosts we cannot disambiguate."""
    d = release_dir(path)
    if not d.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a release checkpoint with {RELEASE_SUBDIR}/)")
    return {int(m.group(1)): d / n for n in sorted(os.listdir(d)) if (m := FILE_RE.match(n))}


def _payload_bounds(name: str, shape: tuple) -> tuple[int, int]:
    """(smallest, largest) plausible payload bytes for a parameter of ``shape`` (one layer)."""
    n = int(np.prod(shape, dtype=np.int64))
    if name in QUANTIZABLE:
        rows_out = shape[-2] * shape[-1]
        lead = n // rows_out
        # int8 weight + at least one row of 2-byte scales  ..  a plain fp64 array
        return n + lead * shape[-1] * 2, n * 8
    return n * 2, n * 8


def scan_release(path, cfg: GrokConfig, *, host: int = 0) -> list[ReleaseEntry]:
    """Check the file set and sizes against ``cfg`` without reading any tensor; returns the entries in file order.

    Raises :class:`CheckpointError` for missing files, extra files, or files whose size cannot hold (truncated)
    or exceeds (wrong shape) the parameter the config expects there.
    """
    d = release_dir(path)
    if not d.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    names = sorted(os.listdir(d))
    files = {}
    for n in names:
        m = FILE_RE.match(n)
        if m and int(m.group(2)) == host:
            files[int(m.group(1))] = d / n
    table = reference_paths(cfg)
    shapes = shapes_dict(cfg)
    missing = [i for i in range(len(table)) if i not in files]
    if missing:
        first = missing[0]
        fname = f"tensor{first:05d}_{host:03d}"
        raise CheckpointError(f"{d}: {len(missing)} tensor file(s) missing, first {fname} "
                              f"(parameter {table[first][0]}); config {cfg.name!r} expects {len(table)} files "
                              f"tensor00000_{host:03d} .. tensor{len(table) - 1:05d}_{host:03d}")
    extra = sorted(i for i in files if i >= len(table))
    if extra:
        raise CheckpointError(f"{d}: unexpected extra tensor file(s) {[files[i].name for i in extra][:5]}; config "
                              f"{cfg.name!r} ({cfg.num_layers} layers) has only {len(table)} parameters. "
                              f"Is the config right?")
    entries = []
    for i, (ref, name, layer) in enumerate(table):
        shape = tuple(shapes[name]) if layer is None else tuple(shapes["blocks"][name][1:])
        f = files[i]
        size = f.stat().st_size
        lo, hi = _payload_bounds(name, shape)
        if size < lo:
            raise CheckpointError(f"{f}: file is truncated or too small for parameter {ref} of shape {shape}: "
                                  f"{size:,} bytes, expected at least {lo:,}")
        if size > hi + PICKLE_OVERHEAD:
            raise CheckpointError(f"{f}: file is too large for parameter {ref} of shape {shape} ({size:,} bytes, "
                                  f"at most {hi + PICKLE_OVERHEAD:,} expected): the checkpoint does not match "
                                  f"config {cfg.name!r}")
        entries.append(ReleaseEntry(i, f, ref, name, layer, shape))
    return entries


def check_tensor(value, entry: ReleaseEntry):
    """Shape check of one read tensor against its entry; raises CheckpointError naming file and parameter."""
    if tuple(value.shape) != entry.shape:
        raise CheckpointError(f"{entry.file}: parameter {entry.ref_path} has shape {tuple(value.shape)} but the "
                              f"config expects {entry.shape}")
    if isinstance(value, Int8Weight) and entry.name not in QUANTIZABLE:
        raise CheckpointError(f"{entry.file}: parameter {entry.ref_path} is quantised, but the release never "
                              f"quantises it")
    return value


def iter_release(path, cfg: GrokConfig, *, host: int = 0, progress: bool = True
                 ) -> Iterator[tuple[ReleaseEntry, object]]:
    """Validate the directory, then yield ``(entry, tensor)`` one file at a time (bounded memory)."""
    entries = scan_release(path, cfg, host=host)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(e.file.stat().st_size for e in entries), unit="B", unit_scale=True,
                   desc=f"loading {release_dir(path).parent.name or 'checkpoint'}")
    try:
        for e in entries:
            value = check_tensor(read_tensor(e.file, e.ref_path), e)
            if bar is not None:
                bar.update(e.file.stat().st_size)
            yield e, value
    finally:
        if bar is not None:
            bar.close()


def infer_release_shapes(path, *, host: int = 0) -> dict:
    """Sizes recoverable from a release directory (reads the embedding and layer-0 files only).

    The release does not record how the query width splits into heads; ``head_dim`` is not returned.
    """
    files = tensor_files(path)
    files = {i: f for i, f in files.items() if f.name.endswith(f"_{host:03d}")}
    n = len(files)
    if n < 14 or (n - 2) % 12:
        raise CheckpointError(f"{release_dir(path)}: {n} tensor files is not 2 + 12 x layers")
    probe = GrokConfig.tiny(num_layers=(n - 2) // 12)
    table = reference_paths(probe)
    by_path = {ref: i for i, (ref, _, _) in enumerate(table)}
    pre = "transformer/decoder_layer_0/"

    def shape(ref):
        return tuple(read_tensor(files[by_path[ref]], ref).shape)

    V, D = shape("language_model/in_out_embed/embeddings")
    E, _, F = shape(pre + "moe/linear/w")
    return dict(num_layers=(n - 2) // 12, vocab_size=V, d_model=D, num_experts=E, ffn_size=F,
                q_width=shape(pre + "multi_head_attention/query/w")[1],
                kv_width=shape(pre + "multi_head_attention/key/w")[1], files=n)


def config_from_release_shapes(info: dict) -> GrokConfig | None:
    """The Grok-1 preset if the inferred sizes are Grok-1's, else None (head split unknown)."""
    g = GrokConfig.grok1()
    want = dict(num_layers=g.num_layers, vocab_size=g.vocab_size, d_model=g.d_model, num_experts=g.num_experts,
                ffn_size=g.ffn_size, q_width=g.q_width, kv_width=g.kv_width)
    return g if all(info.get(k) == v for k, v in want.items()) else None

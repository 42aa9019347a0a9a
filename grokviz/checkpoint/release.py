"""Reading the Grok-1 release checkpoint without executing anything from it.

The release is a directory ``ckpt-0/`` of pickles named ``tensor{i:05d}_{host:03d}``, one per parameter and
host, in the reference's sorted-key order (:func:`grokviz.checkpoint.reference_paths`: lexicographic layer
numbers). Each file holds a float numpy array or a ``__main__.QuantizedWeight8bit`` (int8 weight + bf16 scales).

Safety lives in :mod:`.safe_pickle`: an opcode pre-scan (only the opcodes these pickles use, memo slots in order,
a bounded opcode count), globals that resolve to inert stand-ins instead of numpy's real objects, and sketches
that turn into arrays only from the exact state numpy writes, with the payload length checked against the shape.
:func:`read_tensor` then checks each array's layout (owned, C-ordered, canonical strides and itemsize), its dtype
and, for quantised weights, that the scales fit the weight. Anything else raises :class:`CheckpointError` (or
its subclass :class:`UnsafePickleError`) naming the file and the parameter.

Validation of a directory happens in two stages: :func:`scan_release` checks one host's file set (missing /
extra) and each file's size against the config (truncated, or too large to fit) before anything is read; then
each tensor is checked against its expected shape as it is read (:func:`iter_release`), one file at a time.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from ..config import GrokConfig
from ..params import Int8Weight, shapes_dict
from .names import reference_paths
from .release_shards import _CountingFile, _unpickle_layout
from .safe_pickle import ArrayLayout, QuantizedRecord, check_layout, unpickle
from .safe_pickle import CheckpointError as CheckpointError
from .safe_pickle import RestrictedUnpickler as RestrictedUnpickler  # re-exported: the allow-listed unpickler
from .safe_pickle import UnsafePickleError as UnsafePickleError

RELEASE_SUBDIR = "ckpt-0"
FILE_RE = re.compile(r"^tensor(\d{5})_(\d{3})$")
#: parameters the release stores as int8 + scales (docs/grok1.md#checkpoint); the others are plain float arrays
QUANTIZABLE = frozenset({"w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down"})
#: pickle bytes beyond the raw payload that we tolerate before calling a file "too large for its parameter"
PICKLE_OVERHEAD = 4096

_ALLOWED_DTYPES = frozenset(np.dtype(c) for c in ("int8", "uint8", "int16", "int32", "int64", "float16",
                                                  "float32", "float64", "bool")) | {np.dtype(ml_dtypes.bfloat16)}


def _check_array(a, what: str, file: str):
    if type(a) is ArrayLayout:  # from the layout reader: C-ordered and canonical by construction
        if a.dtype not in _ALLOWED_DTYPES:
            raise CheckpointError(f"{file}: {what} has dtype {a.dtype}, which the checkpoint format does not use")
        return a
    if type(a) is not np.ndarray:
        raise CheckpointError(f"{file}: {what} is a {type(a).__name__}, expected a numpy array")
    if a.dtype not in _ALLOWED_DTYPES:
        raise CheckpointError(f"{file}: {what} has dtype {a.dtype}, which the checkpoint format does not use")
    return check_layout(a, what, file)


def _unpickled(path: Path, param, load, buffering: int = 1 << 20):
    """``load(open file, label)`` with read_tensor's translation of every failure into a CheckpointError."""
    label = f"{path}" + (f" ({param})" if param else "")
    try:
        with open(path, "rb", buffering=buffering) as f:
            return load(f, label), label
    except UnsafePickleError as e:
        if label not in str(e):
            raise UnsafePickleError(f"{label}: {e}") from None
        raise
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{label}: file is missing") from None
    except Exception as e:  # EOFError, UnpicklingError, ValueError, struct errors, ...
        raise CheckpointError(f"{label}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def read_tensor(path: str | os.PathLike, param: str | None = None):
    """Unpickle one release file safely -> ``np.ndarray`` or ``Int8Weight`` of numpy arrays.

    Errors (:class:`CheckpointError`) name the file and, when given, the parameter it should hold.
    """
    obj, label = _unpickled(Path(path), param, unpickle)
    return checked_value(obj, label)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One release file's tensor: ``value`` (an ArrayLayout / ndarray, or an Int8Weight of two), the file, and the
    bytes the parse read (opcodes and short payloads)."""

    value: object
    file: Path
    header_bytes: int

    @property
    def shape(self):
        return tuple(self.value.shape)


def read_layout(path, param: str | None = None) -> Layout:
    """:func:`read_tensor` without reading the payloads (:mod:`.release_shards`): the same checks and errors, and
    :class:`~.safe_pickle.ArrayLayout` records (shape, dtype, file offset) instead of arrays."""
    path = Path(path)
    counted = {}

    def load(f, label):
        counter = _CountingFile(f)
        out = _unpickle_layout(counter, label)
        counted["n"] = counter.n
        return out

    obj, label = _unpickled(path, param, load, buffering=0)  # unbuffered: no read-ahead into the payloads
    return Layout(checked_value(obj, label), path, counted["n"])


def checked_value(obj, label: str):
    """The checks of :func:`read_tensor` on an unpickled object (arrays, or the layout reader's
    :class:`~.safe_pickle.ArrayLayout`): array types and layouts, dtypes, and scales that fit their weight."""
    if isinstance(obj, QuantizedRecord):
        if not hasattr(obj, "weight") or not hasattr(obj, "scales"):
            raise CheckpointError(f"{label}: QuantizedWeight8bit without weight/scales")
        w = _check_array(obj.weight, "QuantizedWeight8bit.weight", label)
        s = _check_array(obj.scales, "QuantizedWeight8bit.scales", label)
        if w.dtype != np.int8:
            raise CheckpointError(f"{label}: quantised weight has dtype {w.dtype}, expected int8")
        if not np.issubdtype(s.dtype, np.floating) and s.dtype != ml_dtypes.bfloat16:
            raise CheckpointError(f"{label}: quantisation scales have dtype {s.dtype}, expected a float type")
        ws, ss = w.shape, s.shape
        ok = (len(ws) >= 2 and len(ss) == len(ws) and ss[:-2] == ws[:-2] and ss[-1] == ws[-1]
              and ss[-2] > 0 and ws[-2] % ss[-2] == 0)
        if not ok:
            raise CheckpointError(f"{label}: scales of shape {ss} do not fit int8 weight of shape {ws}")
        return Int8Weight(weight=w, scales=s)
    arr = _check_array(obj, "the pickled object", label)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != ml_dtypes.bfloat16:
        raise CheckpointError(f"{label}: plain tensor has dtype {arr.dtype}, expected a float type")
    return arr


def dequantize_np(w: Int8Weight, dtype=np.float32) -> np.ndarray:
    """Exact fp32 dequantisation on the host (docs/grok1.md#checkpoint), then a cast to ``dtype``."""
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


def tensor_files(path, host: int = 0) -> dict[int, Path]:
    """{index: file} of the files written by ``host`` (``tensor{index:05d}_{host:03d}``); other hosts' files are
    ignored, so a multi-host directory never mixes two hosts' parts of one tensor."""
    d = release_dir(path)
    if not d.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a release checkpoint with {RELEASE_SUBDIR}/)")
    if type(host) is not int or not 0 <= host <= 999:
        raise CheckpointError(f"{path}: host must be an int in 0..999 (the file suffix _000 .. _999), got {host!r}")
    return {int(m.group(1)): d / n for n in sorted(os.listdir(d))
            if (m := FILE_RE.match(n)) and int(m.group(2)) == host}


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
    files = tensor_files(d, host)
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
    """Sizes recoverable from a release directory (parses the embedding and layer-0 files only, without reading
    their payloads).

    The release does not record how the query width splits into heads; ``head_dim`` is not returned.
    """
    files = tensor_files(path, host)
    n = len(files)
    if n < 14 or (n - 2) % 12:
        raise CheckpointError(f"{release_dir(path)}: {n} tensor files is not 2 + 12 x layers")
    probe = GrokConfig.golden(num_layers=(n - 2) // 12)
    table = reference_paths(probe)
    by_path = {ref: i for i, (ref, _, _) in enumerate(table)}
    pre = "transformer/decoder_layer_0/"

    def shape(ref, ndim):  # from the pickle's opcodes only: the payloads are not read
        file = files[by_path[ref]]
        got = read_layout(file, ref).shape
        if len(got) != ndim:
            raise CheckpointError(f"{file} ({ref}): shape {got}, expected {ndim} dimensions")
        return got

    V, D = shape("language_model/in_out_embed/embeddings", 2)
    E, _, F = shape(pre + "moe/linear/w", 3)
    return dict(num_layers=(n - 2) // 12, vocab_size=V, d_model=D, num_experts=E, ffn_size=F,
                q_width=shape(pre + "multi_head_attention/query/w", 2)[1],
                kv_width=shape(pre + "multi_head_attention/key/w", 2)[1], files=n)


def config_from_release_shapes(info: dict) -> GrokConfig | None:
    """The Grok-1 preset if the inferred sizes are Grok-1's, else None (head split unknown)."""
    g = GrokConfig.grok1()
    want = dict(num_layers=g.num_layers, vocab_size=g.vocab_size, d_model=g.d_model, num_experts=g.num_experts,
                ffn_size=g.ffn_size, q_width=g.q_width, kv_width=g.kv_width)
    return g if all(info.get(k) == v for k, v in want.items()) else None

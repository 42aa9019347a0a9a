"""Study files: results and progress checkpoints as ``.npz`` (no pickles) with a JSON ``meta`` entry and a SHA-256
over everything, written atomically (temporary file in the same folder, fsync, rename, fsync of the folder), so a
reader sees the old file or the new one, never half of one; a damaged or foreign file is refused with a
``ValueError`` that says what to do."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path

import numpy as np

RESULTS_FORMAT = "grokviz-study-results"
PROGRESS_FORMAT = "grokviz-study-progress"
VERSION = 1
#: test hook: "<process>:<round>:<point>" SIGKILLs that process there (points: "start" of the round, "write":
#: after the progress file's temporary copy is written, before it replaces the old one)
FAULT_ENV = "GROKVIZ_STUDY_FAULT"


def fault(point: str, round_: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    import jax

    proc, r, where = spec.split(":")
    if int(proc) == jax.process_index() and int(r) == round_ and where == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _digest(meta_json: str, arrays: dict) -> str:
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write(path: Path, meta: dict, arrays: dict, *, fault_round: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_json = json.dumps(meta, sort_keys=True)
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(meta_json), checksum=np.array(_digest(meta_json, arrays)), **arrays)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    if fault_round is not None:
        fault("write", fault_round)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path, fmt: str, fingerprint: str | None = None, what: str = "file") -> tuple[dict, dict]:
    """(meta, arrays) of a file written by :func:`write`; ValueError when it is damaged, of another format or
    (``fingerprint`` given) of another study."""
    path = Path(path)
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta_json = str(arrays.pop("meta"))
        checksum = str(arrays.pop("checksum"))
        meta = json.loads(meta_json)
    except Exception as e:  # noqa: BLE001 - any failure to parse means a damaged file
        raise ValueError(f"{what} {path} is corrupt or not a grokviz study file ({type(e).__name__}: {e}); delete "
                         f"it to start over") from None
    if _digest(meta_json, arrays) != checksum:
        raise ValueError(f"{what} {path} is corrupt (its SHA-256 does not match its contents); delete it to start "
                         f"over")
    if meta.get("format") != fmt or meta.get("version") != VERSION:
        raise ValueError(f"{what} {path} is a {meta.get('format')!r} v{meta.get('version')} file, not {fmt!r} "
                         f"v{VERSION}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{what} {path} belongs to another study (fingerprint {str(meta.get('fingerprint'))[:12]} "
                         f"!= this spec's {fingerprint[:12]}: a different model, dataset or setting); delete it or "
                         f"point 'output'/'progress' elsewhere")
    return meta, arrays

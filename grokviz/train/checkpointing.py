"""Training checkpoints (parameters + optimiser state + history) and the checks that make resuming safe.

A checkpoint is one ``.npz`` file: ``leaf_00000 ...`` (the leaves of ``(params, opt_state)`` in tree order) and
``info`` (JSON: format, version, step, history, the model config and TrainConfig of the run, and every leaf's
tree path, shape and dtype). Writes are atomic: a temp file in the same folder is written, flushed and fsynced,
then ``os.replace``d over the destination, so an interruption leaves either the old or the new checkpoint.

Resuming checks everything that would make the continued run differ from an uninterrupted one: the architecture,
every TrainConfig field that shapes the optimisation (:data:`~grokviz.train.config.RUN_FIELDS`), the step (within
the run), and each leaf's path, shape and dtype. Any mismatch or an unreadable file raises
:class:`TrainCheckpointError` naming the file and the fix (``--no-resume``).
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..checkpoint.fsutil import atomic_file
from ..config import GrokConfig
from .config import RUN_FIELDS, TrainConfig

FORMAT = "grokviz-train-state"
VERSION = 2
ADVICE = "delete it, or pass --no-resume (train(..., resume=False)) to start the run afresh"


class TrainCheckpointError(ValueError):
    """A training checkpoint that cannot be resumed from (unreadable, or from a different run)."""


def run_meta(cfg: GrokConfig, tc: TrainConfig) -> dict:
    return {"cfg": dataclasses.asdict(cfg), "tc": dataclasses.asdict(tc)}


def _leaf_table(tree) -> list[dict]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [{"path": jax.tree_util.keystr(p), "shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype))}
            for p, x in flat]


def save_checkpoint(path, params, opt_state, step: int, history: dict, meta: dict | None = None) -> None:
    """Write the training state to ``path`` atomically (:func:`grokviz.checkpoint.fsutil.atomic_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = (params, opt_state)
    leaves = jax.tree_util.tree_leaves(state)
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    info = {"format": FORMAT, "version": VERSION, "step": int(step), "history": _jsonable(history),
            "meta": meta or {}, "leaves": _leaf_table(state)}
    arrays["info"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def _fail(path, what: str):
    raise TrainCheckpointError(f"{path}: cannot resume from this training checkpoint: {what}; {ADVICE}")


def read_info(path) -> dict:
    """The checkpoint's ``info`` record (format checked), without its arrays."""
    try:
        with open(path, "rb") as f, np.load(f) as z:
            info = json.loads(bytes(z["info"]).decode())
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        _fail(path, f"the file is unreadable or corrupt ({type(e).__name__}: {e})")
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        got = (info.get("format"), info.get("version")) if isinstance(info, dict) else type(info).__name__
        _fail(path, f"format {got}, expected ({FORMAT!r}, {VERSION}) (written by another grokviz version?)")
    return info


def check_run(path, info: dict, cfg: GrokConfig, tc: TrainConfig) -> None:
    """Raise unless the checkpoint was written by a run with this architecture and these run-shaping fields."""
    meta = info.get("meta") or {}
    stored_cfg, stored_tc = meta.get("cfg"), meta.get("tc")
    if not isinstance(stored_cfg, dict) or not isinstance(stored_tc, dict):
        _fail(path, "it does not record the model config and TrainConfig of its run")
    ours = _jsonable(dataclasses.asdict(cfg))
    diff = [f"{k}: checkpoint {stored_cfg.get(k)!r}, this run {v!r}" for k, v in ours.items()
            if k != "name" and stored_cfg.get(k) != v]
    if diff:
        _fail(path, "it was written for another architecture (" + "; ".join(diff) + ")")
    ours = _jsonable(dataclasses.asdict(tc))
    diff = [f"{k}: checkpoint {stored_tc.get(k)!r}, this run {ours[k]!r}" for k in RUN_FIELDS
            if stored_tc.get(k) != ours[k]]
    if diff:
        _fail(path, "it was written by a run with other training settings, so resuming would not reproduce "
                    "either run (" + "; ".join(diff) + ")")
    step = info.get("step")
    if not isinstance(step, int) or not 0 <= step <= tc.steps:
        _fail(path, f"its step {step!r} is outside this run's 0..{tc.steps} steps")


def load_checkpoint(path, params_like, opt_state_like, *, cfg: GrokConfig | None = None,
                    tc: TrainConfig | None = None):
    """-> (params, opt_state, step, history, meta). The pytree structure comes from the ``*_like`` templates;
    every stored leaf must have the template's tree path, shape and dtype. With ``cfg`` and ``tc``, the run is
    checked too (:func:`check_run`)."""
    info = read_info(path)
    if cfg is not None and tc is not None:
        check_run(path, info, cfg, tc)
    template = (params_like, opt_state_like)
    want = _leaf_table(template)
    have = info.get("leaves")
    if not isinstance(have, list) or len(have) != len(want):
        _fail(path, f"it holds {len(have) if isinstance(have, list) else 'an unknown number of'} state arrays, "
                    f"this run has {len(want)}")
    for i, (h, w) in enumerate(zip(have, want)):
        if h != w:
            _fail(path, f"state array {i} is {h.get('path')} {h.get('dtype')}{h.get('shape')}, this run expects "
                        f"{w['path']} {w['dtype']}{w['shape']}")
    leaves = []
    try:
        with open(path, "rb") as f, np.load(f) as z:
            for i, w in enumerate(want):
                a = z[f"leaf_{i:05d}"]
                if list(a.shape) != w["shape"] or str(a.dtype) != w["dtype"]:
                    _fail(path, f"stored array leaf_{i:05d} ({w['path']}) is {a.dtype}{list(a.shape)}, its record "
                                f"says {w['dtype']}{w['shape']}")
                leaves.append(jnp.asarray(a))
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        if isinstance(e, TrainCheckpointError):
            raise
        _fail(path, f"the file is unreadable or corrupt ({type(e).__name__}: {e})")
    params, opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
    return params, opt_state, info["step"], info["history"], info.get("meta", {})


def _jsonable(h):
    if isinstance(h, dict):
        return {k: _jsonable(v) for k, v in h.items()}
    if isinstance(h, (list, tuple)):
        return [_jsonable(v) for v in h]
    if isinstance(h, np.ndarray):
        return h.tolist()
    if isinstance(h, (np.floating, np.integer)):
        return h.item()
    return h

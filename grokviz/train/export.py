"""Writing a trained model in grokviz's converted format (the format of the bundled tiny model), so that
``gv.load(folder)`` opens it; the training output folder also holds the resume checkpoint and the history."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from ..checkpoint import converted
from ..checkpoint.fsutil import write_file_atomic
from ..config import GrokConfig
from .config import TOKENIZER_PATH

CHECKPOINT = "checkpoint.npz"
HISTORY = "history.json"
TRAINING = "training.json"   # training settings, final evaluation and timings (next to the converted model)
_OWN = {CHECKPOINT, HISTORY, TRAINING, converted.CONFIG, converted.INDEX, converted.TOKENIZER,
        "model.safetensors"}  # the last: output of grokviz versions before the converted format
# the shards, and the temporary files of interrupted writes (fsutil.atomic_file's names, and older ones)
_OWN_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|\.(checkpoint\.npz|history\.json|training\.json)\.tmp-\d+-.+"
                     r"|checkpoint\.npz\..+\.tmp|(history|training)\.json\.tmp")


def check_out_dir(out) -> Path:
    """``out`` as a Path, refusing a folder that holds anything ``grokviz train`` does not write there (the final
    write replaces the folder as a whole)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN and not _OWN_RE.fullmatch(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise FileExistsError(f"--out {out}: holds files that grokviz train did not write ({shown}); the "
                                  f"finished model replaces the whole folder, so choose a new or empty folder")
    return out


def save_model(out_dir, cfg: GrokConfig, params, *, tokenizer_path=TOKENIZER_PATH, extra: dict | None = None,
               history: dict | None = None) -> Path:
    """Write ``params`` as a converted checkpoint at ``out_dir`` (replacing the folder atomically), plus
    ``training.json`` (``extra``) and ``history.json``. A resume checkpoint already in the folder is kept: it is
    moved aside (``os.replace``, same file system) while the folder is replaced, then moved back."""
    out = check_out_dir(out_dir)
    kept = out / CHECKPOINT
    aside = None
    if kept.is_file():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.keep-", dir=out.resolve().parent))
        os.replace(kept, aside / CHECKPOINT)
    try:
        converted.save(params, out, cfg, tokenizer=tokenizer_path, overwrite=True)
    finally:
        if aside is not None:
            out.mkdir(parents=True, exist_ok=True)
            os.replace(aside / CHECKPOINT, out / CHECKPOINT)
            aside.rmdir()
    if extra is not None:
        _write_json(out / TRAINING, extra)
    if history is not None:
        _write_json(out / HISTORY, history)
    return out


def _write_json(path: Path, obj) -> None:
    from .checkpointing import _jsonable

    write_file_atomic(path, (json.dumps(_jsonable(obj), indent=1) + "\n").encode())

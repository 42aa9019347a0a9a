"""Helpers shared by tests, notebooks and benchmarks: the golden data and small random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from .checkpoint.names import params_from_reference
from .config import GrokConfig
from .params import init_params

REPO = Path(__file__).resolve().parent.parent
GOLDEN_NPZ = "grok1_golden.npz"


def golden_dir() -> Path:
    """tests/data (committed copy of the golden files), or $GROKVIZ_GOLDEN_DIR."""
    return Path(os.environ.get("GROKVIZ_GOLDEN_DIR", REPO / "tests" / "data"))


def load_golden(path: str | Path | None = None):
    """(cfg, params, npz) of the golden tiny model produced by the official Grok-1 code."""
    path = Path(path) if path else golden_dir() / GOLDEN_NPZ
    z = np.load(path)
    fields = json.loads(str(z["config_json"]))
    cfg = GrokConfig.from_reference(ignore_generator_fields=True, **fields).replace(name="grok1-golden")
    flat = {k: z[k] for k in z.files if k.startswith("params/")}
    return cfg, params_from_reference(flat, cfg), z


def random_model_parts(cfg: GrokConfig | None = None, seed: int = 0):
    cfg = cfg or GrokConfig.golden()
    return cfg, init_params(cfg, jax.random.key(seed))


def random_tokens(cfg: GrokConfig, batch: int, seq: int, seed: int = 0, pad_right: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, cfg.vocab_size, size=(batch, seq), dtype=np.int32)
    if pad_right:
        toks[-1, seq - pad_right:] = cfg.pad_token
    return toks

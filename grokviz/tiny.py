"""The small trained Grok that ships with the package (``grokviz/assets/tiny/``), in grokviz's converted format.

Grok-1 architecture (8 experts, top-2, grouped-query attention, attention soft-cap, sandwich norms, tied
embeddings) at toy size, trained by ``grokviz train --preset tiny`` on the offline corpus in
``grokviz/corpus/``. The folder is an ordinary converted checkpoint (safetensors shard + index + ``config.json``
+ ``tokenizer.model``), plus ``training.json`` (how it was trained), ``MODEL_CARD.md`` and ``card_stats.json``.
``gv.load("tiny")`` opens it (``grokviz.loading`` uses this module, never the other way round); nothing here
imports the trainer. Everything is read from the package: no network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import GrokConfig

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"


def load_config(path=TINY_DIR) -> GrokConfig:
    """The model config stored in the folder's ``config.json``."""
    from .checkpoint.converted import read_config

    return read_config(path)


def check_config(config) -> None:
    """Refuse ``config=`` for the bundled model unless it equals the stored config (its weights fix it)."""
    if config is None:
        return
    from .checkpoint.config_io import as_config

    given, stored = as_config(config), load_config()
    if given != stored:
        diff = [f"{f.name}={getattr(given, f.name)!r} (bundled: {getattr(stored, f.name)!r})"
                for f in dataclasses.fields(GrokConfig) if getattr(given, f.name) != getattr(stored, f.name)]
        raise ValueError(f'gv.load("tiny", config=...): the bundled tiny model has a fixed config, and the one given '
                         f"differs: {', '.join(diff)}. Drop config= (or, for another model, pass its folder)")

"""The small trained Grok that ships with the package (``grokviz/assets/tiny/``): ``load_tiny() -> Model``.

Grok-1 architecture (8 experts, top-2, grouped-query attention, attention soft-cap, sandwich norms, tied
embeddings) at toy size, trained by ``grokviz train --preset tiny`` on the offline corpus in
``grokviz/corpus/``. Everything is read from the package folder: no network. See ``MODEL_CARD.md`` there.
"""

from __future__ import annotations

import json
from pathlib import Path

from .api import Model
from .config import GrokConfig
from .tokenizer import Tokenizer

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"


def load_config(path=TINY_DIR) -> GrokConfig:
    conf = json.loads((Path(path) / "config.json").read_text())
    return GrokConfig(**conf["grokviz_config"])


def load_params(path=TINY_DIR) -> dict:
    """The parameter pytree (float32 jax arrays) from ``model.safetensors``."""
    from safetensors.numpy import load_file

    from .train import unflatten_params

    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"the shipped tiny model's weights are missing: {f} (reinstall grokviz, or "
                                f"retrain them with `grokviz train --preset tiny --out {Path(path)}`)")
    return unflatten_params(load_file(str(f)))


def load_tiny(path=TINY_DIR) -> Model:
    """The shipped trained tiny Grok with its SentencePiece tokenizer attached (``model.run("text")`` works)."""
    path = Path(path)
    cfg = load_config(path)
    return Model(cfg, load_params(path), tokenizer=Tokenizer(path / "tokenizer.model"))

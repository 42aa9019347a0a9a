"""SentencePiece tokenizer wrapper, encoding as the Grok-1 runner does (plain ``encode``: no BOS; pad id 0)."""

from __future__ import annotations

import os
from pathlib import Path


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``id_to_piece(i) -> str``."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self):
        return f"Tokenizer({self.path.name}, vocab={self.vocab_size})"


def load_tokenizer(path) -> Tokenizer:
    return Tokenizer(path)


#: environment variable naming the Grok-1 ``tokenizer.model`` (it is not part of the repository)
TOKENIZER_ENV = "GROKVIZ_GROK1_TOKENIZER"
GROK1_TOKENIZER_NAME = "grok1-tokenizer.model"


def find_grok1_tokenizer() -> Path | None:
    """The Grok-1 SentencePiece model: ``$GROKVIZ_GROK1_TOKENIZER``, else ``../shared/reference/grok1-tokenizer.model``
    relative to the repository root; None when neither exists."""
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        return Path(env) if Path(env).is_file() else None
    repo = Path(__file__).resolve().parent.parent
    cand = repo.parent / "shared" / "reference" / GROK1_TOKENIZER_NAME
    return cand if cand.is_file() else None


def grok1_tokenizer() -> Tokenizer:
    """Load the Grok-1 tokenizer found by :func:`find_grok1_tokenizer`, or raise FileNotFoundError saying where."""
    path = find_grok1_tokenizer()
    if path is None:
        raise FileNotFoundError(f"Grok-1 tokenizer not found: set ${TOKENIZER_ENV} to its tokenizer.model, or place "
                                f"it at ../shared/reference/{GROK1_TOKENIZER_NAME} next to the repository")
    return Tokenizer(path)

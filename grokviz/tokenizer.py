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

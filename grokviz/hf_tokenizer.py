"""A Hugging Face ``tokenizer.json`` behind the interface of :class:`grokviz.tokenizer.Tokenizer`.

``encode`` adds the special tokens the file's post-processor adds (a BOS for most models), as a transformers
tokenizer does by default; ``decode`` keeps special tokens. ``pad_id`` / ``eos_id`` come from the
``tokenizer_config.json`` next to the file when it names them (``-1`` when it does not), else from the common names
``<pad>`` / ``</s>`` if the vocabulary has them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _token_name(v):
    if isinstance(v, dict):  # an AddedToken as transformers serialises it
        v = v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``id_to_piece(i) -> str``, ``vocab_size``,
    ``pad_id``, ``eos_id`` of a ``tokenizer.json`` (read with the ``tokenizers`` library)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Impl

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            self.tok = _Impl.from_file(str(path))
        except Exception as e:  # the library raises its own exception type for a malformed file
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.json_path = path
        special = {}
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                special = json.loads(cfg_path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
            if not isinstance(special, dict):
                raise ValueError(f"{cfg_path}: expected a JSON object")
        self._pad = self._id_of(special, "pad_token", "<pad>")
        self._eos = self._id_of(special, "eos_token", "</s>")

    def _id_of(self, special: dict, key: str, fallback: str) -> int:
        name = _token_name(special.get(key)) if key in special else fallback
        if name is None:
            return -1
        i = self.tok.token_to_id(name)
        if i is None and key in special:
            raise ValueError(f"{self.json_path.parent / 'tokenizer_config.json'}: {key} {name!r} is not in the "
                             f"vocabulary of {self.json_path}")
        return -1 if i is None else int(i)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return list(self.tok.encode(text).ids)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self.tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        piece = self.tok.id_to_token(int(i))
        if piece is None:
            raise ValueError(f"token id {int(i)} is outside the vocabulary [0, {self.vocab_size})")
        return piece

    def __repr__(self):
        return f"HFTokenizer({self.json_path.name}, vocab={self.vocab_size})"

"""The offline training corpus: ``corpus.jsonl.xz`` (one JSON document per line) and its ``PROVENANCE.md``.

This package holds the data and its reader only; the script that builds the corpus and trains the tokenizer from
a Python installation is ``scripts/build_corpus.py`` in the source tree (not installed).
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

CORPUS_PATH = Path(__file__).resolve().parent / "corpus.jsonl.xz"
DOMAINS = ("code", "prose", "numbers")
SPLITS = ("train", "validation")

__all__ = ["CORPUS_PATH", "DOMAINS", "SPLITS", "load"]


def load(path=CORPUS_PATH, split: str | None = None, domain: str | None = None) -> list[dict]:
    """The corpus documents (dicts with ``id``, ``domain``, ``source``, ``split``, ``text``), optionally only one
    split and/or one domain, in corpus order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS} or None, got {domain!r}")
    try:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise ValueError(f"{path}: unreadable corpus ({type(e).__name__}: {e}); reinstall grokviz or rebuild it "
                         f"with scripts/build_corpus.py") from None
    return [d for d in docs if (split is None or d["split"] == split) and (domain is None or d["domain"] == domain)]

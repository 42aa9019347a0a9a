"""Training data: the shipped corpus encoded with the shipped tokenizer, as resumable random batches."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

from ..corpus import DOMAINS
from .config import TOKENIZER_PATH


@dataclasses.dataclass
class TokenData:
    """Token streams (documents joined with the EOS id) for the train and validation splits."""

    train: np.ndarray
    validation: np.ndarray
    domains: dict = dataclasses.field(default_factory=dict)  # split -> int8 array of domain ids per token
    domain_names: tuple = DOMAINS

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0, split: str = "train"):
        """Random windows of ``seq_len + 1`` tokens; depends only on (seed, step, split): resumable."""
        stream = getattr(self, split)
        if len(stream) < seq_len + 2:
            raise ValueError(f"the {split} stream has {len(stream)} tokens, too few for windows of seq_len + 1 = "
                             f"{seq_len + 1}")
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
        return np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)

    def eval_batches(self, n: int, batch_size: int, seq_len: int):
        """Fixed, non-overlapping windows spread evenly over the validation stream."""
        stream = self.validation
        if len(stream) < seq_len + 2:
            raise ValueError(f"the validation stream has {len(stream)} tokens, too few for windows of seq_len + 1 "
                             f"= {seq_len + 1}")
        total = n * batch_size
        stride = max(seq_len + 1, (len(stream) - seq_len - 1) // total)
        starts = [(i * stride) % (len(stream) - seq_len - 1) for i in range(total)]
        rows = np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)
        return rows.reshape(n, batch_size, seq_len + 1)


@lru_cache(maxsize=4)
def load_data(tokenizer_path: str = str(TOKENIZER_PATH), max_chars: int | None = None) -> TokenData:
    """Encode the shipped corpus with the shipped tokenizer (cached per process). ``max_chars`` caps each split
    per domain (for quick experiments); documents keep their corpus order."""
    from ..corpus import load
    from ..tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    docs = load()
    out, doms = {}, {}
    for split in ("train", "validation"):
        ids, dom, used = [], [], {n: 0 for n in DOMAINS}
        for d in docs:
            if d["split"] != split:
                continue
            if max_chars is not None and used[d["domain"]] >= max_chars:
                continue
            used[d["domain"]] += len(d["text"])
            t = tok.encode(d["text"]) + [tok.eos_id]
            ids.extend(t)
            dom.extend([DOMAINS.index(d["domain"])] * len(t))
        out[split] = np.asarray(ids, np.int32)
        doms[split] = np.asarray(dom, np.int8)
    return TokenData(out["train"], out["validation"], doms)

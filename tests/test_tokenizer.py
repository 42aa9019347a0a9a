"""The Grok-1 SentencePiece tokenizer (read from ../shared/reference or $GROKVIZ_GROK1_TOKENIZER; never committed)."""

import numpy as np
import pytest

from grokviz.tokenizer import TOKENIZER_ENV, Tokenizer, find_grok1_tokenizer

PATH = find_grok1_tokenizer()
pytestmark = pytest.mark.skipif(
    PATH is None, reason=f"Grok-1 tokenizer.model not found: set ${TOKENIZER_ENV} or provide "
                         f"../shared/reference/grok1-tokenizer.model (it is not part of the repository)")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "¿Dónde está la biblioteca? El niño comió paella y turrón en Año Nuevo.",
    "def square(x: int) -> int:\n\treturn x ** 2  # 42\n\n    print({'a': [1, 2, 3]})",
    "Launch 🚀🎉 — done ✅ (emoji + punctuation) 👩‍💻",
    "mixed: hello, hola, 你好, こんにちは, привет   spaces\t\ttabs\n\n\nnewlines",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(PATH)


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 131072
    assert tok.pad_id == 0
    assert tok.eos_id == 2
    assert tok.id_to_piece(0) == "[PAD]" and tok.id_to_piece(2) == "[EOS]"


@pytest.mark.parametrize("text", TEXTS, ids=["english", "spanish", "code", "emoji", "mixed"])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(0 < i < 131072 for i in ids)
    assert tok.decode(ids) == text


def test_spec_example_encoding_has_no_bos(tok):
    ids = tok.encode("The answer to life the universe and everything is of course")
    assert ids == [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805]
    assert ids[0] != 1  # the runner's plain encode adds no BOS


def test_model_runs_text_with_attached_tokenizer():
    """model.run("text") on a (random, 1-layer) model with Grok-1's full vocabulary and the tokenizer attached."""
    import grokviz as gv

    tok = Tokenizer(PATH)
    big = gv.GrokConfig.golden(vocab_size=131072, num_layers=1, sequence_len=64)
    import jax

    model = gv.Model(big, gv.init_params(big, jax.random.key(0)), tokenizer=tok)
    run = model.run(["Hola mundo 🚀", "def f(): pass"])
    assert run.logits.shape[0] == 2 and run.logits.shape[-1] == 131072
    assert run.tokens[0, : len(tok.encode("Hola mundo 🚀"))].tolist() == tok.encode("Hola mundo 🚀")
    assert np.all(np.isfinite(np.asarray(run.logits)))

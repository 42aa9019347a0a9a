"""The shipped trained tiny model (grokviz/assets/tiny): present, loadable offline, consistent, sensible."""

import json

import jax
import numpy as np
import pytest

from grokviz import tiny
from grokviz.params import count_params, shapes_dict

pytestmark = pytest.mark.skipif(not (tiny.TINY_DIR / "model.safetensors").is_file(),
                                reason="shipped tiny weights not built")


@pytest.fixture(scope="module")
def model():
    return tiny.load_tiny()


def test_files_and_sizes():
    for name in ("model.safetensors", "tokenizer.model", "config.json", "MODEL_CARD.md"):
        assert (tiny.TINY_DIR / name).is_file(), name
    assert (tiny.TINY_DIR / "model.safetensors").stat().st_size <= 30 * 2**20


def test_weights_match_config(model):
    cfg = model.cfg
    assert (cfg.num_experts, cfg.top_k) == (8, 2)
    assert cfg.num_q_heads > cfg.num_kv_heads                 # grouped-query attention
    assert cfg.vocab_size == model.tokenizer.vocab_size
    assert model.tokenizer.pad_id == cfg.pad_token == 0 and model.tokenizer.eos_id == cfg.eos_token == 2
    shapes = jax.tree_util.tree_leaves(shapes_dict(cfg), is_leaf=lambda x: isinstance(x, tuple))
    leaves = jax.tree_util.tree_leaves(model.params)
    assert [tuple(x.shape) for x in leaves] == [tuple(s) for s in shapes]
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)
    conf = json.loads((tiny.TINY_DIR / "config.json").read_text())
    assert conf["num_params"] == count_params(model.params)


def test_sensible_next_tokens(model):
    run = model.run("def forward(self, x):", capture=["blocks.moe.top_k_experts"])
    probs = np.asarray(jax.nn.softmax(run.logits[0, -1]))
    top = [model.tokenizer.id_to_piece(int(i)) for i in np.argsort(-probs)[:3]]
    assert "\n" in top, top                                     # a def line is followed by a newline
    # inside a body the model indents and continues Python
    run = model.run("def f(x):\n    return x + 1\n\n\ndef g(y):\n")
    assert model.tokenizer.id_to_piece(int(np.argmax(run.logits[0, -1]))).startswith("\u2581")
    ids = model.encode("12 + 7 = ")
    nxt = int(np.argmax(model.run(ids).logits[0, -1]))
    assert model.tokenizer.id_to_piece(nxt).isdigit() or model.tokenizer.id_to_piece(nxt) == "\u2581"
    assert run.cache is not None


def test_model_card_reports_structure():
    card = (tiny.TINY_DIR / "MODEL_CARD.md").read_text()
    for needle in ("nats/token", "bits/byte", "unigram", "load CV", "12.5%", "46.4%"):
        assert needle in card, needle
    stats = json.loads((tiny.TINY_DIR / "card_stats.json").read_text())["stats"]
    loss = stats["loss"]["all"]
    assert loss["nats_per_token"] < loss["unigram_nats_per_token"] - 1.0
    assert max(stats["consecutive"]["first_repeat"]) > 0.125 + 0.05

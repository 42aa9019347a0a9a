"""The shipped trained tiny model (grokviz/assets/tiny): an ordinary converted checkpoint, loadable offline with
every gv.load keyword, bit-exact the trained weights, consistent, sensible; its card built from computed stats."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokviz as gv
from grokviz import tiny
from grokviz.checkpoint import converted
from grokviz.params import count_params, shapes_dict

# SHA-256 over (tree path, shape, float32 bytes) of every leaf of the weights `grokviz train --preset tiny` produced
# (computed from the original model.safetensors before it was re-saved in the converted format)
WEIGHTS_DIGEST = "dfc7ec6098b80a48b602485b597873855aae0da9a7e0e6aec9013bf124ee14a7"


@pytest.fixture(scope="module")
def model():
    return gv.load("tiny")


def test_files_and_sizes():
    assert converted.is_converted(tiny.TINY_DIR)
    for name in ("tokenizer.model", "config.json", "training.json", "MODEL_CARD.md", "card_stats.json"):
        assert (tiny.TINY_DIR / name).is_file(), name
    shards = sorted(tiny.TINY_DIR.glob("*.safetensors"))
    assert [p.name for p in shards] == ["model-00001-of-00001.safetensors"]
    assert shards[0].stat().st_size <= 30 * 2**20
    assert converted.verify(tiny.TINY_DIR)


def test_weights_are_the_trained_ones_bit_for_bit(model):
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        x = np.asarray(x)
        assert x.dtype == np.float32
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(x.shape).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    assert h.hexdigest() == WEIGHTS_DIGEST


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
    conf = json.loads((tiny.TINY_DIR / "training.json").read_text())
    assert conf["num_params"] == count_params(model.params)


def test_loading_tiny_imports_neither_trainer_nor_optax():
    code = ("import sys, grokviz; m = grokviz.load('tiny', progress=False); "
            "assert m.tokenizer is not None and m.cfg.name == 'grok1-tiny-trained'; "
            "bad = [k for k in ('optax', 'grokviz.train') if k in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_load_tiny_honours_keywords(model):
    stored = tiny.load_config()
    m = gv.load("tiny", config=stored, dtype=jnp.bfloat16, verify=True, progress=False, tokenizer=False)
    assert m.tokenizer is None and m.cfg == stored
    assert {x.dtype for x in jax.tree_util.tree_leaves(m.params)} == {jnp.dtype(jnp.bfloat16)}
    from grokviz.sharding import make_mesh

    m = gv.load("tiny", mesh=make_mesh((1, 1)), progress=False, tokenizer=tiny.TINY_DIR / "tokenizer.model")
    assert m.tokenizer is not None
    leaf = m.params["blocks"]["w_q"] if "w_q" in m.params["blocks"] else jax.tree_util.tree_leaves(m.params)[0]
    assert hasattr(leaf, "sharding") and len(leaf.sharding.mesh.devices.ravel()) == 1
    np.testing.assert_array_equal(np.asarray(m.params["embed"]), np.asarray(model.params["embed"]))


def test_load_tiny_refuses_another_config():
    other = tiny.load_config().replace(num_experts=4)
    with pytest.raises(ValueError, match=r"fixed config.*num_experts=4 \(bundled: 8\)"):
        gv.load("tiny", config=other, progress=False)
    with pytest.raises(ValueError, match="fixed config"):
        gv.load("tiny", config={**json.loads((tiny.TINY_DIR / "config.json").read_text())["grokviz_config"],
                                "top_k": 1}, progress=False)


def test_a_folder_named_tiny_is_a_folder(model, tmp_path, monkeypatch):
    converted.save(model.params, tmp_path / "tiny", model.cfg.replace(name="my-own-tiny"))
    monkeypatch.chdir(tmp_path)
    assert gv.load(Path("tiny"), progress=False).cfg.name == "my-own-tiny"
    assert gv.load("./tiny", progress=False).cfg.name == "my-own-tiny"
    assert gv.load("tiny", progress=False).cfg.name == "grok1-tiny-trained"   # the bare name: the bundled model


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
    # the prose takes its numbers from the stats (nothing typed in by hand)
    assert f"| all | {loss['tokens']:,} | {loss['nats_per_token']:.3f} |" in card
    assert f"{stats['load_cv_random']:.4f}" in card


def test_model_card_is_rendered_from_the_stats():
    """scripts/tiny_card.py's renderer reproduces the committed card from card_stats.json + training.json: the
    card has no hand-written numbers."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "tiny_card.py"
    spec = importlib.util.spec_from_file_location("tiny_card_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    saved = json.loads((tiny.TINY_DIR / "card_stats.json").read_text())
    conf = json.loads((tiny.TINY_DIR / "training.json").read_text())
    card = mod.render(saved["stats"], saved["predictions"], conf, tiny.load_config(), 4096)
    assert card == (tiny.TINY_DIR / "MODEL_CARD.md").read_text()

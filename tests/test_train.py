"""Corpus, tokenizer and the training loop (grokviz.corpus, grokviz.train)."""

import hashlib
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokviz.config import GrokConfig
from grokviz.corpus import build
from grokviz.tokenizer import Tokenizer
from grokviz import train as T

CORPUS_SHA256 = "f325524f95ab3ec32bb8e129f8ae81c8eebf0e85f7c0b93285d56d69aeb117c7"
TOKENIZER_SHA256 = "caf14dcf864fa5130e1a7aef5f7c3af6b663273961a566a73e745a0753961b6e"


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_corpus_checksum_size_and_provenance():
    assert sha(build.CORPUS_PATH) == CORPUS_SHA256
    assert build.CORPUS_PATH.stat().st_size <= 10 * 2**20
    prov = (build.CORPUS_PATH.parent / "PROVENANCE.md").read_text()
    assert CORPUS_SHA256 in prov and TOKENIZER_SHA256 in prov


def test_corpus_domains_and_splits():
    docs = build.load()
    kinds = {(d["domain"], d["split"]) for d in docs}
    for dom in ("code", "prose", "numbers"):
        assert (dom, "train") in kinds and (dom, "validation") in kinds
    # a source file never straddles the split
    split_of = {}
    for d in docs:
        key = d["source"].replace(" (docstring)", "")
        assert split_of.setdefault(key, d["split"]) == d["split"]


@pytest.fixture(scope="module")
def tok():
    assert sha(T.TOKENIZER_PATH) == TOKENIZER_SHA256
    return Tokenizer(T.TOKENIZER_PATH)


def test_tokenizer_round_trip_and_special_ids(tok):
    assert tok.vocab_size == 4096 and tok.pad_id == 0 and tok.eos_id == 2
    for text in ["def forward(self, x):\n    return self.proj(x)  # note\n\tpass\n",
                 "The interpreter reads a file and executes it.", "123 * 45 = 5535\n1, 1, 2, 3, 5, 8",
                 "unicode: é ü — ∑", "  leading and trailing  "]:
        ids = tok.encode(text)
        assert 0 not in ids and 2 not in ids
        assert tok.decode(ids) == text
    assert [tok.id_to_piece(i) for i in tok.encode("12")][-2:] == ["1", "2"]  # digits split


def micro_cfg():
    return GrokConfig(name="micro", vocab_size=4096, d_model=32, num_layers=2, num_q_heads=2, num_kv_heads=1,
                      head_dim=16, widening_factor=2, embedding_multiplier=math.sqrt(32),
                      attn_logit_multiplier=0.25, sequence_len=32)


@pytest.fixture(scope="module")
def small_data():
    return T.load_data(max_chars=20_000)


MICRO_TC = T.TrainConfig(steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup=2, eval_every=0, ckpt_every=3,
                         log_every=1, eval_batches=2)


def test_router_losses_balanced_is_one():
    E, k = 8, 2
    experts = jnp.asarray(np.arange(16 * 2).reshape(1, 1, 16, 2) % E)      # perfectly balanced slots
    logits = jnp.zeros((1, 1, 16, E))
    aux, z = T.router_losses(logits, experts, jnp.ones((1, 16), bool), E)
    assert float(aux) == pytest.approx(1.0)
    assert float(z) == pytest.approx(math.log(E) ** 2, rel=1e-6)
    collapsed = jnp.zeros((1, 1, 16, 2), jnp.int32).at[..., 1].set(1)
    peaked = jnp.zeros((1, 1, 16, E)).at[..., :2].set(5.0)
    aux2, _ = T.router_losses(peaked, collapsed, jnp.ones((1, 16), bool), E)
    assert float(aux2) > 3.5


def test_few_steps_reduce_loss(small_data):
    params, hist = T.train(micro_cfg(), small_data, tc=MICRO_TC, steps=25, progress=False, aux_coef=0.01)
    ce = hist["ce"]
    assert len(ce) == 25 and len(hist["expert_load"]) == 25
    assert np.mean(ce[-3:]) < np.mean(ce[:3]) - 0.5
    share = np.asarray(hist["expert_load"][-1])
    assert share.shape == (2, 8) and np.allclose(share.sum(-1), 1.0)
    assert all(np.isfinite(hist["aux"])) and all(np.isfinite(hist["z"]))


def test_resume_equals_uninterrupted(small_data, tmp_path):
    cfg = micro_cfg()
    full, h_full = T.train(cfg, small_data, tc=MICRO_TC, progress=False)
    ck = tmp_path / "ck.npz"
    part, h_part = T.train(cfg, small_data, tc=MICRO_TC, progress=False, checkpoint=ck, stop_after=5)
    assert h_part["steps_done"] == 5
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # atomic: no temp files left
    resumed, h_res = T.train(cfg, small_data, tc=MICRO_TC, progress=False, checkpoint=ck)
    assert h_res["steps_done"] == MICRO_TC.steps
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert h_res["ce"] == h_full["ce"]
    # the loaded checkpoint holds the final state too
    _, _, step, _, _ = T.load_checkpoint(ck, full, T._compiled(cfg, MICRO_TC)[0].init(full))
    assert step == MICRO_TC.steps


def test_presets_and_cli_parse():
    cfg, tc = T.PRESETS["tiny"]
    assert (cfg.num_experts, cfg.top_k) == (8, 2) and cfg.num_q_heads > cfg.num_kv_heads
    assert cfg.sequence_len >= tc.seq_len
    qcfg, qtc = T.PRESETS["quick"]
    assert qtc.steps * qtc.batch_size * qtc.seq_len < tc.steps * tc.batch_size * tc.seq_len
    with pytest.raises(SystemExit):
        T.cli_main(["--preset", "nope"])


def test_cli_quick_writes_a_loadable_model(tmp_path):
    from grokviz.cli import main
    from grokviz.tiny import load_tiny

    out = tmp_path / "quick"
    assert main(["train", "--preset", "quick", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.model", "checkpoint.npz", "history.json"):
        assert (out / name).is_file(), name
    m = load_tiny(out)
    assert m.cfg.name == "grok1-quick" and m.run("x = 1").logits.shape[-1] == 4096

"""Corpus, tokenizer and the training loop (grokviz.corpus, grokviz.train): losses, exact resume, the checks
that refuse a checkpoint of another run, and the `grokviz train` output format."""

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokviz import corpus
from grokviz import train as T
from grokviz.config import GrokConfig
from grokviz.params import init_params
from grokviz.tokenizer import Tokenizer

CORPUS_SHA256 = "f325524f95ab3ec32bb8e129f8ae81c8eebf0e85f7c0b93285d56d69aeb117c7"
TOKENIZER_SHA256 = "caf14dcf864fa5130e1a7aef5f7c3af6b663273961a566a73e745a0753961b6e"


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_corpus_checksum_size_and_provenance():
    assert sha(corpus.CORPUS_PATH) == CORPUS_SHA256
    assert corpus.CORPUS_PATH.stat().st_size <= 10 * 2**20
    prov = (corpus.CORPUS_PATH.parent / "PROVENANCE.md").read_text()
    assert CORPUS_SHA256 in prov and TOKENIZER_SHA256 in prov


def test_corpus_domains_and_splits():
    docs = corpus.load()
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
    E = 8
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
    """N steps straight == N/2 steps, "killed", then resumed to N: parameters bit-identical."""
    cfg = micro_cfg()
    full, h_full = T.train(cfg, small_data, tc=MICRO_TC, progress=False)
    ck = tmp_path / "ck.npz"
    part, h_part = T.train(cfg, small_data, tc=MICRO_TC, progress=False, checkpoint=ck, stop_after=4)
    assert h_part["steps_done"] == 4
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic: no temp files left
    resumed, h_res = T.train(cfg, small_data, tc=MICRO_TC, progress=False, checkpoint=ck)
    assert h_res["steps_done"] == MICRO_TC.steps
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert h_res["ce"] == h_full["ce"]
    # the loaded checkpoint holds the final state too
    _, _, step, _, _ = T.load_checkpoint(ck, full, T._compiled(cfg, MICRO_TC)[0].init(full))
    assert step == MICRO_TC.steps


# --- resuming refuses a checkpoint that is not this run's (each of these resumed silently before) ---------------
RESUME_TC = MICRO_TC   # same compiled step as test_resume_equals_uninterrupted


@pytest.fixture(scope="module")
def resume_ckpt(small_data, tmp_path_factory):
    """A checkpoint of a 2-step run of the micro config (written once, copied by each test)."""
    ck = tmp_path_factory.mktemp("resume") / "ck.npz"
    T.train(micro_cfg(), small_data, tc=RESUME_TC, progress=False, checkpoint=ck, stop_after=2)
    return ck


def _copy(src, tmp_path):
    dst = tmp_path / "ck.npz"
    shutil.copyfile(src, dst)
    return dst


def _rewrite(path, *, info=None, leaf=None):
    """Rewrite the checkpoint with a modified info record and/or leaf_00000 array (a tampered file)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if info is not None:
        arrays["info"] = np.frombuffer(json.dumps(info(json.loads(bytes(arrays["info"]).decode()))).encode(),
                                       np.uint8)
    if leaf is not None:
        arrays["leaf_00000"] = leaf(arrays["leaf_00000"])
    np.savez(path, **arrays)


def _resume(ck, data, cfg=None, **tc_changes):
    return T.train(cfg or micro_cfg(), data, tc=dataclasses.replace(RESUME_TC, **tc_changes), progress=False,
                   checkpoint=ck)


def test_resume_refuses_another_architecture(resume_ckpt, small_data, tmp_path):
    ck = _copy(resume_ckpt, tmp_path)
    with pytest.raises(T.TrainCheckpointError, match=r"another architecture.*num_experts: checkpoint 8, this run 4"
                                                     r"(?s:.*)--no-resume") as e:
        _resume(ck, small_data, cfg=micro_cfg().replace(num_experts=4))
    assert str(ck) in str(e.value)


def test_resume_refuses_changed_learning_rate(resume_ckpt, small_data, tmp_path):
    ck = _copy(resume_ckpt, tmp_path)
    with pytest.raises(T.TrainCheckpointError, match=r"other training settings.*lr: checkpoint 0.01, this run 0.02"):
        _resume(ck, small_data, lr=0.02)
    with pytest.raises(T.TrainCheckpointError, match=r"steps: checkpoint 8, this run 10"):
        _resume(ck, small_data, steps=10)
    # cadence fields may change: this resumes and finishes the run
    _, h = _resume(ck, small_data, log_every=2, ckpt_every=1)
    assert h["steps_done"] == RESUME_TC.steps


def test_resume_refuses_wrong_leaf_shape(resume_ckpt, small_data, tmp_path):
    ck = _copy(resume_ckpt, tmp_path)
    _rewrite(ck, leaf=lambda a: a[:, :-1])   # the file's arrays no longer match its own config
    with pytest.raises(T.TrainCheckpointError, match=r"leaf_00000.*float32\[2, 31\].*--no-resume"):
        _resume(ck, small_data)
    _rewrite(ck, info=lambda i: {**i, "leaves": i["leaves"][1:]})
    with pytest.raises(T.TrainCheckpointError, match="state arrays"):
        _resume(ck, small_data)


def test_resume_refuses_step_beyond_the_run(resume_ckpt, small_data, tmp_path):
    ck = _copy(resume_ckpt, tmp_path)
    _rewrite(ck, info=lambda i: {**i, "step": RESUME_TC.steps + 5})
    with pytest.raises(T.TrainCheckpointError, match=r"step 13 is outside this run's 0..8 steps"):
        _resume(ck, small_data)


def test_corrupt_checkpoint_names_file_and_fix(resume_ckpt, small_data, tmp_path):
    ck = _copy(resume_ckpt, tmp_path)
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])                     # truncated: a bare zip error before
    with pytest.raises(T.TrainCheckpointError, match="unreadable or corrupt.*--no-resume") as e:
        _resume(ck, small_data)
    assert str(ck) in str(e.value)
    ck.write_bytes(b"")
    with pytest.raises(T.TrainCheckpointError, match="unreadable or corrupt"):
        _resume(ck, small_data)
    # resume=False ignores the bad file and overwrites it
    T.train(micro_cfg(), small_data, tc=RESUME_TC, progress=False, checkpoint=ck, resume=False, stop_after=1)
    assert T.checkpointing.read_info(ck)["step"] == 1


def test_checkpoint_write_is_atomic(resume_ckpt, tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temp file behind."""
    ck = _copy(resume_ckpt, tmp_path)
    before = ck.read_bytes()
    params, opt_state = _state_of(ck)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.checkpointing.np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(ck, params, opt_state, 3, {}, {})
    assert ck.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def _state_of(ck):
    params = init_params(micro_cfg(), jax.random.key(0))
    opt = T.make_optimizer(RESUME_TC)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = opt.init(params)
    p, o, *_ = T.load_checkpoint(ck, params, opt_state)
    return p, o


def test_training_masks_padding_with_is_real(small_data):
    """The loss counts exactly the positions ``config.is_real`` calls real: with pad_token 3, ids 1 and 2 (below
    it) are padding too (``!= pad`` counted them)."""
    from grokviz.config import is_real
    from grokviz.model.transformer import forward

    cfg = micro_cfg().replace(pad_token=3)
    params = init_params(cfg, jax.random.key(1))
    batch = small_data.batch(0, 2, 16)
    batch[:, 5:8] = 1
    batch[1, 12:] = 2
    inputs, targets = jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:])
    logits = forward(params, inputs, cfg).logits.astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    real = (is_real(inputs, cfg.pad_token) & is_real(targets, cfg.pad_token)).astype(jnp.float32)
    want = float(jnp.sum(nll * real) / jnp.sum(real))
    with jax.numpy_dtype_promotion("standard"):
        got = float(T.loss_fn(params, jnp.asarray(batch), cfg, 0.0, 0.0)[1]["ce"])
    assert got == pytest.approx(want, rel=1e-5)


def test_presets_and_cli_parse():
    cfg, tc = T.PRESETS["tiny"]
    assert (cfg.num_experts, cfg.top_k) == (8, 2) and cfg.num_q_heads > cfg.num_kv_heads
    assert cfg.sequence_len >= tc.seq_len
    qcfg, qtc = T.PRESETS["quick"]
    assert qtc.steps * qtc.batch_size * qtc.seq_len < tc.steps * tc.batch_size * tc.seq_len
    assert all(0 < t.ckpt_every < t.steps for _, t in T.PRESETS.values())   # long runs checkpoint by default
    with pytest.raises(SystemExit):
        T.cli_main(["--preset", "nope"])
    with pytest.raises(ValueError, match="ckpt_every must be >= 0"):
        T.config.resolve(tc, ckpt_every=-1)


def test_cli_refuses_a_foreign_out_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert T.cli_main(["--preset", "quick", "--steps", "1", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_quick_writes_a_loadable_model(tmp_path, capsys):
    import grokviz as gv
    from grokviz.checkpoint import converted
    from grokviz.cli import main

    out = tmp_path / "quick"
    assert main(["train", "--preset", "quick", "--steps", "3", "--ckpt-every", "2", "--out", str(out),
                 "--no-progress"]) == 0
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.model", "checkpoint.npz",
                 "history.json", "training.json"):
        assert (out / name).is_file(), name
    assert converted.is_converted(out) and converted.verify(out)
    assert T.checkpointing.read_info(out / "checkpoint.npz")["step"] == 3
    m = gv.load(out, verify=True, progress=False)
    assert m.cfg.name == "grok1-quick" and m.run("x = 1").logits.shape[-1] == 4096
    assert json.loads((out / "training.json").read_text())["train"]["ckpt_every"] == 2
    # a second run resumes from the finished checkpoint (nothing left to do) and rewrites the same model
    shard = sorted(out.glob("model-*.safetensors"))[0].read_bytes()
    assert main(["train", "--preset", "quick", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    assert sorted(out.glob("model-*.safetensors"))[0].read_bytes() == shard
    # another run's settings: a one-line error naming the checkpoint and the fix, the model left as it was
    assert main(["train", "--preset", "quick", "--steps", "3", "--aux-coef", "0.5", "--out", str(out),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint.npz" in err and "aux_coef: checkpoint 0.01, this run 0.5" in err and "--no-resume" in err
    assert sorted(out.glob("model-*.safetensors"))[0].read_bytes() == shard

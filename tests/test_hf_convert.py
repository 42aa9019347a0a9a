"""Saving Hugging Face family models in grokviz's converted format: ``converted.save`` -> ``gv.load`` gives the same
config and bit-identical params for every family (untied ``unembed``, MoE leaves stacked over the MoE layers only,
dense MLP leaves over the dense layers only), and the Hugging Face tokenizer travels with the folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokviz as gv
from grokviz import families
from grokviz.checkpoint import converted as cv
from grokviz.hf_tokenizer import HFTokenizer

DATA = Path(__file__).parent / "data" / "hf"
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe", "gpt_oss")


def _same(a: gv.Model, b: gv.Model):
    assert a.cfg == b.cfg
    la, lb = jax.tree_util.tree_leaves_with_path(a.params), jax.tree_util.tree_leaves_with_path(b.params)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path  # bit-exact, NaN-safe


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_is_bit_exact_with_the_tokenizer(tmp_path, family):
    model = gv.load(DATA / family, progress=False)
    dst = cv.save(model, tmp_path / family)
    back = gv.load(dst, progress=False, verify=True)  # the index covers tokenizer.json and tokenizer_config.json
    _same(model, back)
    assert (dst / "tokenizer.json").read_bytes() == (DATA / family / "tokenizer.json").read_bytes()
    assert not (dst / "tokenizer.model").exists()
    assert isinstance(back.tokenizer, HFTokenizer)
    assert back.tokenizer.encode("the cat sat") == model.tokenizer.encode("the cat sat")
    assert (back.tokenizer.pad_id, back.tokenizer.eos_id) == (model.tokenizer.pad_id, model.tokenizer.eos_id)
    files = json.loads((dst / cv.INDEX).read_text())["files"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    info = cv.inspect(dst)  # the parameter count includes the untied unembedding
    assert info["num_params"] == gv.params.count_params(model.params)


def _dense_qwen(**over) -> gv.GrokConfig:
    fields = dict(vocab_size=40, d_model=16, num_layers=3, num_q_heads=2, num_kv_heads=1, head_dim=8,
                  num_experts=4, top_k=2, ffn=8, shared_expert_ffn=12, moe_layers=(1,),
                  dense_ffn=20, sequence_len=32, pad_token=0)
    fields.update(over)
    return families.preset("qwen2_moe", **fields)


@pytest.mark.parametrize("moe_layers", [(1,), (0, 2)])
def test_dense_layers_round_trip_under_their_model_layer_numbers(tmp_path, moe_layers):
    cfg = _dense_qwen(moe_layers=moe_layers)
    rng = np.random.default_rng(1)  # numpy, not gv.init_params: its per-shape jax.random compiles take ~40 s on CI
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s, np.float32)),
                                    gv.params.shapes_dict(cfg), is_leaf=lambda x: isinstance(x, tuple))
    model = gv.Model(cfg, params)
    dst = cv.save(model, tmp_path / "q")
    back = gv.load(dst, progress=False, verify=True)
    _same(model, back)
    wm = json.loads((dst / cv.INDEX).read_text())["weight_map"]
    dense = [i for i in range(3) if i not in moe_layers]
    assert {k for k in wm if k.endswith(".router")} == {f"layers.{i}.router" for i in moe_layers}
    assert {k for k in wm if k.endswith(".mlp_up")} == {f"layers.{i}.mlp_up" for i in dense}
    assert "unembed" in wm
    assert cv.inspect(dst)["num_params"] == gv.params.count_params(model.params)


def test_bf16_model_saves_and_reloads_in_bf16(tmp_path):
    model = gv.load(DATA / "qwen3_moe", progress=False, dtype=jnp.bfloat16)  # untied
    dst = cv.save(model, tmp_path / "bf16")
    _same(model, gv.load(dst, progress=False, dtype=jnp.bfloat16))


def test_tokenizer_argument_kinds(tmp_path):
    model = gv.load(DATA / "olmoe", progress=False)
    none = cv.save(model, tmp_path / "none", tokenizer=None)
    assert gv.load(none, progress=False).tokenizer is None
    assert not {p.name for p in none.iterdir()} & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "tokenizer.json").write_bytes((DATA / "olmoe" / "tokenizer.json").read_bytes())
    dst = cv.save(model, tmp_path / "alone_out", tokenizer=alone / "tokenizer.json")
    assert (dst / "tokenizer.json").is_file() and not (dst / "tokenizer_config.json").exists()
    assert isinstance(gv.load(dst, progress=False).tokenizer, HFTokenizer)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        cv.save(model, tmp_path / "bad", tokenizer=tmp_path / "missing.json")
    assert not (tmp_path / "bad").exists()


def test_verify_flags_an_edited_tokenizer(tmp_path):
    dst = cv.save(gv.load(DATA / "mixtral", progress=False), tmp_path / "m")
    with open(dst / "tokenizer_config.json", "a") as f:
        f.write(" ")
    with pytest.raises(cv.ConvertedCheckpointError, match="tokenizer_config.json: .*bytes"):
        cv.verify(dst)

"""Bad input gets a clear ValueError naming the problem."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import grokviz as gv


def test_out_of_vocab(golden_model):
    toks = np.ones((1, 5), np.int32)
    toks[0, 3] = 512
    msg = "token id 512 at position (0, 3) is outside the vocabulary [0, 512)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        golden_model.run(toks)
    with pytest.raises(ValueError, match="token id -1"):
        golden_model.run(-np.ones((1, 2), np.int32))


def test_too_long(golden_model):
    with pytest.raises(ValueError, match="sequence length 33 exceeds the model's sequence_len 32"):
        golden_model.run(np.ones((1, 33), np.int32))


@pytest.mark.parametrize("bad,msg", [
    (np.ones((1, 2, 3), np.int32), "shape \\[batch, seq\\]"),
    (np.ones((1, 4), np.float32), "integer ids"),
    (np.ones((1, 4), bool), "integer ids"),
    (np.ones((1, 0), np.int32), "empty"),
])
def test_bad_rank_dtype_empty(golden_model, bad, msg):
    with pytest.raises(ValueError, match=msg):
        golden_model.run(bad)


def test_text_without_tokenizer(golden_model):
    with pytest.raises(ValueError, match="no tokenizer"):
        golden_model.run("hello")


def test_params_mismatch_names_leaf_and_shapes(golden):
    cfg, params, _ = golden
    bad = {**params, "blocks": {**params["blocks"], "w_k": jnp.zeros((2, 64, 48))}}
    with pytest.raises(ValueError, match=re.escape("params['blocks']['w_k'] has shape (2, 64, 48) but config "
                                                   "'grok1-golden' expects (2, 64, 32)")):
        gv.Model(cfg, bad)
    missing = {k: v for k, v in params.items() if k != "final_norm"}
    with pytest.raises(ValueError, match="missing \\['final_norm'\\]"):
        gv.Model(cfg, missing)
    with pytest.raises(ValueError, match="layer 2 but the config has 2 layers"):
        gv.params_from_reference({"transformer/decoder_layer_2/router/w": np.zeros((64, 8))}, cfg)
    with pytest.raises(ValueError, match="has no mapping"):
        gv.params_from_reference({"transformer/decoder_layer_0/mlp/w": np.zeros((64, 8))}, cfg)


def test_unknown_expert_impl(golden_model):
    with pytest.raises(ValueError, match="expert_impl must be one of"):
        golden_model.run(np.ones((1, 3), np.int32), expert_impl="ragged")

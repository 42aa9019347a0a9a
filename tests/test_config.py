import math

import jax
import jax.numpy as jnp
import pytest

import grokviz as gv
from grokviz.config import ATTN_LOGIT_MULTIPLIER, EMBEDDING_MULTIPLIER, OUTPUT_MULTIPLIER, expert_ffn_size


def test_grok1_constants_and_derivations():
    cfg = gv.GrokConfig.grok1()
    assert EMBEDDING_MULTIPLIER == math.sqrt(6144) == cfg.embedding_multiplier
    assert abs(OUTPUT_MULTIPLIER - 1 / math.sqrt(3)) < 1e-15
    assert abs(ATTN_LOGIT_MULTIPLIER - 1 / math.sqrt(128)) < 1e-15
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers) == (131072, 6144, 64)
    assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.group_size) == (48, 8, 128, 6)
    assert (cfg.num_experts, cfg.top_k, cfg.ffn_size) == (8, 2, 32768)
    assert (cfg.attn_softcap, cfg.rms_eps, cfg.rope_base, cfg.pad_token, cfg.eos_token) == (30.0, 1e-5, 1e4, 0, 2)
    assert cfg.sequence_len == 8192


@pytest.mark.parametrize("d,wf,f", [(6144, 8, 32768), (64, 2, 88), (40, 2, 56), (256, 3, 512)])
def test_ffn_size_formula(d, wf, f):
    assert expert_ffn_size(d, wf) == f


def test_from_reference_round_trip_and_unknown_names():
    ref = gv.GrokConfig.grok1().to_reference()
    assert gv.GrokConfig.from_reference(**ref).replace(name="grok-1") == gv.GrokConfig.grok1()
    with pytest.raises(ValueError, match="Unknown reference config field 'num_head'.*num_q_heads"):
        gv.GrokConfig.from_reference(**{**ref, "num_head": 4})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        gv.GrokConfig.golden(num_q_heads=3)


def test_full_grok1_parameter_count_without_allocation():
    cfg = gv.GrokConfig.grok1()
    shapes = gv.param_shapes(cfg)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
    assert gv.count_params(shapes) == 315_684_820_992


def test_full_grok1_forward_traces_abstractly():
    cfg = gv.GrokConfig.grok1()
    shapes = gv.param_shapes(cfg, jnp.bfloat16)
    toks = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    capture = frozenset({"blocks.moe.router_probs", "blocks.attn.pattern"})
    out = jax.eval_shape(lambda p, t: gv.forward(p, t, cfg, capture=capture), shapes, toks)
    assert out.logits.shape == (1, 16, 131072)
    assert out.cache["blocks.moe.router_probs"].shape == (64, 1, 16, 8)
    assert out.cache["blocks.attn.pattern"].shape == (64, 1, 48, 16, 16)

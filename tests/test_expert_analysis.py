"""Counterfactual expert outputs, their DLA, the per-expert lens and single-expert substitution, against slow,
obvious computations: each expert run alone on the captured MoE input with its own weights, the selected slots
recombined with their gates, dla_components, the lens of the model's own sublayer_write, and a callback that keeps
only the top gate. The tiny Grok (sandwich norms) and two Hugging Face families (pre-norm; Mixtral renormalises
its gates, Granite takes a softmax over the selected logits and has a residual multiplier)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokviz.analysis import experts as X
from grokviz.analysis.attribution import dla_components, lens_logits
from grokviz.analysis.dataset import batches
from grokviz.analysis.patching import lm_sums
from grokviz.interventions import Interventions
from grokviz.model.block import sublayer_write
from grokviz.model.layers import gated_ffn
from grokviz.params import dense

TEXTS = ["The cat sat on the mat and then it went home.", "Once upon a time, 42 dogs ran"]


@pytest.fixture(scope="module", params=["tiny", "mixtral", "granitemoe"])
def fam(request, moe_family):
    model, tokens = moe_family(request.param)
    run = model.run(tokens, capture=X.RUN_CAPTURE, interventions=Interventions.none(model.cfg))   # as X runs it
    return SimpleNamespace(name=request.param, model=model, cfg=model.cfg, tokens=tokens, run=run,
                           layer=model.cfg.moe_layer_ids[-1])


def test_counterfactual_outputs_equal_each_expert_alone(fam):
    f, cfg = fam, fam.cfg
    m = cfg.moe_layer_ids.index(f.layer)
    cf = X.expert_outputs(f.model, f.tokens, f.layer)
    x = jnp.asarray(f.run.cache["blocks.moe.pre_norm", f.layer])                   # [b, t, d]
    p = f.model.params["blocks"]
    assert cf["outputs"].shape == (*f.tokens.shape, cfg.num_experts, cfg.d_model)
    for e in range(cfg.num_experts):                                              # each expert on its own
        wg, wu, wd = (dense(p[n][m, e], jnp.float32) for n in ("w_gate", "w_up", "w_down"))
        y = np.asarray(gated_ffn(x @ wg, x @ wu, cfg) @ wd)
        np.testing.assert_allclose(cf["outputs"][:, :, e], y, rtol=1e-4, atol=1e-5)
    # the selected experts' outputs, gated, are the MoE output of the run
    sel = np.take_along_axis(cf["outputs"], cf["experts"][..., None], axis=2)
    np.testing.assert_allclose(np.einsum("btk,btkd->btd", cf["gates"], sel), f.run.cache["blocks.moe.out", f.layer],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sel, f.run.cache["blocks.moe.expert_out", f.layer], rtol=1e-4, atol=1e-5)
    # positions: a selection of the same arrays
    part = X.expert_outputs(f.model, f.tokens, f.layer, positions=[0, -1])
    np.testing.assert_allclose(part["outputs"], cf["outputs"][:, [0, f.tokens.shape[1] - 1]], atol=1e-6)


@pytest.mark.parametrize("fam", ["tiny"], indirect=True)  # one family is enough for the hook's plumbing
def test_hook_capture_leaves_the_run_unchanged_and_a_patch_flows_on(fam):
    f, cfg = fam, fam.cfg
    hook = "blocks.moe.expert_outputs_all"
    none = Interventions.none(cfg)
    run = f.model.run(f.tokens, capture=[hook], interventions=none)
    np.testing.assert_array_equal(run.logits, f.run.logits)                        # bit for bit
    cf = X.expert_outputs(f.model, f.tokens, f.layer)
    np.testing.assert_allclose(run.cache[hook, f.layer], cf["outputs"], atol=1e-5)
    # zeroing expert e's counterfactual output at one layer is the contribution ablation of e there
    e = int(np.bincount(cf["experts"].ravel(), minlength=cfg.num_experts).argmax())
    value = np.asarray(run.cache[hook]).copy()
    value[f.layer, :, :, e] = 0.0
    patched = f.model.run(f.tokens, interventions=none.patch(hook, value, layers=[f.layer]))
    ablated = f.model.run(f.tokens, capture=[hook], interventions=none.ablate_expert(f.layer, e, "contribution"))
    np.testing.assert_allclose(patched.logits, ablated.logits, atol=1e-5)
    assert not np.allclose(patched.logits, run.logits, atol=1e-4)


@pytest.mark.parametrize("fam", ["tiny"], indirect=True)
def test_counterfactual_outputs_under_interventions_follow_the_run(fam):
    """expert_outputs runs the model's own blocks itself: interventions (a top-level patch, a block patch, a
    route-around and a head ablation) act as in Model.run, and bad input is refused."""
    f, cfg = fam, fam.cfg
    b, t = f.tokens.shape
    iv = (Interventions.none(cfg).ablate_expert(0, 1, "route_around").ablate_head(1, 0)
          .patch("embed.out", np.zeros((b, t, cfg.d_model), np.float32), positions=[1])
          .patch("blocks.resid_mid", np.ones((cfg.num_layers, b, t, cfg.d_model), np.float32), layers=[1],
                 positions=[2]))
    cap = ["blocks.moe.pre_norm", "blocks.moe.top_k_experts", "blocks.moe.top_k_weights", "blocks.moe.out"]
    run = f.model.run(f.tokens, capture=cap, interventions=iv)
    cf = X.expert_outputs(f.model, f.tokens, 2, positions=[0, 2, -1], interventions=iv)
    at = [0, 2, t - 1]
    np.testing.assert_array_equal(cf["experts"], run.cache["blocks.moe.top_k_experts", 2][:, at])
    np.testing.assert_allclose(cf["moe_out"], run.cache["blocks.moe.out", 2][:, at], rtol=1e-4, atol=1e-5)
    sel = np.take_along_axis(cf["outputs"], cf["experts"][..., None], axis=2)
    np.testing.assert_allclose(np.einsum("btk,btkd->btd", cf["gates"], sel), cf["moe_out"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        X.expert_outputs(f.model, f.tokens, 2, positions=[t])
    with pytest.raises(ValueError, match="layer"):
        X.expert_outputs(f.model, f.tokens, cfg.num_layers)
    with pytest.raises(ValueError, match="target"):
        X.counterfactual_dla(f.model, f.tokens, 2, np.zeros((b, t + 1), np.int32))


def test_counterfactual_dla_matches_dla_components(fam):
    f, cfg = fam, fam.cfg
    target = (np.abs(f.tokens) % 50 + 3).astype(np.int32)                         # one target per position
    comp = dla_components(f.model.params, cfg, f.run.cache, target)
    d = X.counterfactual_dla(f.model, f.tokens, f.layer, target)
    m = cfg.moe_layer_ids.index(f.layer)
    np.testing.assert_allclose(d["gated"], comp["experts"][m], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(d["ungated"], d["experts"], -1) * d["gates"], d["gated"],
                               atol=1e-6)
    assert d["ungated"].shape == (*f.tokens.shape, cfg.num_experts)
    one = X.counterfactual_dla(f.model, f.tokens, f.layer, 7, positions=[-1])
    tbl = X.counterfactual_table(f.model, f.tokens, f.layer, target=7, row=0, position=f.tokens.shape[1] - 1)
    np.testing.assert_allclose(tbl["dla"], one["ungated"][0, 0], atol=1e-5)
    assert tbl["selected"].sum() == len(set(one["experts"][0, 0].tolist()))
    np.testing.assert_allclose(tbl.loc[tbl.selected, "gate"].sum(), one["gates"][0, 0].sum(), atol=1e-6)


# the sandwich (tiny) and the residual multiplier (granite) cover the write factors
@pytest.mark.parametrize("fam", ["tiny", "granitemoe"], indirect=True)
def test_expert_lens_reads_out_the_writes(fam):
    f, cfg = fam, fam.cfg
    df = X.expert_lens(f.model, f.tokens, f.layer, row=0, position=-1, k=3)
    pos = int(np.flatnonzero(np.asarray(f.run.real)[0])[-1])
    m_out = jnp.asarray(f.run.cache["blocks.moe.out", f.layer])[0, pos]
    scale = f.model.params["blocks"]["moe_post_norm"][f.layer] if cfg.sandwich else None
    want = np.argsort(-np.asarray(lens_logits(f.model.params, cfg, sublayer_write(m_out, scale, cfg))))[:3]
    assert df[df.component == "moe"]["token_id"].tolist() == want.tolist()
    assert sorted(df[df.component == "expert"]["slot"].unique()) == list(range(cfg.top_k))
    with pytest.raises(ValueError, match="layer"):
        X.expert_lens(f.model, f.tokens, cfg.num_layers)


@pytest.fixture(scope="module")
def tiny_batch(moe_family):
    model, _ = moe_family("tiny")
    (toks,) = list(batches(model, TEXTS, batch_size=2, progress=False))
    return model, toks


def test_single_expert_substitution_equals_a_callback(tiny_batch):
    model, toks = tiny_batch
    df = X.single_expert_substitution(model, TEXTS, batch_size=2, progress=False)
    base = model.run(toks, capture=["blocks.moe.top_k_weights"])
    b_nll, _, n = lm_sums(jnp.asarray(base.logits), jnp.asarray(toks), model.cfg.pad_token)
    layer = 2

    def top_only(v, lyr):
        keep = jax.nn.one_hot(jnp.argmax(v, -1), v.shape[-1], dtype=v.dtype)
        return jnp.where(lyr == layer, v * keep, v)

    run = model.run(toks, callbacks={"blocks.moe.top_k_weights": top_only})
    nll, _, _ = lm_sums(jnp.asarray(run.logits), jnp.asarray(toks), model.cfg.pad_token)
    row = df[df.layer == layer].iloc[0]
    np.testing.assert_allclose(row["delta_loss"], float(nll - b_nll) / float(n), atol=1e-5)
    assert row["n_tokens"] == int(n) and list(df.layer) == [0, 1, 2, 3]


def test_top_expert_agreement_by_hand(tiny_batch):
    model, toks = tiny_batch
    df = X.top_expert_agreement(model, TEXTS, batch_size=2, progress=False)
    run = model.run(toks, capture=X.RUN_CAPTURE, interventions=Interventions.none(model.cfg))
    real = np.asarray(run.real)
    layer = 1
    g = np.asarray(run.cache["blocks.moe.top_k_weights", layer])
    y = np.asarray(run.cache["blocks.moe.expert_out", layer])
    top = np.argmax(g, -1)
    y_top = np.take_along_axis(y, top[..., None, None], 2)[..., 0, :] * g.max(-1)[..., None]
    moe = np.asarray(run.cache["blocks.moe.out", layer])
    scale = np.asarray(model.params["blocks"]["moe_post_norm"][layer])
    a, b = y_top * scale, moe * scale                                            # the frozen r cancels in cosines
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(df.loc[df.layer == layer, "cosine"].iloc[0], cos[real].mean(), atol=1e-5)
    assert df["n_tokens"].iloc[0] == real.sum()
    assert ((df["top_gate_share"] > 0.5) & (df["top_gate_share"] <= 1)).all()
    assert df[["top1_agree_write", "top1_agree_resid"]].apply(lambda c: c.between(0, 1)).all().all()

"""Logit lens and direct logit attribution on the golden model: exact decompositions and hand-checked pieces."""

import jax.numpy as jnp
import numpy as np
import pytest

from grokviz.analysis import attribution as AT


@pytest.fixture(scope="module")
def toks(golden):
    return np.asarray(golden[2]["tokens"])


def test_lens_of_last_stream_is_the_model(golden_model, toks):
    run = golden_model.run(toks, capture=AT.DLA_CAPTURE)  # one compiled program for the module
    lens = AT.lens_logits(golden_model.params, golden_model.cfg, run.cache["blocks.resid_post", -1])
    np.testing.assert_allclose(lens, run.logits, atol=1e-4)
    # by hand for one position
    cfg, p = golden_model.cfg, golden_model.params
    h = np.asarray(run.cache["blocks.resid_post", 0][1, 3], np.float64)
    hn = np.asarray(p["final_norm"]) * h / np.sqrt(np.mean(h**2) + cfg.rms_eps)
    want = np.asarray(p["embed"], np.float64) @ hn * cfg.output_multiplier
    got = AT.lens_logits(p, cfg, run.cache["blocks.resid_post", 0])[1, 3]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_logit_lens_table(golden_model, toks):
    df = AT.logit_lens(golden_model, toks)
    L = golden_model.cfg.num_layers
    assert len(df) == 3 * L + 1
    final = df[df.stage == "final"].iloc[0]
    last = df[(df.layer == L - 1) & (df.stage == "resid_post")].iloc[0]
    assert last["loss"] == pytest.approx(final["loss"], abs=1e-4) and abs(last["kl_to_final"]) < 1e-5
    # resid_post of layer l is resid_pre of layer l + 1
    a = df[(df.layer == 0) & (df.stage == "resid_post")].iloc[0]
    b = df[(df.layer == 1) & (df.stage == "resid_pre")].iloc[0]
    assert a["loss"] == pytest.approx(b["loss"])
    at = AT.logit_lens_at(golden_model, toks, row=1, k=3, target=5)
    assert len(at) == (3 * L + 1) * 3 and (at.groupby(["layer", "stage"])["prob"].is_monotonic_decreasing).all()


@pytest.mark.parametrize("foil", [None, 9])
def test_dla_sums_to_logit(golden_model, toks, foil):
    df = AT.direct_logit_attribution(golden_model, toks, 5, row=1, foil=foil)
    assert df.attrs["position"] == 16  # last real token of row 1
    assert df["contribution"].sum() == pytest.approx(df.attrs["logit"], abs=1e-4)
    cfg = golden_model.cfg
    assert (df.component == "expert").sum() == cfg.num_layers * cfg.top_k
    assert (df.component == "head").sum() == cfg.num_layers * cfg.num_q_heads


def test_dla_expert_term_by_hand(golden_model, toks):
    cfg, p = golden_model.cfg, golden_model.params
    run = golden_model.run(toks, capture=AT.DLA_CAPTURE)
    comp = AT.dla_components(p, cfg, run.cache, 5)
    np.testing.assert_allclose(comp["total"], np.asarray(run.logits)[..., 5], atol=1e-4)
    c = {k: np.asarray(v, np.float64) for k, v in run.cache.items()}
    l, b, t, s = 1, 0, 7, 1
    m = c["blocks.moe.out"][l, b, t]
    r3 = 1 / np.sqrt(np.mean(m**2) + cfg.rms_eps)
    hf = c["blocks.resid_post"][-1, b, t]
    rf = 1 / np.sqrt(np.mean(hf**2) + cfg.rms_eps)
    write = np.asarray(p["blocks"]["moe_post_norm"][l]) * c["blocks.moe.top_k_weights"][l, b, t, s] \
        * c["blocks.moe.expert_out"][l, b, t, s] * r3
    want = cfg.output_multiplier * rf * np.dot(np.asarray(p["final_norm"]) * write, np.asarray(p["embed"][5]))
    assert comp["experts"][l, b, t, s] == pytest.approx(want, rel=1e-4, abs=1e-6)
    # the slots of a layer add up to that layer's whole MoE write
    whole = np.asarray(p["blocks"]["moe_post_norm"][l]) * m * r3
    want_all = cfg.output_multiplier * rf * np.dot(np.asarray(p["final_norm"]) * whole, np.asarray(p["embed"][5]))
    assert comp["experts"][l, b, t].sum() == pytest.approx(want_all, rel=1e-4, abs=1e-6)
    assert np.isfinite(float(jnp.sum(comp["heads"])))


def test_out_of_range_arguments_name_the_bound(golden_model, toks):
    short = toks[1:, :9]  # a 9-token prompt
    with pytest.raises(ValueError, match=r"position 99 is outside the sequence of 9 tokens"):
        AT.logit_lens_at(golden_model, short, position=99)  # returned a table before
    with pytest.raises(ValueError, match=r"position -10 counts back over the real tokens of row 0, which has 9"):
        AT.logit_lens_at(golden_model, short, position=-10)
    with pytest.raises(ValueError, match=r"row contains 2, outside \[-2, 2\)"):
        AT.logit_lens_at(golden_model, toks, row=2)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 512\]"):
        AT.logit_lens_at(golden_model, toks, k=0)
    with pytest.raises(ValueError, match=r"token id 600 is outside the vocabulary"):
        AT.logit_lens_at(golden_model, toks, target=600)
    with pytest.raises(ValueError, match="stages must be among"):
        AT.logit_lens(golden_model, toks, stages=["resid"])
    with pytest.raises(ValueError, match=r"position 24 is outside the sequence of 24 tokens"):
        AT.direct_logit_attribution(golden_model, toks, 5, position=24)
    with pytest.raises(ValueError, match=r"position -18 counts back over the real tokens of row 1, which has 17"):
        AT.direct_logit_attribution(golden_model, toks, 5, row=1, position=-18)
    with pytest.raises(ValueError, match=r"token id -1 is outside the vocabulary"):
        AT.direct_logit_attribution(golden_model, toks, 5, foil=-1)

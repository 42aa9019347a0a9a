"""Ablation sweeps and patching: the prefix-reusing, vmapped sweep equals separate full runs (golden config)."""

import numpy as np
import pytest

import grokviz as gv
from grokviz.analysis import patching as P


@pytest.fixture(scope="module")
def model_tokens(golden):
    cfg, params, z = golden
    return gv.Model(cfg, params), np.asarray(z["tokens"])  # row 1 ends in padding


@pytest.mark.parametrize("kind,mode", [("expert", "zero"), ("expert", "remove"), ("head", "zero")])
def test_sweep_equals_separate_runs(model_tokens, kind, mode):
    model, toks = model_tokens
    sweep = P.ablation_sums(model, toks, kind=kind, mode=mode, chunk=3)  # chunking with a ragged last chunk
    ref = P.separate_ablation_sums(model, toks, kind=kind, mode=mode)
    n_units = model.cfg.num_experts if kind == "expert" else model.cfg.num_q_heads
    assert len(sweep["nll"]) == model.cfg.num_layers * n_units
    np.testing.assert_array_equal(sweep["layer"], ref["layer"])
    np.testing.assert_array_equal(sweep["unit"], ref["unit"])
    assert sweep["n_pred"] == ref["n_pred"] == 23 + 16  # next-token pairs of real tokens
    np.testing.assert_allclose(sweep["base_nll"], ref["base_nll"], rtol=1e-6)
    # same Δloss per ablation (sums over 39 predictions)
    np.testing.assert_allclose(sweep["nll"] - sweep["base_nll"], ref["nll"] - ref["base_nll"], atol=2e-4)
    np.testing.assert_allclose(sweep["kl"], ref["kl"], atol=1e-5)
    assert np.all(ref["kl"] >= -1e-6) and np.any(ref["kl"] > 1e-4)


def test_sweep_frame_and_dataset(model_tokens):
    model, toks = model_tokens
    df = P.ablation_sweep(model, toks, kind="expert", chunk=3)
    assert list(df.columns) == ["layer", "expert", "loss", "base_loss", "delta_loss", "kl", "n_tokens"]
    assert df["layer"].tolist() == [0] * 8 + [1] * 8 and df["n_tokens"].iloc[0] == 39
    np.testing.assert_allclose(df["delta_loss"], df["loss"] - df["base_loss"])
    # a dataset streamed in two batches (the two rows, twice) gives the same means over twice the tokens
    rows = [toks[0], toks[1][toks[1] > 0]] * 2
    df2 = P.ablation_sweep(model, rows, kind="expert", chunk=3, batch_size=2, max_len=24, progress=False)
    assert df2["n_tokens"].iloc[0] == 78
    np.testing.assert_allclose(df2["loss"], df["loss"], atol=1e-5)
    np.testing.assert_allclose(df2["kl"], df["kl"], atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        P.ablation_sweep(model, toks, mode="mean")


@pytest.mark.parametrize("hook", ["blocks.resid_pre", "blocks.moe.top_k_experts"])
def test_patch_sweep_equals_separate_patched_runs(model_tokens, hook):
    model, toks = model_tokens
    clean, corrupt = toks[:1, :17], toks[1:, :17]
    df = P.patch_sweep(model, clean, corrupt, hook=hook, target=5, foil=7, positions=[0, 8, 16])
    assert len(df) == model.cfg.num_layers * 3
    assert list(df.columns) == ["layer", "position", "metric", "recovered", "clean_metric", "corrupt_metric"]
    clean_run = model.run(clean, capture=[hook])
    none = gv.Interventions.none(model.cfg)
    for layer, pos, metric in df[["layer", "position", "metric"]].itertuples(index=False):
        iv = none.patch(hook, clean_run.cache[hook], layers=[layer], positions=[pos])
        logits = model.run(corrupt, interventions=iv).logits
        want = float(logits[0, 16, 5] - logits[0, 16, 7])
        assert metric == pytest.approx(want, abs=2e-4)
    lg = model.run(clean).logits
    assert df["clean_metric"].iloc[0] == pytest.approx(float(lg[0, 16, 5] - lg[0, 16, 7]), abs=1e-5)
    np.testing.assert_allclose(df["recovered"], (df["metric"] - df["corrupt_metric"])
                               / (df["clean_metric"] - df["corrupt_metric"]))
    with pytest.raises(ValueError, match="same token shape"):
        P.patch_sweep(model, toks[:1], toks[1:, :17], target=5)


def test_out_of_range_arguments_name_the_bound(model_tokens):
    model, toks = model_tokens
    with pytest.raises(ValueError, match=r"layers contains 9, outside \[-2, 2\)"):
        P.ablation_sweep(model, toks, layers=[9])  # ran layer 1 before
    with pytest.raises(ValueError, match=r"layers contains -3, outside \[-2, 2\)"):
        P.ablation_sums(model, toks, kind="head", layers=[-3])
    with pytest.raises(ValueError, match=r"layers contains 2"):
        P.separate_ablation_sums(model, toks, layers=[2])
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        P.ablation_sweep(model, toks, chunk=0)
    clean, corrupt = toks[:1, :17], toks[1:, :17]
    with pytest.raises(ValueError, match=r"positions contains 17, outside \[-17, 17\)"):
        P.patch_sweep(model, clean, corrupt, target=5, positions=[0, 17])
    with pytest.raises(ValueError, match=r"layers contains 4"):
        P.patch_sweep(model, clean, corrupt, target=5, layers=[4])
    with pytest.raises(ValueError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        P.patch_sweep(model, clean, corrupt, target=5, foil=512)
    with pytest.raises(ValueError, match="target must be one token"):
        P.patch_sweep(model, clean, corrupt, target=[5, 6])

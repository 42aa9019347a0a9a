"""Interventions and analysis helpers in every Hugging Face family, checked against slow, obvious computations on
the captures of the same run (the six golden models of tests/data/hf: 2 layers, 8 or 16 experts, top-2 or top-4).

Each family's gate rule, written out once per token below (``_expected_gates``):
softmax_topk -> gates are the selected experts' router probabilities (renormalised to sum to 1 in Mixtral and
Qwen3-MoE); topk_softmax (Granite, gpt-oss) -> softmax over the selected experts' logits."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import grokviz as gv
from grokviz import analysis as A
from grokviz.interventions import Interventions

DATA = Path(__file__).parent / "data" / "hf"
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe", "gpt_oss")
#: one capture set for every run of a family (interventions are data), so a family compiles few programs
CAP = ("blocks.moe.router_logits", "blocks.moe.router_probs", "blocks.moe.top_k_experts",
       "blocks.moe.top_k_weights", "blocks.moe.expert_out", "blocks.moe.out", "blocks.attn.head_out",
       "blocks.resid_pre", "blocks.resid_post", "embed.out", "blocks.attn.out")
LAYER, HEAD, TARGET = 0, 1, 5


def _reversed_rows(tokens, pad):
    """Each row's real tokens in reverse order, padding left where it is (same mask, different text)."""
    out = tokens.copy()
    for row in out:
        real = row != pad
        row[real] = row[real][::-1]
    return out


def _none(cfg, shape) -> Interventions:
    """No intervention, with the two patches the tests use present but masked off everywhere: every run of a
    family then has the same intervention pytree and capture set, so it compiles one program for all of them."""
    off = np.zeros((cfg.num_layers, *shape), bool)
    return (Interventions.none(cfg)
            .patch("blocks.moe.top_k_experts", np.zeros((*off.shape, cfg.top_k), np.int32), mask=off)
            .patch("blocks.resid_pre", np.zeros((*off.shape, cfg.d_model), np.float32), mask=off))


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model = gv.load(DATA / request.param, progress=False)
    cfg = model.cfg
    tokens = np.load(DATA / request.param / "golden.npz")["tokens"].astype(np.int32)
    none = _none(cfg, tokens.shape)
    base = model.run(tokens, capture=CAP, interventions=none)
    real = base.real
    load = A.expert_load(base.cache["blocks.moe.top_k_experts", LAYER], real, cfg.num_experts)[0]
    return SimpleNamespace(name=request.param, model=model, cfg=cfg, tokens=tokens, none=none, base=base,
                           real=real, expert=int(np.argmax(load)), other=_reversed_rows(tokens, cfg.pad_token))


def _c(run, name, layer=LAYER):
    return np.asarray(run.cache[name, layer], np.float64)


def _expected_gates(cfg, logits, probs, experts):
    """The family's gates for the chosen ``experts`` of one token, from its router logits / probabilities."""
    if cfg.router_rule == "softmax_topk":
        g = probs[experts]
        return g / g.sum() if cfg.router_renormalize else g
    z = logits[experts] - logits[experts].max()
    return np.exp(z) / np.exp(z).sum()


def _check_routing(cfg, run, layer, removed=(), forced=None):
    """Every token of ``run`` at ``layer``: the experts are the top-k of the family's score over the experts not
    removed (or ``forced``), and the gates follow the family's rule, from the router outputs of the same run."""
    logits, probs = _c(run, "blocks.moe.router_logits", layer), _c(run, "blocks.moe.router_probs", layer)
    got_e = np.asarray(run.cache["blocks.moe.top_k_experts", layer])
    got_g = _c(run, "blocks.moe.top_k_weights", layer)
    b, t, k = got_e.shape
    for i in range(b):
        for j in range(t):
            score = probs[i, j] if cfg.router_rule == "softmax_topk" else logits[i, j]
            if forced is None:
                want = [e for e in np.argsort(-score, kind="stable") if e not in removed][:k]
            else:
                want = list(forced)
            gates = _expected_gates(cfg, logits[i, j], probs[i, j], np.array(want))
            assert sorted(got_e[i, j]) == sorted(want), (i, j)
            order = np.argsort(got_e[i, j])
            np.testing.assert_allclose(got_g[i, j][order], gates[np.argsort(want)], atol=2e-6, err_msg=f"{(i, j)}")


def test_baseline_routing_follows_the_family_rule(fam):
    for layer in range(fam.cfg.num_layers):
        _check_routing(fam.cfg, fam.base, layer)


def test_removed_expert_is_never_selected_and_survivors_get_the_family_gates(fam):
    cfg, e = fam.cfg, fam.expert
    run = fam.model.run(fam.tokens, capture=CAP, interventions=fam.none.remove_expert(LAYER, e))
    ex = np.asarray(run.cache["blocks.moe.top_k_experts", LAYER])
    assert not np.any(ex == e)
    used = np.any(np.asarray(fam.base.cache["blocks.moe.top_k_experts", LAYER]) == e, axis=-1)
    assert used[fam.real].sum() >= 3  # the removal matters to several real tokens
    # the layer's input is unchanged, so are its router outputs; the gates are re-formed over the survivors
    np.testing.assert_array_equal(_c(run, "blocks.moe.router_logits"), _c(fam.base, "blocks.moe.router_logits"))
    _check_routing(cfg, run, LAYER, removed={e})
    gates = _c(run, "blocks.moe.top_k_weights")
    if cfg.router_renormalize or cfg.router_rule == "topk_softmax":
        np.testing.assert_allclose(gates.sum(-1), 1.0, atol=2e-6)
    else:  # un-renormalised: a token that lost its expert keeps less gate mass than the full top-k had
        assert np.all(gates.sum(-1)[used] < _c(fam.base, "blocks.moe.top_k_weights").sum(-1)[used] + 1e-7)
    # tokens that never used it are untouched
    np.testing.assert_array_equal(ex[~used], np.asarray(fam.base.cache["blocks.moe.top_k_experts", LAYER])[~used])
    np.testing.assert_allclose(gates[~used], _c(fam.base, "blocks.moe.top_k_weights")[~used], atol=1e-7)


def test_zeroed_expert_keeps_routing_and_loses_exactly_its_gated_output(fam):
    e = fam.expert
    run = fam.model.run(fam.tokens, capture=CAP, interventions=fam.none.zero_expert(LAYER, e))
    base = fam.base
    for name in ("blocks.moe.top_k_experts", "blocks.moe.top_k_weights", "blocks.moe.expert_out"):
        np.testing.assert_array_equal(_c(run, name), _c(base, name), err_msg=name)
    ex = np.asarray(base.cache["blocks.moe.top_k_experts", LAYER])
    gated = _c(base, "blocks.moe.top_k_weights")[..., None] * _c(base, "blocks.moe.expert_out")  # [b,t,k,d]
    want = _c(base, "blocks.moe.out") - np.where((ex == e)[..., None], gated, 0.0).sum(2)
    got = _c(run, "blocks.moe.out")
    scale = np.abs(_c(base, "blocks.moe.out")).max()
    np.testing.assert_allclose(got, want, atol=1e-5 * scale)
    assert np.abs(got - _c(base, "blocks.moe.out")).max() > 1e-3 * scale  # the expert did contribute


def test_router_bias_and_temperature_change_the_captured_logits_as_documented(fam):
    cfg = fam.cfg
    bias = np.random.default_rng(0).standard_normal(cfg.num_experts).astype(np.float32)
    run = fam.model.run(fam.tokens, capture=CAP, interventions=fam.none.with_router(LAYER, bias=bias,
                                                                                    temperature=2.5))
    want = (_c(fam.base, "blocks.moe.router_logits") + bias) / 2.5  # base logits include gpt-oss's own bias
    np.testing.assert_allclose(_c(run, "blocks.moe.router_logits"), want, rtol=1e-6, atol=1e-6)
    lg = _c(run, "blocks.moe.router_logits")
    softmax = np.exp(lg - lg.max(-1, keepdims=True))
    np.testing.assert_allclose(_c(run, "blocks.moe.router_probs"), softmax / softmax.sum(-1, keepdims=True),
                               atol=1e-6)
    _check_routing(cfg, run, LAYER)
    # a large bias on one expert sends every token to it
    big = np.zeros(cfg.num_experts, np.float32)
    big[fam.expert] = 1e3
    run = fam.model.run(fam.tokens, capture=CAP, interventions=fam.none.with_router(LAYER, bias=big))
    assert np.all(np.any(np.asarray(run.cache["blocks.moe.top_k_experts", LAYER]) == fam.expert, axis=-1))


def test_forced_routing_uses_the_given_experts_with_the_family_gates(fam):
    cfg = fam.cfg
    forced = [cfg.num_experts - 1 - j for j in range(cfg.top_k)]
    value = np.array(fam.base.cache["blocks.moe.top_k_experts"])
    value[LAYER] = forced
    iv = fam.none.patch("blocks.moe.top_k_experts", value, layers=[LAYER])
    run = fam.model.run(fam.tokens, capture=CAP, interventions=iv)
    np.testing.assert_array_equal(np.asarray(run.cache["blocks.moe.top_k_experts", LAYER]),
                                  np.broadcast_to(forced, value.shape[1:]))
    _check_routing(cfg, run, LAYER, forced=forced)
    _check_routing(cfg, run, LAYER + 1)  # the other layer routes by itself


def test_head_ablation_zeroes_that_heads_output(fam):
    run = fam.model.run(fam.tokens, capture=CAP, interventions=fam.none.ablate_head(LAYER, HEAD))
    got, base = _c(run, "blocks.attn.head_out"), _c(fam.base, "blocks.attn.head_out")
    assert np.all(got[:, :, HEAD] == 0) and np.abs(base[:, :, HEAD]).max() > 0
    keep = [h for h in range(fam.cfg.num_q_heads) if h != HEAD]
    np.testing.assert_array_equal(got[:, :, keep], base[:, :, keep])
    assert not np.allclose(run.logits, fam.base.logits)


def _patched_resid(fam, positions=None):
    iv = fam.none.patch("blocks.resid_pre", fam.base.cache["blocks.resid_pre"], layers=[1], positions=positions)
    return fam.model.run(fam.other, capture=CAP, interventions=iv)


def test_residual_patch_from_another_run_reproduces_it_downstream(fam):
    other = fam.model.run(fam.other, capture=CAP, interventions=fam.none)
    real = fam.real
    assert np.abs(other.logits[real] - fam.base.logits[real]).max() > 1e-3  # the texts differ
    run = _patched_resid(fam)
    scale = np.abs(fam.base.logits[real]).max()
    np.testing.assert_allclose(run.logits[real], fam.base.logits[real], atol=1e-5 * scale)
    np.testing.assert_allclose(_c(run, "blocks.resid_post", 1)[real], _c(fam.base, "blocks.resid_post", 1)[real],
                               atol=1e-5 * np.abs(_c(fam.base, "blocks.resid_post", 1)).max())


# ----------------------------------------------------------------------------------------------- analysis helpers
#: the zero-ablation sweep re-forms the MoE write itself: tried on a pre-norm family with a shared expert and on
#: Granite (residual multiplier), the two cases it once got wrong, to keep the suite fast
ZERO_SWEEP_FAMILIES = ("qwen2_moe", "granitemoe")


def _loss_kl(fam, run):
    tokens = fam.tokens
    valid = np.asarray(A.prediction_pairs(tokens, fam.cfg.pad_token))
    loss = float(A.next_token_loss(run.logits, tokens, fam.cfg.pad_token))
    kl = np.asarray(A.next_token_kl(fam.base.logits, run.logits))
    return loss, float((kl * valid).sum() / valid.sum())


def _sweep_row(df, unit_col, unit):
    row = df[(df.layer == LAYER) & (df[unit_col] == unit)]
    assert len(row) == 1
    return float(row.loss.iloc[0]), float(row.kl.iloc[0])


@pytest.mark.parametrize("fam", ZERO_SWEEP_FAMILIES, indirect=True)
def test_zero_ablation_sweep_matches_a_separate_run(fam):
    df = A.ablation_sweep(fam.model, fam.tokens, mode="zero", layers=[LAYER], chunk=4)
    run = fam.model.run(fam.tokens, capture=CAP, interventions=fam.none.zero_expert(LAYER, fam.expert))
    np.testing.assert_allclose(_sweep_row(df, "expert", fam.expert), _loss_kl(fam, run), rtol=1e-4, atol=1e-6)


#: the sweeps delegate the family maths to the model's own blocks (checked above in every family); they are run
#: on one family per gate rule (not renormalised with a shared expert, renormalised, top-k then softmax)
SWEEP_FAMILIES = ("qwen2_moe", "qwen3_moe", "gpt_oss")


@pytest.mark.parametrize("fam", SWEEP_FAMILIES, indirect=True)
def test_remove_and_head_ablation_sweeps_match_separate_runs(fam):
    for kind, mode, unit, iv in (("expert", "remove", fam.expert, fam.none.remove_expert(LAYER, fam.expert)),
                                 ("head", "zero", HEAD, fam.none.ablate_head(LAYER, HEAD))):
        df = A.ablation_sweep(fam.model, fam.tokens, kind=kind, mode=mode, layers=[LAYER], chunk=4)
        assert len(df) == (fam.cfg.num_experts if kind == "expert" else fam.cfg.num_q_heads)
        run = fam.model.run(fam.tokens, capture=CAP, interventions=iv)
        loss, kl = _loss_kl(fam, run)
        np.testing.assert_allclose(_sweep_row(df, kind, unit), (loss, kl), rtol=1e-4, atol=1e-6, err_msg=kind)
        assert kl > 0


def _metric(fam, run):
    """mean over rows of log p(TARGET) at each row's last real token (patch_sweep's metric without a foil)."""
    pos = np.asarray(A.last_real_position(fam.other, fam.cfg.pad_token))
    z = np.asarray(run.logits, np.float64)[np.arange(len(pos)), pos]
    return float(np.mean(z[:, TARGET] - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) - z.max(-1)))


#: patch_sweep compiles four programs per hook and family; each family gets one of its two uses, so that each gate
#: rule (renormalised or not, top-k then softmax) meets both
ACTIVATION_PATCHING = ("mixtral", "qwen2_moe", "granitemoe")
P = 12  # a position that is real in every row


def test_activation_or_routing_patching_matches_a_patched_run(fam):
    if fam.name in ACTIVATION_PATCHING:
        df = A.activation_patching(fam.model, fam.tokens, fam.other, target=TARGET, layers=[1], positions=[P])
        assert len(df) == 1
        want = _metric(fam, _patched_resid(fam, positions=[P]))
        np.testing.assert_allclose(df.metric.iloc[0], want, atol=1e-5)
        return
    df = A.routing_patching(fam.model, fam.tokens, fam.other, target=TARGET, layers=[LAYER], positions=[P])
    iv = fam.none.force_routing(np.asarray(fam.base.cache["blocks.moe.top_k_experts"]), layers=[LAYER],
                                positions=[P])
    want = _metric(fam, fam.model.run(fam.other, capture=CAP, interventions=iv))
    np.testing.assert_allclose(df.metric.iloc[0], want, atol=1e-5)
    assert np.isfinite(df.recovered.iloc[0]) and np.isfinite(df.clean_metric.iloc[0])


#: the lens differs between families only in the readout: untied head (Mixtral) vs tied and scaled (Granite)
LENS_FAMILIES = ("mixtral", "granitemoe")


@pytest.mark.parametrize("fam", LENS_FAMILIES, indirect=True)
def test_logit_lens_reads_out_with_the_family_head(fam):
    df = A.attribution.logit_lens(fam.model, fam.tokens)
    final = df[df.stage == "final"]
    last = df[(df.layer == fam.cfg.num_layers - 1) & (df.stage == "resid_post")]
    loss = float(A.next_token_loss(fam.base.logits, fam.tokens, fam.cfg.pad_token))
    np.testing.assert_allclose(final.loss.iloc[0], loss, rtol=1e-5)
    np.testing.assert_allclose(last.loss.iloc[0], loss, rtol=1e-5)  # the untied / scaled head, not the embedding
    assert abs(last.kl_to_final.iloc[0]) < 1e-5
    assert df.loss.notna().all() and len(df) == 3 * fam.cfg.num_layers + 1


def test_direct_logit_attribution_sums_to_the_logit(fam):
    # dla_components on the captures of the baseline run (they include DLA_CAPTURE): no compile of its own
    comp = A.attribution.dla_components(fam.model.params, fam.cfg, fam.base.cache, TARGET)
    real = fam.real
    np.testing.assert_allclose(comp["total"][real], fam.base.logits[..., TARGET][real], rtol=1e-4, atol=1e-4)


def test_routing_statistics_run_on_every_family(fam):
    cfg, cache, real = fam.cfg, fam.base.cache, fam.real
    df = A.routing_summary(cache, real, cfg.num_experts)
    assert len(df) == cfg.num_layers
    ent = A.routing_entropy(cache["blocks.moe.router_probs"], real)
    assert np.all((ent > 0) & (ent <= math.log(cfg.num_experts) + 1e-6))
    co = A.coactivation(cache["blocks.moe.top_k_experts"], real, cfg.num_experts)
    # each real token adds its k experts to the diagonal and k * (k - 1) ordered pairs of distinct experts
    assert co.sum(axis=(1, 2)).tolist() == [int(real.sum()) * cfg.top_k ** 2] * cfg.num_layers  # diagonal: load
    mass = A.gate_mass(cache["blocks.moe.top_k_weights"], real)
    if cfg.router_renormalize or cfg.router_rule == "topk_softmax":
        np.testing.assert_allclose(mass, 1.0, atol=1e-5)
    else:
        assert np.all((mass > 0) & (mass < 1))

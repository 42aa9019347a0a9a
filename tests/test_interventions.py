"""Interventions as data: no-ops are bit-identical, each semantics does what it says, values never recompile."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grokviz as gv
from grokviz import api
from grokviz.interventions import check_interventions, stack

ROUTING = ["blocks.moe.*", "blocks.resid_post"]


@pytest.fixture(scope="module")
def base(golden_model, golden):
    return golden_model.run(golden[2]["tokens"], capture=ROUTING)


@pytest.fixture(scope="module")
def none(golden):
    return gv.Interventions.none(golden[0])


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_noop_is_bit_identical(golden_model, golden, none, impl):
    toks = golden[2]["tokens"]
    a = golden_model.run(toks, capture=ROUTING, expert_impl=impl)
    b = golden_model.run(toks, capture=ROUTING, expert_impl=impl, interventions=none)
    assert np.array_equal(np.asarray(a.logits), np.asarray(b.logits))
    for name in a.cache:
        assert np.array_equal(np.asarray(a.cache[name]), np.asarray(b.cache[name])), name


@pytest.mark.parametrize("edit", [
    lambda iv: iv.zero_expert(0, 3, scale=1.0),
    lambda iv: iv.ablate_head(1, 2, scale=1.0),
    lambda iv: iv.with_router(temperature=1.0, bias=0.0, renormalize=False),
])
def test_each_neutral_edit_is_bit_identical(golden_model, golden, base, none, edit):
    run = golden_model.run(golden[2]["tokens"], interventions=edit(none))
    assert np.array_equal(np.asarray(run.logits), np.asarray(base.logits))


def test_remove_expert(golden_model, golden, base, none):
    layer, expert = 1, int(np.asarray(base.cache["blocks.moe.top_k_experts"])[1, 0, 0, 0])
    run = golden_model.run(golden[2]["tokens"], capture=ROUTING, interventions=none.remove_expert(layer, expert))
    assert int(np.asarray(run.cache["blocks.moe.expert_load"])[layer, expert]) == 0
    assert not np.any(np.asarray(run.cache["blocks.moe.top_k_experts"])[layer] == expert)
    for name in ROUTING[1:] + ["blocks.moe.top_k_experts", "blocks.moe.router_probs"]:  # earlier layers untouched
        assert np.array_equal(np.asarray(run.cache[name])[:layer], np.asarray(base.cache[name])[:layer])
    # tokens that did not use the expert keep their experts and gates exactly
    before = np.asarray(base.cache["blocks.moe.top_k_experts"])[layer]
    untouched = ~np.any(before == expert, axis=-1)
    after = np.asarray(run.cache["blocks.moe.top_k_experts"])[layer]
    np.testing.assert_array_equal(after[untouched], before[untouched])
    # a token that used it now gets its next choice, gated by that choice's router probability
    probs = np.asarray(run.cache["blocks.moe.router_probs"])[layer]
    moved = np.asarray(run.cache["blocks.moe.top_k_experts"])[layer][~untouched]
    masked = np.where(np.arange(8) == expert, -1, probs[~untouched])
    np.testing.assert_array_equal(moved, np.argsort(-masked, -1, kind="stable")[:, :2])
    assert not np.allclose(run.logits, base.logits)


def test_a_removed_expert_never_contributes_even_when_picked(golden_model, golden, none):
    """gv.forward does no host checks: with 7 of 8 experts removed (top-2) one removed expert must still be
    picked per token, and forced routing can name a removed expert; either way its gate is 0."""
    cfg, params, toks = golden[0], golden_model.params, golden[2]["tokens"]
    iv = none
    for e in range(1, 8):
        iv = iv.remove_expert(0, e)
    names = frozenset({"blocks.moe.top_k_experts", "blocks.moe.top_k_weights"})
    out = gv.forward(params, jnp.asarray(toks), cfg, capture=names, interventions=iv)
    experts = np.asarray(out.cache["blocks.moe.top_k_experts"])[0]
    gates = np.asarray(out.cache["blocks.moe.top_k_weights"])[0]
    assert np.all(experts[..., 0] == 0) and np.all(experts[..., 1] != 0)   # expert 0, then a removed one
    assert np.all(gates[..., 1] == 0) and np.all(gates[..., 0] > 0)
    assert np.all(np.isfinite(np.asarray(out.logits)))
    # renormalising over what is left: the kept expert's gate becomes 1
    renorm = iv.with_router(renormalize=True)
    out = gv.forward(params, jnp.asarray(toks), cfg, capture=names, interventions=renorm)
    gates = np.asarray(out.cache["blocks.moe.top_k_weights"])[0]
    np.testing.assert_allclose(gates, np.broadcast_to([1.0, 0.0], gates.shape), atol=1e-6)
    # every expert removed (built by hand: the editing methods refuse it): zero gates, no NaN
    everything = dataclasses.replace(renorm, expert_remove=renorm.expert_remove.at[0].set(True))
    out = gv.forward(params, jnp.asarray(toks), cfg, capture=names, interventions=everything)
    assert np.all(np.asarray(out.cache["blocks.moe.top_k_weights"])[0] == 0)
    assert np.all(np.isfinite(np.asarray(out.logits)))


def test_zero_expert_keeps_routing(golden_model, golden, base, none):
    run = golden_model.run(golden[2]["tokens"], capture=ROUTING, interventions=none.zero_expert(0, slice(None)))
    np.testing.assert_array_equal(run.cache["blocks.moe.top_k_experts", 0], base.cache["blocks.moe.top_k_experts", 0])
    np.testing.assert_array_equal(run.cache["blocks.moe.top_k_weights", 0], base.cache["blocks.moe.top_k_weights", 0])
    assert np.abs(np.asarray(run.cache["blocks.moe.out", 0])).max() == 0  # every expert zeroed at layer 0


def test_renormalize_and_temperature(golden_model, golden, base, none):
    run = golden_model.run(golden[2]["tokens"], capture=ROUTING, interventions=none.with_router(renormalize=True))
    np.testing.assert_allclose(np.asarray(run.cache["blocks.moe.top_k_weights"]).sum(-1), 1, rtol=1e-6)
    hot = golden_model.run(golden[2]["tokens"], capture=ROUTING, interventions=none.with_router(0, temperature=1000.0))
    np.testing.assert_allclose(hot.cache["blocks.moe.router_probs", 0], 1 / 8, atol=2e-3)


def test_head_ablation_zeroes_that_heads_output(golden_model, golden, none):
    run = golden_model.run(golden[2]["tokens"], capture=["blocks.attn.head_out"], interventions=none.ablate_head(1, 2))
    out = np.asarray(run.cache["blocks.attn.head_out"])
    assert np.abs(out[1, :, :, 2]).max() == 0 and np.abs(out[1, :, :, 1]).max() > 0


def test_patch_with_own_activations_is_noop(golden_model, golden, base, none):
    iv = none.patch("blocks.resid_post", base.cache["blocks.resid_post"])
    run = golden_model.run(golden[2]["tokens"], interventions=iv)
    np.testing.assert_array_equal(run.logits, base.logits)


def test_patch_last_layer_reproduces_other_prompt(golden_model, golden, none):
    toks = golden[2]["tokens"]
    other = np.roll(toks, 3, axis=1)
    other[other == 0] = 7
    src = golden_model.run(other, capture=["blocks.resid_post"])
    positions = [2, 5, 11]
    iv = none.patch("blocks.resid_post", src.cache["blocks.resid_post"], layers=[-1], positions=positions)
    run = golden_model.run(toks, interventions=iv)
    np.testing.assert_allclose(np.asarray(run.logits)[:, positions], np.asarray(src.logits)[:, positions], atol=1e-6)
    unpatched = [p for p in range(toks.shape[1]) if p not in positions]
    assert not np.allclose(np.asarray(run.logits)[:, unpatched], np.asarray(src.logits)[:, unpatched], atol=1e-3)


@pytest.mark.parametrize("name", ["blocks.attn.logits", "blocks.attn.scores"])
def test_patching_attention_scores_takes_effect(golden_model, golden, none, name):
    """A patch on the pre-softmax maps drives the softmax (they were once captured but never applied)."""
    toks = golden[2]["tokens"]
    other = np.roll(toks, 3, axis=1)
    other[other == 0] = 7
    src = golden_model.run(other, capture=[name, "blocks.attn.pattern"])
    base = golden_model.run(toks, capture=[name, "blocks.attn.pattern"])
    own = golden_model.run(toks, capture=["blocks.attn.pattern"], interventions=none.patch(name, base.cache[name]))
    np.testing.assert_allclose(own.logits, base.logits, atol=1e-6)
    run = golden_model.run(toks, capture=[name, "blocks.attn.pattern"],
                           interventions=none.patch(name, src.cache[name], layers=[0]))
    np.testing.assert_allclose(run.cache[name, 0], src.cache[name, 0], atol=1e-6)
    # layer 0's softmax uses the patched maps (same keys allowed: both rows have no padding inside)
    real = np.asarray(toks) > 0
    pattern0 = np.asarray(run.cache["blocks.attn.pattern", 0])[0]
    np.testing.assert_allclose(pattern0[:, real[0]][:, :, real[0]],
                               np.asarray(src.cache["blocks.attn.pattern", 0])[0][:, real[0]][:, :, real[0]], atol=1e-5)
    assert not np.allclose(run.logits, base.logits, atol=1e-4)


def test_routing_patching_uses_other_prompts_decisions(golden_model, golden, none):
    toks = golden[2]["tokens"]
    other = golden_model.run(toks[::-1].copy(), capture=["blocks.moe.top_k_experts"])
    iv = none.force_routing(np.asarray(other.cache["blocks.moe.top_k_experts"])[:, ::-1])  # align rows back
    run = golden_model.run(toks, capture=["blocks.moe.*"], interventions=iv)
    top = "blocks.moe.top_k_experts"
    np.testing.assert_array_equal(run.cache[top], other.cache[top][:, ::-1])
    probs = np.asarray(run.cache["blocks.moe.router_probs"])
    np.testing.assert_array_equal(run.cache["blocks.moe.top_k_weights"],
                                  np.take_along_axis(probs, np.asarray(run.cache["blocks.moe.top_k_experts"]), -1))


def test_patch_shape_errors(golden, none):
    with pytest.raises(ValueError, match="leading layer axis of 2"):
        none.patch("blocks.resid_post", np.zeros((3, 2, 24, 64), np.float32))
    with pytest.raises(KeyError, match="Did you mean"):
        none.patch("blocks.resid_pots", np.zeros((2, 2, 24, 64), np.float32))


def test_changing_values_never_recompiles(golden_model, golden, none):
    toks = golden[2]["tokens"]
    golden_model.run(toks, capture=["blocks.moe.expert_load"], interventions=none)  # compile once
    start = api.TRACE_COUNT[0]
    for layer, expert in [(0, 1), (1, 5), (0, 7)]:
        iv = none.remove_expert(layer, expert).zero_expert(1 - layer, expert).ablate_head(layer, expert % 4)
        golden_model.run(toks, capture=["blocks.moe.expert_load"], interventions=iv)
    assert api.TRACE_COUNT[0] == start


def test_vmapped_ablations_equal_one_by_one(golden_model, golden, none):
    toks = golden[2]["tokens"]
    ivs = [none.remove_expert(l, e) for l in range(2) for e in (0, 3)] + [none.zero_expert(1, 2)]
    logits, cache = golden_model.run_many(toks, ivs, capture=["blocks.moe.expert_load"])
    for i, iv in enumerate(ivs):
        one = golden_model.run(toks, capture=["blocks.moe.expert_load"], interventions=iv)
        np.testing.assert_allclose(logits[i], one.logits, atol=1e-6)
        np.testing.assert_array_equal(cache["blocks.moe.expert_load"][i], one.cache["blocks.moe.expert_load"])
        # layer indexing knows the variant axis (it used to pick variant 1 for layer 1)
        np.testing.assert_array_equal(cache["blocks.moe.expert_load", -1][i], one.cache["blocks.moe.expert_load", 1])
    assert cache["blocks.moe.expert_load", 1].shape == (len(ivs), 8)
    with pytest.raises(IndexError, match="outside the model's 2 layers"):
        cache["blocks.moe.expert_load", 2]


def test_grad_through_expert_scale_matches_finite_differences(golden, none):
    cfg, params, z = golden
    toks = jnp.asarray(z["tokens"])

    def loss(scale):
        iv = gv.Interventions(**{**none.split()[0], "expert_scale": scale})
        logits = gv.forward(params, toks, cfg, interventions=iv).logits
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))

    scale = jnp.ones((cfg.num_layers, cfg.num_experts), jnp.float32)
    g = np.asarray(jax.grad(loss)(scale))  # attribution: d loss / d (gate scale of expert e at layer l)
    assert g.shape == (2, 8) and np.any(g != 0)
    l, e = np.unravel_index(np.abs(g).argmax(), g.shape)
    eps = 1e-2
    fd = (loss(scale.at[l, e].add(eps)) - loss(scale.at[l, e].add(-eps))) / (2 * eps)
    np.testing.assert_allclose(g[l, e], float(fd), rtol=5e-2)


def test_stack_requires_same_patch_structure(golden, none):
    with pytest.raises(ValueError, match="same hooks"):
        stack([none, none.force_routing(np.zeros((2, 2, 24, 2), np.int32))])


def test_repr_is_readable(none):
    assert repr(none) == "Interventions(none)"
    assert repr(none.remove_expert(1, 3).ablate_head(0, 2)) == "Interventions(remove L1E3; heads L0H2)"


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("edit,msg", [
    (lambda iv: iv.remove_expert(2, 0), r"remove_expert: layer 2 is outside the 2 layers \[-2, 2\)"),
    (lambda iv: iv.remove_expert(0, 8), r"remove_expert: expert 8 is outside the 8 experts \[-8, 8\)"),
    (lambda iv: iv.zero_expert(-3, 0), "zero_expert: layer -3"),
    (lambda iv: iv.ablate_head(0, 4), r"ablate_head: head 4 is outside the 4 heads \[-4, 4\)"),
    (lambda iv: iv.ablate_head(0, [1, 9]), "head 9"),
    (lambda iv: iv.ablate_head(0, 1.0), "must be an int"),
    (lambda iv: iv.with_router(5, temperature=2.0), "with_router: layer 5"),
    (lambda iv: iv.zero_expert(slice(0, 9), 0), "layer slice"),
    (lambda iv: iv.with_router(temperature=0.0), "router temperature must be > 0"),
    (lambda iv: iv.with_router(temperature=-1.0), "router temperature must be > 0"),
    (lambda iv: iv.with_router(temperature=np.nan), "router_temperature must be finite"),
    (lambda iv: iv.with_router(temperature=np.inf), "router_temperature must be finite"),
    (lambda iv: iv.zero_expert(0, 1, scale=np.nan), "expert_scale must be finite"),
    (lambda iv: iv.ablate_head(0, 1, scale=-np.inf), "head_scale must be finite"),
    (lambda iv: iv.with_router(0, bias=np.full(8, np.inf)), "router_bias must be finite"),
    (lambda iv: iv.with_router(0, bias=np.zeros(7)), r"shape \(7,\), which does not fit the selected \(8,\)"),
    (lambda iv: iv.remove_expert(0, slice(None)), "removes all 8 experts at layer 0"),
    (lambda iv: iv.patch("blocks.resid_post", np.zeros((2, 2, 24, 64), np.float32), positions=[24]),
     "position 24 is outside the 24 positions"),
    (lambda iv: iv.patch("blocks.resid_post", np.zeros((2, 2, 24, 64), np.float32), layers=[2]), "layer 2"),
    (lambda iv: iv.patch("blocks.resid_post", np.full((2, 2, 24, 64), np.nan, np.float32)), "non-finite"),
    (lambda iv: iv.patch("blocks.resid_post", np.zeros((2, 2, 24, 64), np.float32), mask=np.ones((2, 24), bool)),
     r"mask has shape \(2, 24\), but it must be \[layer, batch, seq\]"),
])
def test_edits_check_indices_and_values(none, edit, msg):
    """Out-of-range indices were dropped by .at[].set (no ablation happened); bad values gave NaN logits."""
    with pytest.raises(ValueError, match=msg):
        edit(none)


def test_forced_routing_ids_are_checked(none):
    ex = np.zeros((2, 2, 24, 2), np.int32)
    for bad in (99, -1, 8):  # 99: NaN logits, -1: wrapped to expert 7
        e = ex.copy()
        e[1, 0, 3, 1] = bad
        with pytest.raises(ValueError, match=rf"expert id {bad} is outside the 8 experts \[0, 8\)"):
            none.force_routing(e)
    with pytest.raises(ValueError, match="expert ids must be integers"):
        none.force_routing(ex + 0.7)  # used to truncate to 0
    with pytest.raises(ValueError, match="expert ids must be integers"):
        none.patch("blocks.moe.top_k_experts", ex.astype(np.float32))


def test_run_checks_hand_built_interventions(golden_model, golden, none):
    toks = golden[2]["tokens"]

    def built(**fields):
        return dataclasses.replace(none, **fields)

    ones = jnp.ones((2, 2, 24), bool)
    cases = [
        (built(router_temperature=jnp.zeros(2, jnp.float32)), "router temperature must be > 0"),
        (built(expert_scale=jnp.full((2, 8), jnp.nan, jnp.float32)), "expert_scale must be finite"),
        (built(expert_remove=jnp.zeros((2, 8), bool).at[1, :7].set(True)),
         "remove 7 of 8 experts at layer 1, but top_k=2 needs 2 left: remove at most 6"),
        (built(expert_remove=jnp.zeros((2, 8), jnp.float32)), "expert_remove must be boolean"),
        (built(head_scale=jnp.ones((2, 5), jnp.float32)), r"head_scale has shape \(2, 5\), but the model needs"),
        (built(patches={"blocks.moe.top_k_experts": (jnp.full((2, 2, 24, 2), 99, jnp.int32), ones)}), "expert id 99"),
        (built(patches={"blocks.moe.top_k_experts": (jnp.zeros((2, 2, 24, 3), jnp.int32), ones)}),
         r"needs \(2, 2, 24, 2\)"),
        # one position short: was zero-padded by bucketing and applied
        (built(patches={"blocks.resid_post": (jnp.zeros((2, 2, 23, 64), jnp.float32), ones)}),
         r"value has shape \(2, 2, 23, 64\), but this run needs \(2, 2, 24, 64\)"),
        (built(patches={"blocks.resid_post": (jnp.zeros((2, 2, 24, 64), jnp.float32), ones.astype(jnp.int32))}),
         "mask must be boolean"),
    ]
    for iv, msg in cases:
        with pytest.raises(ValueError, match=msg):
            golden_model.run(toks, interventions=iv)
    with pytest.raises(ValueError, match="exactly"):  # d_model = 1 used to broadcast over the residual stream
        golden_model.run(toks, interventions=none.patch("blocks.resid_post", np.zeros((2, 2, 24, 1), np.float32)))
    six = none.remove_expert(0, [0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="top_k=3 needs 3 left: remove at most 5"):
        golden_model.run(toks, interventions=six, top_k=3)
    with pytest.raises(ValueError, match=r"variant 1\).*remove at most 6"):
        golden_model.run_many(toks, [none, built(expert_remove=jnp.zeros((2, 8), bool).at[0, 1:].set(True))])


def test_checks_skip_traced_values_but_keep_shapes(golden, none):
    cfg, params, z = golden
    toks = jnp.asarray(z["tokens"])

    def loss(scale):
        iv = none.zero_expert(1, 2, scale=scale).with_router(0, temperature=1.0 + scale)
        check_interventions(iv, cfg, toks.shape)
        return jnp.sum(gv.forward(params, toks, cfg, interventions=iv).logits[:, -1, :4])

    assert np.isfinite(float(jax.grad(loss)(jnp.float32(0.5))))
    bad = gv.Interventions(**{**none.split()[0], "head_scale": jnp.ones((2, 3), jnp.float32)})
    with pytest.raises(ValueError, match="head_scale has shape"):
        jax.jit(lambda iv: check_interventions(iv, cfg, toks.shape) or iv.head_scale)(bad)


def test_run_records_its_settings_and_reruns(golden_model, golden, none):
    toks = golden[2]["tokens"]
    iv = none.remove_expert(1, 3)
    run = golden_model.run(toks, capture=["blocks.moe.top_k_experts"], top_k=3, interventions=iv)
    assert run.cfg.top_k == 3 and golden_model.cfg.top_k == 2  # widgets read baselines from run.cfg
    assert run.cache["blocks.moe.top_k_experts"].shape[-1] == 3
    assert run.interventions is iv and run.capture == {"blocks.moe.top_k_experts"} and run.bucket
    assert run.expert_impl == "sparse" and run.attention == gv.AttentionSpec()
    again = run.rerun()
    assert again.cfg.top_k == 3
    np.testing.assert_array_equal(again.logits, run.logits)
    plain = run.rerun(interventions=None)
    assert plain.interventions is None and not np.allclose(plain.logits, run.logits)
    np.testing.assert_array_equal(run.positions(1), np.arange(17))  # row 1 ends in 7 pad positions
    np.testing.assert_array_equal(run.positions(-2), np.arange(24))
    with pytest.raises(IndexError, match="row 2 is outside the batch of 2"):
        run.positions(2)

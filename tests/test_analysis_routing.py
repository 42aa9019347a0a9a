"""Routing statistics against hand-computed values on a small hand-made routing (with padding), and the
random baselines against simulation."""

import numpy as np
import pytest

from grokviz.analysis import routing as R
from grokviz.analysis import specialisation as S

E = 4
# [layer=2, batch=2, seq=4, k=2]; row 1 has padding at its last position (its routing must be ignored).
EXPERTS = np.array([
    [[[0, 1], [0, 2], [3, 0], [1, 2]],
     [[2, 3], [2, 3], [1, 0], [3, 3]]],
    [[[1, 0], [1, 0], [1, 0], [1, 0]],
     [[0, 1], [2, 3], [3, 2], [0, 0]]],
])
REAL = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)


def test_expert_load_and_share():
    load = R.expert_load(EXPERTS, REAL, E)
    # layer 0 real slots: 0,1 0,2 3,0 1,2 | 2,3 2,3 1,0  -> e0: 4, e1: 3, e2: 4, e3: 3
    # layer 1: 1,0 x4 | 0,1 2,3 3,2                       -> e0: 5, e1: 5, e2: 2, e3: 2
    np.testing.assert_array_equal(load, [[4, 3, 4, 3], [5, 5, 2, 2]])
    np.testing.assert_allclose(R.load_share(EXPERTS, REAL, E), [[4 / 14, 3 / 14, 4 / 14, 3 / 14],
                                                               [5 / 14, 5 / 14, 2 / 14, 2 / 14]])
    # a single layer without the layer axis
    np.testing.assert_array_equal(R.expert_load(EXPERTS[1], REAL, E), [[5, 5, 2, 2]])
    # real=None: every position counts (layer 0 adds 3,3)
    np.testing.assert_array_equal(R.expert_load(EXPERTS, None, E)[0], [4, 3, 4, 5])


def test_load_cv():
    # layer 0: mean 3.5, std 0.5 -> 1/7; layer 1: mean 3.5, std 1.5 -> 3/7
    np.testing.assert_allclose(R.load_cv(EXPERTS, REAL, E), [1 / 7, 3 / 7])
    one = np.zeros((1, 1, 5, 2), int)
    one[..., 1] = 1
    np.testing.assert_allclose(R.load_cv(one, None, E), [1.0])  # loads 5,5,0,0: std 2.5 / mean 2.5
    np.testing.assert_allclose(R.load_cv(one[..., :1], None, E), [np.sqrt(E - 1)])  # everything on one expert


def test_entropy_and_gate_mass():
    probs = np.zeros((1, 2, 4, E))
    probs[0, :, :] = [0.25, 0.25, 0.25, 0.25]
    probs[0, 0, 0] = [1, 0, 0, 0]
    probs[0, 0, 1] = [0.5, 0.5, 0, 0]
    probs[0, 1, 3] = [1, 0, 0, 0]  # padding: ignored
    # real tokens: entropies 0, log2, log4 x5 -> (log2 + 5 log4) / 7 = 11 log2 / 7
    np.testing.assert_allclose(R.routing_entropy(probs, REAL), [11 * np.log(2) / 7])
    weights = np.array([[[[0.5, 0.2], [0.6, 0.1], [0.3, 0.3], [0.4, 0.4]],
                         [[0.9, 0.1], [0.5, 0.4], [0.7, 0.2], [0.0, 0.0]]]])
    np.testing.assert_allclose(R.gate_mass(weights, REAL), [(0.7 + 0.7 + 0.6 + 0.8 + 1.0 + 0.9 + 0.9) / 7])


def test_switch_aux_and_z_loss():
    probs = np.full((1, 2, 4, E), 0.25)
    # uniform router probs -> E * sum(f_i / E) = 1 whatever the load
    np.testing.assert_allclose(R.switch_aux_loss(probs, EXPERTS[:1], REAL, E), [1.0])
    probs2 = np.zeros((1, 2, 4, E))
    probs2[..., 0] = 1.0
    # P = (1,0,0,0), f_0 = 4/14 -> 4 * 4/14
    np.testing.assert_allclose(R.switch_aux_loss(probs2, EXPERTS[:1], REAL, E), [4 * 4 / 14])
    logits = np.zeros((1, 2, 4, E))
    logits[0, 1, 3] = 100.0  # padding
    logits[0, 0, 0] = np.log([1.0, 2.0, 3.0, 4.0])  # lse = log 10
    np.testing.assert_allclose(R.router_z_loss(logits, REAL), [(np.log(10) ** 2 + 6 * np.log(4) ** 2) / 7])


def test_coactivation():
    c = R.coactivation(EXPERTS, REAL, E)
    assert c.shape == (2, E, E)
    np.testing.assert_array_equal(c, c.transpose(0, 2, 1))
    np.testing.assert_array_equal(np.diagonal(c, axis1=1, axis2=2), R.expert_load(EXPERTS, REAL, E))
    # layer 0 pairs: {0,1} {0,2} {0,3} {1,2} {2,3} {2,3} {0,1}
    want = np.zeros((E, E), int)
    for i, j in [(0, 1), (0, 2), (0, 3), (1, 2), (2, 3), (2, 3), (0, 1)]:
        want[i, j] += 1
        want[j, i] += 1
    np.fill_diagonal(want, [4, 3, 4, 3])
    np.testing.assert_array_equal(c[0], want)


def test_consecutive_rates():
    df = R.consecutive_rates(EXPERTS, REAL)
    assert list(df.columns) == ["layer", "first_repeat", "topk_overlap", "n_pairs"]
    # 3 pairs in row 0, 2 in row 1 (the pair into padding is skipped)
    assert df["n_pairs"].tolist() == [5, 5]
    # layer 0: row0 (0,1)->(0,2) first same, overlap; (0,2)->(3,0) overlap; (3,0)->(1,2) none
    #          row1 (2,3)->(2,3) same, overlap; (2,3)->(1,0) none            -> first 2/5, overlap 3/5
    # layer 1: row0 all (1,0): 3 first, 3 overlap; row1 (0,1)->(2,3) none; (2,3)->(3,2) overlap only
    np.testing.assert_allclose(df["first_repeat"], [2 / 5, 3 / 5])
    np.testing.assert_allclose(df["topk_overlap"], [3 / 5, 4 / 5])


def test_consecutive_baselines_values():
    b = R.consecutive_baselines(8, 2)
    assert b["first_repeat"] == pytest.approx(0.125)
    assert b["topk_overlap"] == pytest.approx(13 / 28)
    assert R.consecutive_baselines(8, 1)["topk_overlap"] == pytest.approx(1 / 8)
    assert R.consecutive_baselines(4, 3)["topk_overlap"] == pytest.approx(1.0)


@pytest.mark.parametrize("e,k", [(8, 2), (6, 3), (16, 1)])
def test_baselines_by_simulation(e, k):
    rng = np.random.default_rng(e * 10 + k)
    n_layers, batch, seq = 2, 50, 200
    experts = np.argsort(rng.random((n_layers, batch, seq, e)), axis=-1)[..., :k]  # uniform random k-subsets
    real = np.ones((batch, seq), bool)
    real[:, 150:] = False
    df = R.consecutive_rates(experts, real)
    base = R.consecutive_baselines(e, k)
    n = df["n_pairs"].iloc[0]
    for col in ("first_repeat", "topk_overlap"):
        sd = np.sqrt(base[col] * (1 - base[col]) / n)
        np.testing.assert_allclose(df[col], base[col], atol=max(5 * sd, 1e-12))
    # flows: independent layers -> each cell about n / E^2; load CV about its baseline
    flow = R.routing_flow(experts, real, 0, e)
    assert flow.sum() == real.sum()
    assert abs(flow.mean() - real.sum() / e**2) < 1e-9
    coac = R.coactivation(experts, real, e)[0]
    cond = (coac.sum(1) - np.diag(coac)) / np.diag(coac)  # expected number of co-selected experts = k - 1
    np.testing.assert_allclose(cond, k - 1)
    cv = R.load_cv(experts, real, e)
    assert np.all(cv < 4 * R.load_baseline_cv(int(real.sum()), e, k))


def test_routing_flow_and_paths():
    flow = R.routing_flow(EXPERTS, REAL, 0, E)
    # first choices layer0 -> layer1 (real): 0->1, 0->1, 3->1, 1->1, 2->0, 2->2, 1->3
    want = np.zeros((E, E), int)
    for a, b in [(0, 1), (0, 1), (3, 1), (1, 1), (2, 0), (2, 2), (1, 3)]:
        want[a, b] += 1
    np.testing.assert_array_equal(flow, want)
    np.testing.assert_array_equal(R.routing_flow(EXPERTS, REAL, -2, E), want)
    with pytest.raises(ValueError):
        R.routing_flow(EXPERTS, REAL, 1, E)
    paths = R.routing_paths(EXPERTS, REAL, E)
    assert len(paths) == E * E
    row = paths[(paths.src_expert == 0) & (paths.dst_expert == 1)].iloc[0]
    assert row["count"] == 2 and row["share"] == pytest.approx(2 / 7)
    assert row["lift"] == pytest.approx(2 / (2 * 4 / 7))


def test_routing_summary():
    cache = {"blocks.moe.top_k_experts": EXPERTS}
    df = R.routing_summary(cache, REAL, E)
    assert df["layer"].tolist() == [0, 1]
    np.testing.assert_allclose(df["first_repeat"], [0.4, 0.6])
    assert df["first_repeat_baseline"].iloc[0] == pytest.approx(0.25)


def test_token_class():
    cases = {"\u2581\u2581\u2581\u2581": "whitespace", "\n": "whitespace", "<0x0A>": "whitespace",
             "\u2581(": "punctuation", "):": "punctuation", "==": "punctuation", "\u25817": "digits",
             "42": "digits", "\u2581def": "keyword", "return": "keyword", "\u2581None": "keyword",
             "\u2581self_x": "identifier", "getValue": "identifier", "x2": "identifier", "\u2581the": "word",
             "Hello": "word", "don't": "word", "[PAD]": "other", "<s>": "other", "<0xE2>": "other"}
    for piece, want in cases.items():
        assert S.token_class(piece) == want, piece
    np.testing.assert_array_equal(S.vocab_classes(["\u2581the", "42"]), [5, 2])


def test_group_counts_and_specialisation():
    # layer 0 of EXPERTS with groups: row 0 = group 0, row 1 = group 1 (padding excluded)
    groups = np.array([[0], [1]])
    c = S.group_expert_counts(EXPERTS[:1], REAL, groups, 2, E)
    np.testing.assert_array_equal(c[0], [[3, 2, 2, 1], [1, 1, 2, 2]])
    df = S.specialisation(c, ["a", "b"])
    row = df[(df.expert == 0) & (df.group == "a")].iloc[0]
    assert row["share"] == pytest.approx(3 / 4) and row["base"] == pytest.approx(8 / 14)
    assert row["lift"] == pytest.approx((3 / 4) / (8 / 14)) and row["expert_share"] == pytest.approx(3 / 8)
    ex = S.expert_specialisation(c, ["a", "b"])
    # mixes a:b -- e0 3:1, e1 2:1, e2 2:2, e3 1:2 against the layer's 8:6; e3 departs most, then e0
    assert ex["expert"].tolist()[:2] == [3, 0]
    p, q = np.array([1 / 3, 2 / 3]), np.array([8 / 14, 6 / 14])
    assert ex.iloc[0]["kl"] == pytest.approx(np.sum(p * np.log(p / q)))
    assert ex.iloc[0]["top_group"] == "b" and ex.iloc[0]["top_lift"] == pytest.approx((2 / 3) / (6 / 14))
    # uniform mix: KL 0
    assert S.expert_specialisation(np.ones((1, 3, 4)), "xyz")["kl"].abs().max() < 1e-12


def test_top_tokens():
    tokens = np.array([[5, 6, 5, 7], [6, 5, 7, 0]])
    counts = S.token_expert_counts(EXPERTS[:1], REAL, tokens, 8, E)
    # layer 0 token 5: slots (0,1) (3,0) (2,3) -> e0: 2, e1: 1, e2: 1, e3: 2
    np.testing.assert_array_equal(counts[0, 5], [2, 1, 1, 2])
    np.testing.assert_array_equal(counts[0].sum(0), R.expert_load(EXPERTS[:1], REAL, E)[0])
    df = S.top_tokens(counts, k=2, min_count=2, pieces=[str(i) for i in range(8)])
    top0 = df[(df.layer == 0) & (df.expert == 0)]
    # e0 is selected by 4 of 7 tokens; token 5 by 2 of its 3 (tokens 6 and 7: 1 of 2) -> best of those seen >= 2x
    assert top0["token_id"].tolist() == [5, 6]
    assert top0.iloc[0]["share"] == pytest.approx(2 / 3) and top0.iloc[0]["lift"] == pytest.approx((2 / 3) / (4 / 7))
    assert top0.iloc[0]["freq"] == 3 and top0.iloc[0]["token"] == "5"


def test_dataset_runner_matches_direct(golden_model, golden):
    from grokviz.analysis import dataset as D

    toks = np.asarray(golden[2]["tokens"])
    rows = [{"tokens": toks[0], "domain": "x"}, {"tokens": toks[1][toks[1] > 0], "domain": "y"}] * 2
    st = D.routing_stats(golden_model, rows, batch_size=2, max_len=24, progress=False)
    run = golden_model.run(toks, capture=["blocks.moe.*"])
    ex = np.asarray(run.cache["blocks.moe.top_k_experts"])
    E, k = golden_model.cfg.num_experts, golden_model.cfg.top_k
    np.testing.assert_array_equal(st.load, 2 * R.expert_load(ex, run.real, E))
    np.testing.assert_array_equal(st.load, 2 * np.asarray(run.cache["blocks.moe.expert_load"]))
    summ = st.summary()
    direct = R.consecutive_rates(ex, run.real)
    np.testing.assert_allclose(summ["first_repeat"], direct["first_repeat"])
    np.testing.assert_allclose(summ["entropy"], R.routing_entropy(run.cache["blocks.moe.router_probs"], run.real),
                               rtol=1e-6)
    np.testing.assert_allclose(summ["switch_aux_loss"],
                               R.switch_aux_loss(run.cache["blocks.moe.router_probs"], ex, run.real, E), rtol=1e-6)
    assert summ["first_repeat_random"].iloc[0] == pytest.approx(1 / E)
    dom = st.expert_specialisation("domain")
    assert set(dom["top_group"].dropna()) <= {"x", "y"} and len(dom) == golden_model.cfg.num_layers * E
    np.testing.assert_array_equal(st.domain_counts["x"], 2 * R.expert_load(ex[:, :1], run.real[:1], E))
    assert st.token_counts.sum() == st.load.sum()
    with pytest.raises(ValueError, match="tokenizer"):
        st.specialisation("class")
    assert len(st.paths()) == (golden_model.cfg.num_layers - 1) * E * E
    assert k == 2


def test_out_of_range_ids_and_layers_are_errors():
    """Ids past num_experts were dropped by bincount (a silent wrong load) or crashed deep in numpy."""
    bad = EXPERTS.copy()
    bad[0, 0, 1, 1] = E  # a real position
    for fn in (lambda: R.expert_load(bad, REAL, E), lambda: R.coactivation(bad, REAL, E),
               lambda: R.routing_flow(bad, REAL, 0, E), lambda: S.group_expert_counts(bad, REAL, 0, 1, E)):
        with pytest.raises(ValueError, match=r"expert id 4 is outside \[0, 4\)"):
            fn()
    pad_only = EXPERTS.copy()
    pad_only[0, 1, 3] = 99  # at padding: ignored
    np.testing.assert_array_equal(R.expert_load(pad_only, REAL, E), R.expert_load(EXPERTS, REAL, E))
    with pytest.raises(ValueError, match="integers"):
        R.expert_load(EXPERTS.astype(float), REAL, E)
    for layer in (1, 5, -3):
        with pytest.raises(ValueError, match="no next layer"):
            R.routing_flow(EXPERTS, REAL, layer, E)
    with pytest.raises(ValueError, match=r"group id 2 is outside \[0, 2\)"):
        S.group_expert_counts(EXPERTS, REAL, np.array([[0], [2]]), 2, E)
    with pytest.raises(ValueError, match=r"token id 8 is outside \[0, 8\)"):
        S.token_expert_counts(EXPERTS, REAL, np.full((2, 4), 8), 8, E)
    with pytest.raises(ValueError, match="3 group names for 2 groups"):
        S.specialisation(np.ones((1, 2, E)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="real has shape"):
        R.expert_load(EXPERTS, REAL[:, :3], E)


def test_dataset_runner_argument_bounds(golden_model):
    from grokviz.analysis import dataset as D

    for kw, msg in [(dict(batch_size=0), "batch_size"), (dict(max_len=33), r"max_len must be an int \[1, 32\]"),
                    (dict(min_tokens=0), "min_tokens")]:
        with pytest.raises(ValueError, match=msg):
            next(D.batches(golden_model, [[5, 6, 7]], progress=False, **kw))

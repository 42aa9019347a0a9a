"""Attention summaries against hand-computed values on a hand-made pattern with padding."""

import numpy as np
import pytest

from grokviz.analysis import attention as A

# 1 layer, batch 2, 2 heads, seq 3; row 1's last position is padding.
REAL = np.array([[1, 1, 1], [1, 1, 0]], bool)
P = np.zeros((1, 2, 2, 3, 3))
# head 0: always attends to the first token
P[0, :, 0, :, 0] = 1.0
# head 1: previous-token head at t = 1, uniform at t = 2
P[0, :, 1, 0, 0] = 1.0
P[0, :, 1, 1] = [1.0, 0.0, 0.0]
P[0, :, 1, 2] = [1 / 3, 1 / 3, 1 / 3]
P[0, 1, 1, 2] = [0.0, 0.0, 1.0]  # padding query: must be ignored


def test_entropy_first_and_previous_token():
    ent = A.head_entropy(P, REAL)
    # head 0: all zero; head 1: real queries row0 t0,t1,t2 (0, 0, log 3), row1 t0,t1 (0, 0) -> log3 / 5
    np.testing.assert_allclose(ent, [[0.0, np.log(3) / 5]])
    # first token: queries after the first real token: row0 t1,t2; row1 t1 -> 3 queries
    np.testing.assert_allclose(A.first_token_attention(P, REAL), [[1.0, (1 + 1 / 3 + 1) / 3]])
    # previous token: (t, t-1) both real: row0 (1,0),(2,1); row1 (1,0)
    np.testing.assert_allclose(A.previous_token_score(P, REAL), [[(1 + 0 + 1) / 3, (1 + 1 / 3 + 1) / 3]])
    # the cheap entropy hook gives the same as the pattern
    ent_hook = -np.sum(np.where(P > 0, P * np.log(np.where(P > 0, P, 1)), 0), -1)
    np.testing.assert_allclose(A.head_entropy(None, REAL, entropy=ent_hook), ent)
    # a single layer without the layer axis
    np.testing.assert_allclose(A.previous_token_score(P[0], REAL), A.previous_token_score(P, REAL))


def test_first_token_with_left_padding():
    real = np.array([[0, 1, 1]], bool)
    p = np.zeros((1, 1, 1, 3, 3))
    p[0, 0, 0, :, 1] = 1.0  # everything on position 1, the first real token
    assert A.first_token_attention(p, real)[0, 0] == pytest.approx(1.0)


def test_cap_binding_share():
    logits = np.zeros((1, 2, 2, 3, 3))
    logits[0, 0, 0, 2, 0] = 28.0    # valid, binds at frac 0.9 (>= 27) but not at frac 1
    logits[0, 0, 0, 2, 1] = -35.0   # valid, binds at both
    logits[0, 0, 0, 0, 2] = 100.0   # future key: not counted
    logits[0, 1, 0, 2, 2] = 100.0   # padding query and key: not counted
    logits[0, 1, 1, 1, 0] = 26.0    # below the threshold
    # valid entries per head: row0 1+2+3 = 6, row1 1+2 = 3 -> 9
    np.testing.assert_allclose(A.cap_binding_share(logits, REAL), [[2 / 9, 0.0]])
    np.testing.assert_allclose(A.cap_binding_share(logits, REAL, frac=1.0), [[1 / 9, 0.0]])


def test_head_summary_and_groups():
    df = A.head_summary(P, REAL, group_size=2, layers=[5])
    assert list(df.columns) == ["layer", "head", "kv_head", "entropy", "first_token", "prev_token"]
    assert df["layer"].tolist() == [5, 5] and df["kv_head"].tolist() == [0, 0]
    g = A.gqa_group_summary(P, REAL, group_size=2)
    assert len(g) == 1
    assert g["prev_token"].iloc[0] == pytest.approx(np.mean(A.previous_token_score(P, REAL)))
    # cosine between the heads' rows: row0 t0 1, t1 1, t2 1/sqrt3; row1 t0 1, t1 1  -> mean over 5 real queries
    assert g["pattern_similarity"].iloc[0] == pytest.approx((4 + 1 / np.sqrt(3)) / 5)
    # identical heads are perfectly similar
    same = np.repeat(P[:, :, :1], 2, axis=2)
    assert A.gqa_group_summary(same, REAL, 2)["pattern_similarity"].iloc[0] == pytest.approx(1.0)


def test_on_model(golden_model, golden):
    toks = np.asarray(golden[2]["tokens"])
    run = golden_model.run(toks, capture=["blocks.attn.pattern", "blocks.attn.logits"])
    df = A.head_summary(run.cache["blocks.attn.pattern"], run.real, run.cache["blocks.attn.logits"],
                        group_size=golden_model.cfg.group_size)
    assert len(df) == golden_model.cfg.num_layers * golden_model.cfg.num_q_heads
    assert df[["entropy", "first_token", "prev_token", "cap_binding"]].notna().all().all()
    assert (df["entropy"] <= np.log(24) + 1e-6).all() and df["first_token"].between(0, 1).all()


def test_labels_group_size_and_real_are_checked():
    with pytest.raises(ValueError, match="layers labels the 1 layer"):
        A.head_summary(P, REAL, layers=[0, 1])
    with pytest.raises(ValueError, match="group_size must be a positive int dividing the 2 heads"):
        A.head_summary(P, REAL, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        A.gqa_group_summary(P, REAL, group_size=0)
    with pytest.raises(ValueError, match=r"real has shape \(2, 2\)"):
        A.head_entropy(P, REAL[:, :2])

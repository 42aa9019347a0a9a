"""Routing traces (grokviz.analysis.traces): vLLM- and SGLang-format traces written from the model's own routing
replay it exactly; a perturbed trace gives the planted disagreements; bad traces give clear ValueErrors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

import grokviz as gv
from grokviz.analysis import traces as Tr
from grokviz.interventions import Interventions

DATA = Path(__file__).parent / "data" / "hf"
TEXT = "def total(items):\n    return sum(x * 2 for x in items)  # 12 + 34 = 46"


def _plain_run(model, toks):
    """A run with the intervention pytree replay uses (a forced-routing patch masked off everywhere): the same
    compiled program as the replays, and the model's own routing."""
    cfg = model.cfg
    shape = (cfg.num_layers, 1, toks.shape[1])
    iv = Interventions.none(cfg).patch("blocks.moe.top_k_experts", np.zeros(shape + (cfg.top_k,), np.int32),
                                       mask=np.zeros(shape, bool))
    return model.run(toks, capture=["blocks.moe.top_k_experts"], interventions=iv)


@pytest.fixture(scope="module")
def tiny():
    return gv.load("tiny", progress=False)


@pytest.fixture(scope="module")
def own(tiny):
    toks = tiny.encode(TEXT)
    run = _plain_run(tiny, toks)
    return toks, run, Tr.trace_from_run(run)


def test_vllm_trace_of_own_routing_replays_exactly(tiny, own, tmp_path):
    toks, run, trace = own
    n = toks.shape[1]
    assert trace.shape == (n, 4, 2)
    resp = Tr.write_vllm(trace[:20], trace[20:], path=tmp_path / "r.json")
    assert np.array(resp["prompt_routed_experts"]).shape == (20, 4, 2)
    assert np.array_equal(Tr.read_vllm(tmp_path / "r.json"), trace)
    json.loads((tmp_path / "r.json").read_text())               # plain JSON, as the server sends
    rep = Tr.replay(tiny, toks, tmp_path / "r.json")
    assert rep.agreement == 1.0 and rep.disagreements == 0
    assert list(rep.layers.exact) == [1.0] * 4
    assert np.array_equal(np.asarray(rep.replayed.cache["blocks.moe.top_k_experts"]),
                          np.asarray(run.cache["blocks.moe.top_k_experts"]))
    d = rep.tokens.delta_logprob.to_numpy()
    assert np.isnan(d[-1]) and np.all(d[:-1] == 0.0)            # the last token has no next token
    assert np.array_equal(rep.replayed.logits, run.logits)
    Tr.write_vllm(trace[:20], trace[20:], path=tmp_path / "r.npy")   # the whole sequence, int16
    assert np.load(tmp_path / "r.npy").dtype == np.int16
    assert Tr.replay(tiny, toks, tmp_path / "r.npy").summary()["max_abs_delta_logprob"] == 0.0
    buf = __import__("io").BytesIO()
    np.save(buf, trace[:-1].astype(np.uint16))                      # base64 .npy of num_tokens - 1 rows
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert Tr.replay(tiny, toks, {"choices": [{"routed_experts": b64}]}).agreement == 1.0


def test_sglang_trace_of_own_routing_replays_exactly(tiny, own, tmp_path):
    toks, run, trace = own
    n = toks.shape[1]
    resp = Tr.write_sglang(trace[:-1], path=tmp_path / "s.json")   # SGLang covers [0, seqlen - 1)
    flat = np.frombuffer(base64.b64decode(resp["meta_info"]["routed_experts"]), "<i4")
    assert flat.size == (n - 1) * 4 * 2
    back = Tr.read_sglang(tmp_path / "s.json", num_layers=4, top_k=2)
    assert np.array_equal(back, trace[:-1])
    rep = Tr.replay(tiny, toks, tmp_path / "s.json", engine="sglang")
    assert rep.agreement == 1.0 and rep.summary()["max_abs_delta_logprob"] == 0.0
    assert len(rep.tokens) == n - 1
    # start = routed_experts_start_len: only positions 5.. are forced
    rep = Tr.replay(tiny, toks, {"sgl_ext": {"routed_experts": Tr.write_sglang(trace[5:-1])["meta_info"]
                                                                 ["routed_experts"]}}, engine="sglang", start=5)
    assert rep.agreement == 1.0 and rep.tokens.position.iloc[0] == 5


def test_perturbed_trace_gives_the_planted_disagreements(tiny, own):
    toks, run, trace = own
    bad = trace.copy()
    planted = {1: [3, 7, 11], 2: [3, 9]}                       # layer -> token positions changed
    for layer, positions in planted.items():
        for t in positions:
            free = [e for e in range(8) if e not in bad[t, layer]]
            bad[t, layer, 0] = free[0]
    rep = Tr.replay(tiny, toks, bad)
    by_layer = dict(zip(rep.layers.layer, rep.layers.disagreements))
    assert by_layer == {0: 0, 1: 3, 2: 2, 3: 0}
    assert np.isclose(rep.layers.agreement[1], 1 - 3 / (2 * len(trace)))   # one of two slots differs
    assert rep.disagreements == 5
    differing = rep.tokens.set_index("position").layers_differing
    assert differing[3] == 2 and differing[9] == 1 and differing[0] == 0 and differing.sum() == 5
    d = rep.tokens.delta_logprob.to_numpy()
    assert np.all(d[:3] == 0.0) and np.any(d[3:-1] != 0.0)     # causal: nothing changes before token 3


def test_bad_traces_give_clear_errors(tiny, own):
    toks, _, trace = own
    n = toks.shape[1]
    cases = [
        (trace[:, :, 0], "must be \\[tokens, layers, top_k\\]"),
        (trace[:, :3], "has 3 layers; the model has 4 MoE layers"),
        (trace[:, :, :1], "1 experts per token; the model routes top_k=2"),
        (trace[:-3], f"has {n - 3} token rows, but the sequence has {n} tokens"),
        (np.where(np.arange(n)[:, None, None] == 4, 8, trace), "expert id 8 at token 4, layer 0 is outside"),
        (np.where(np.arange(n)[:, None, None] == 2, -1, trace), "expert id -1 at token 2"),
        (np.repeat(trace[..., :1], 2, -1), "must be distinct"),
        (trace.astype(np.float32) + 0.5, "must be integers"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            Tr.replay(tiny, toks, bad)
    with pytest.raises(ValueError, match="ragged"):
        Tr.read_vllm([[[0, 1]], [[0]]])
    with pytest.raises(ValueError, match="not valid base64"):
        Tr.read_sglang("not base64!", num_layers=4, top_k=2)
    with pytest.raises(ValueError, match="need num_layers and top_k"):
        Tr.read_sglang(Tr.write_sglang(trace)["meta_info"]["routed_experts"])
    with pytest.raises(ValueError, match="do not fill"):
        Tr.read_sglang(np.arange(7), num_layers=4, top_k=2)
    with pytest.raises(ValueError, match="no 'routed_experts'"):
        Tr.read_sglang({"meta_info": {}})
    with pytest.raises(ValueError, match="base64-encoded .npy"):
        Tr.read_vllm({"choices": [{"routed_experts": base64.b64encode(b"1234").decode()}]})
    with pytest.raises(ValueError, match="choice 3 is outside"):
        Tr.read_vllm(Tr.write_vllm(trace), choice=3)
    with pytest.raises(ValueError, match="start must be"):
        Tr.replay(tiny, toks, trace, start=-1)
    with pytest.raises(ValueError, match="one sequence"):
        Tr.replay(tiny, np.concatenate([toks, toks]), trace)


def test_full_layer_axis_of_a_model_with_dense_layers(tiny, own):
    """SGL-JAX's layout: every layer on the layer axis, -1 at the dense ones; the MoE layers' rows are kept."""
    _, _, trace = own
    cfg = tiny.cfg.replace(moe_layers=(1, 3), dense_ffn=64)
    full = np.full(trace.shape, -1)
    full[:, [1, 3]] = trace[:, [1, 3]]
    assert np.array_equal(Tr.check_trace(full, cfg, len(trace)), trace[:, [1, 3]])
    assert np.array_equal(Tr.check_trace(trace[:, [1, 3]], cfg, len(trace)), trace[:, [1, 3]])
    with pytest.raises(ValueError, match="has 3 layers; the model has 2 MoE layers of 4"):
        Tr.check_trace(trace[:, :3], cfg, len(trace))


def test_hf_family_replays_exactly():
    """Mixtral renormalises its gates: forced routing re-forms them by the family rule, so the replay of its own
    routing is exact too."""
    model = gv.load(DATA / "mixtral", progress=False)
    toks = np.load(DATA / "mixtral" / "golden.npz")["tokens"][:1].astype(np.int32)
    trace = Tr.trace_from_run(_plain_run(model, toks))
    rep = Tr.replay(model, toks, Tr.write_sglang(trace), engine="sglang")
    assert rep.agreement == 1.0 and rep.summary()["max_abs_delta_logprob"] == 0.0

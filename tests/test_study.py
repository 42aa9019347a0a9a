"""grokviz.study in one process: the same statistics as grokviz.analysis's own runners, results file round trip,
resume after an interruption, refusal of damaged or foreign progress files, spec checks, a Hugging Face family.
(Multi-process runs and SIGKILLs: tests/test_distributed.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import grokviz as gv
from grokviz import study
from grokviz.analysis import dataset as D
from grokviz.study import runner, store

SPEC = Path(__file__).parent / "data" / "study" / "tiny_validation.toml"
HF = Path(__file__).parent / "data" / "hf" / "mixtral"


def _spec(tmp_path, **kw):
    s = study.load_spec(SPEC)
    out = tmp_path / "res.npz"
    return dataclasses.replace(s, output=out, progress=out.with_name("res.progress.npz"), **kw)


@pytest.fixture(scope="module")
def tiny():
    return gv.load("tiny", progress=False)


@pytest.fixture(scope="module")
def full(tiny, tmp_path_factory):
    spec = _spec(tmp_path_factory.mktemp("full"))
    return spec, study.run(spec, model=tiny, progress=False)


def test_study_equals_routing_stats(tiny, full):
    spec, res = full
    ref = D.routing_stats(tiny, spec.documents(), batch_size=spec.batch_size, max_len=spec.max_len, progress=False)
    st = res.routing
    assert st.n_tokens == ref.n_tokens > 1000
    for name in ("load", "coactivation", "consecutive", "flow", "class_counts", "token_counts"):
        a, b = getattr(st, name), getattr(ref, name)
        assert a.dtype == np.int64 and np.array_equal(a, b), name
    assert st.domain_counts.keys() == ref.domain_counts.keys()
    assert all(np.array_equal(st.domain_counts[d], ref.domain_counts[d]) for d in ref.domain_counts)
    for k in ref.sums:  # same terms, summed per round in batch order instead of one running sum
        np.testing.assert_allclose(st.sums[k], ref.sums[k], rtol=1e-12, atol=1e-9)
    assert not spec.progress.exists()
    back = study.load(spec.output)
    assert back.same_as(res) and back.meta["fingerprint"] == res.meta["fingerprint"]
    assert back.routing.summary().equals(res.routing.summary())
    assert back.routing.top_tokens(k=3).equals(ref.top_tokens(k=3))


def test_interrupted_study_resumes_identically_and_refuses_bad_progress(tiny, full, tmp_path, monkeypatch):
    spec = _spec(tmp_path)
    real_fault = store.fault

    def stop_at_round_3(point, r):
        if point == "start" and r == 3:
            raise KeyboardInterrupt("stopped")
        real_fault(point, r)

    monkeypatch.setattr(store, "fault", stop_at_round_3)
    with pytest.raises(KeyboardInterrupt):
        study.run(spec, model=tiny, progress=False)
    monkeypatch.setattr(store, "fault", real_fault)
    meta, arr = store.read(spec.progress, store.PROGRESS_FORMAT)
    assert meta["rounds_done"] == 3 and meta["finished_batches"] == 3 * spec.batches_per_round
    good = spec.progress.read_bytes()

    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    spec.progress.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="corrupt"):
        study.run(spec, model=tiny, progress=False)
    spec.progress.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match="corrupt"):
        study.run(spec, model=tiny, progress=False)
    spec.progress.write_bytes(good)
    foreign = dataclasses.replace(spec, batch_size=2)  # another study's settings, same files
    with pytest.raises(ValueError, match="belongs to another study"):
        study.run(foreign, model=tiny, progress=False)
    other_data = dataclasses.replace(spec, dataset={"corpus": "validation", "offset": 1, "limit": 3})
    with pytest.raises(ValueError, match="belongs to another study"):
        study.run(other_data, model=tiny, progress=False)

    done = []
    monkeypatch.setattr(runner, "batch_parts", lambda plan, b, f=runner.batch_parts: (done.append(b), f(plan, b))[1])
    res = study.run(spec, model=tiny, progress=False)
    assert min(done) == 3 * spec.batches_per_round  # resumed, not restarted
    assert res.same_as(full[1])


def test_attention_summaries(tiny, tmp_path):
    spec = dataclasses.replace(_spec(tmp_path), collect=("attention",), dataset={"corpus": "validation", "limit": 1})
    res = study.run(spec, model=tiny, progress=False)
    assert res.routing is None
    ref = D.attention_stats(tiny, spec.documents(), batch_size=spec.batch_size, max_len=spec.max_len,
                            progress=False)
    a, b = res.attention.summary(), ref.summary()
    assert list(a.columns) == list(b.columns)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-10, atol=1e-12)
    assert study.load(spec.output).attention.summary().equals(a)


def test_ablation_sweep_delta_loss(tiny, tmp_path):
    spec = dataclasses.replace(_spec(tmp_path), collect=("ablation",), max_len=32,
                               ablation=(("kind", "expert"), ("layers", (2,)), ("mode", "contribution")),
                               dataset={"files": [str(tmp_path / "doc.txt")]})
    (tmp_path / "doc.txt").write_text(study.load_spec(SPEC).documents()[0]["text"][:600])  # 2 batches of 4 x 32
    res = study.run(spec, model=tiny, progress=False)
    ref = gv.analysis.ablation_sweep(tiny, spec.documents(), batch_size=spec.batch_size, max_len=32, layers=[2],
                                     progress=False)
    got = res.ablation
    assert list(got.columns) == list(ref.columns) and len(got) == 8 and set(got["layer"]) == {2}
    assert got[["layer", "expert", "n_tokens"]].equals(ref[["layer", "expert", "n_tokens"]])
    np.testing.assert_allclose(got[["loss", "base_loss", "delta_loss", "kl"]].to_numpy(),
                               ref[["loss", "base_loss", "delta_loss", "kl"]].to_numpy(), rtol=1e-9, atol=1e-12)
    assert study.load(spec.output).ablation.equals(got)


def test_hf_family_study_from_token_file(tmp_path):
    ids = np.random.default_rng(0).integers(3, 488, size=(10, 40))
    np.save(tmp_path / "ids.npy", ids)
    spec = study.load_spec({"model": str(HF), "output": str(tmp_path / "hf.npz"), "batch_size": 4,
                            "batches_per_round": 2, "dataset": {"files": [str(tmp_path / "ids.npy")]}})
    res = study.run(spec, progress=False)
    model = gv.load(str(HF), progress=False)
    ref = D.routing_stats(model, ids, batch_size=4, progress=False)
    assert res.routing.n_tokens == ref.n_tokens == 400
    assert np.array_equal(res.routing.load, ref.load) and np.array_equal(res.routing.token_counts,
                                                                         ref.token_counts)

    # the same spec with the model placed by distributed.sharded on a mesh of this process's one device
    lines = []
    meshed = dataclasses.replace(spec, mesh=(1, 1), output=tmp_path / "m.npz", progress=tmp_path / "m.p.npz")
    assert study.run(meshed, progress=False, log=lines.append).same_as(res)
    assert "bytes read per process: 0: " in lines[0] and "(100.0 %)" in lines[0]
    assert study.prepare(spec, model).fingerprint != study.prepare(meshed, model).fingerprint
    with pytest.raises(ValueError, match=r"mesh \[1, 2\] has 2 devices but the job has 1"):
        study.run(dataclasses.replace(meshed, mesh=(1, 2)), progress=False)


@pytest.mark.parametrize("bad, match", [
    ({"dataset": {"corpus": "validation"}}, "'model'"),
    ({"model": "tiny", "batchsize": 4}, "unknown key"),
    ({"model": "tiny", "collect": ["routing", "gradients"]}, "collect"),
    ({"model": "tiny", "collect": ["top_tokens"]}, "needs 'routing'"),
    ({"model": "tiny", "batch_size": 0}, "batch_size"),
    ({"model": "tiny", "dataset": {"corpus": "test"}}, "dataset.corpus"),
    ({"model": "tiny", "dataset": {"corpus": "validation", "files": ["a.txt"]}}, "exactly one"),
    ({"model": "tiny", "mesh": [0, 2]}, "mesh must be"),
    ({"model": "tiny", "mesh": 8}, "mesh must be"),
])
def test_spec_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        study.load_spec(bad)


def test_results_file_refused_when_damaged(full, tmp_path):
    p = tmp_path / "r.npz"
    p.write_bytes(full[0].output.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt"):
        study.load(p)

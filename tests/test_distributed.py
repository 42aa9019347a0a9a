"""Multi-process jobs on jax.distributed: 2 local processes x 4 CPU devices (grokviz launch, gloo collectives).

A study with 2 processes gives bit-identical results to 1 process; SIGKILLed at two points (a process at the
start of a round; process 0 between writing its progress file's temporary copy and renaming it) the launcher
exits non-zero within its documented bound naming the process and its phase, and the job resumes (with 2
processes, then with 1) to the same results. A process that never joins fails the job within --join-timeout."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from grokviz import distributed as dist
from grokviz import study
from grokviz.study import store

SPEC = Path(__file__).parent / "data" / "study" / "tiny_validation.toml"
HF = Path(__file__).parent / "data" / "hf" / "mixtral"
RELEASE = Path(__file__).parent / "data" / "grok1_golden_ckpt"
GRACE = 2.0


def mxfp4_folder(src: Path, dst: Path) -> Path:
    """``src`` (a gpt-oss folder) with its expert matrices replaced by random MXFP4 blocks and scales."""
    import shutil

    from grokviz.checkpoint.safetensors_io import _ShardWriter, memmap_tensor, read_safetensors_header

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "golden.npz":
            shutil.copyfile(f, dst / f.name)
    entries, start = read_safetensors_header(src / "model.safetensors")
    rng = np.random.default_rng(0)
    w = _ShardWriter(dst / "model.safetensors", 64 << 10)
    for k, e in entries.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            n_e, n_in, n_out = e["shape"]
            w.add(k + "_blocks", rng.integers(0, 256, (n_e, n_out, n_in // 32, 16)).astype(np.uint8))
            w.add(k + "_scales", rng.integers(120, 130, (n_e, n_out, n_in // 32)).astype(np.uint8))
        else:
            w.add(k, np.array(memmap_tensor(src / "model.safetensors", e, start)))
    w.close()
    d = json.loads((src / "config.json").read_text())
    d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (dst / "config.json").write_text(json.dumps(d))
    return dst


def _launch(args, cwd, env=None, timeout=240, grace=GRACE):
    cmd = [sys.executable, "-m", "grokviz.cli", "launch", "-n", "2", "--devices-per-process", "4",
           "--grace", str(grace), *args]
    t = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                       timeout=timeout)
    return p, time.monotonic() - t


def _spec_copy(tmp_path) -> Path:
    dst = tmp_path / "spec.toml"
    dst.write_text(SPEC.read_text())
    return dst


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    spec = study.load_spec(_spec_copy(tmp_path_factory.mktemp("one")))
    return study.run(spec, progress=False)


JOB = """
import json, sys
from pathlib import Path
import numpy as np
from grokviz import distributed as dist
info = dist.initialize()
from grokviz import study
from grokviz.distributed.sharded import load_converted, load_hf, load_release
ckpt, hf, tokens, out, spec, release, cfg, mx, mesh_spec = sys.argv[1:]
mesh = dist.global_mesh((2, 4))  # data axis across the 2 processes


def report(name, stats):  # bytes read (release: + parsing the pickles) of the checkpoint's bytes
    total = stats.file_bytes or stats.tensor_bytes
    print("READ " + json.dumps([name, info.process_id, info.num_processes, info.global_devices,
                                stats.bytes_read + stats.header_bytes, total]), flush=True)


model, stats = load_converted(ckpt, mesh)
logits = model.run(np.load(tokens)).logits
if info.process_id == 0:
    np.save(out, logits)
report("golden", stats)
model, stats = load_release(release, mesh, config=cfg)  # the release pickles, int8 kept
logits = model.run(np.load(tokens)).logits  # every process runs the forward (SPMD)
if info.process_id == 0:
    np.save(out + ".release.npy", logits)
report("release", stats)
import jax
import grokviz as gv
for fam in [*sorted(p.name for p in Path(hf).parent.iterdir() if p.is_dir()), mx]:  # every name-table op, MXFP4
    path = Path(hf).parent / fam
    model, stats = load_hf(path, mesh)
    ref = gv.load(path, progress=False).params
    same = all(np.array_equal(np.asarray(sh.data), np.asarray(b)[sh.index]) and a.dtype == b.dtype
               for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(ref))
               for sh in a.addressable_shards)
    print(f"HF {path.name} {info.process_id} {same}", flush=True)
    if fam in ("mixtral", "gpt_oss", mx):
        report(path.name, stats)
study.run(spec, progress=False)
study.run(mesh_spec, progress=False, log=print if info.process_id == 0 else None)  # the model over both processes
"""


def test_two_processes_golden_forward_and_study_equal_one_process(tmp_path, one_process, golden, golden_model):
    """One job of 2 processes x 4 devices: the golden model, as converted safetensors and as release pickles, read
    shard by shard over a (data 2, model 4) mesh (each process reads about half the bytes) gives the single-process
    logits; every Hugging Face family's folder, and gpt-oss with MXFP4 experts, read shard by shard gives on each
    device exactly gv.load's block (about half the bytes per process); then the study's results equal the
    single-process run bit for bit."""
    from grokviz.checkpoint.config_io import config_to_json
    from grokviz.checkpoint.converted import save

    cfg, params, z = golden
    ckpt = save(params, tmp_path / "golden", cfg)
    (tmp_path / "cfg.json").write_text(json.dumps(config_to_json(cfg)))
    mx = mxfp4_folder(HF.parent / "gpt_oss", tmp_path / "gpt_oss_mxfp4")
    np.save(tmp_path / "tokens.npy", z["tokens"])
    (tmp_path / "job.py").write_text(JOB)
    spec = _spec_copy(tmp_path)
    mesh_spec = tmp_path / "mesh.toml"  # model axis over all 8 devices of both processes
    mesh_spec.write_text(SPEC.read_text().replace('output = "', 'mesh = [1, 8]\noutput = "mesh.'))
    p, _ = _launch(["--", "python", str(tmp_path / "job.py"), str(ckpt), str(HF), str(tmp_path / "tokens.npy"),
                    str(tmp_path / "logits.npy"), str(spec), str(RELEASE), str(tmp_path / "cfg.json"), str(mx),
                    str(mesh_spec)], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    reads = sorted(json.loads(line.split("READ ", 1)[1]) for line in p.stdout.splitlines() if "READ " in line)
    names = ["golden", "gpt_oss", "gpt_oss_mxfp4", "mixtral", "release"]
    assert [r[:4] for r in reads] == [[n, i, 2, 8] for n in names for i in (0, 1)], reads
    for r in reads:  # half of every leaf split over "data", plus the replicated norms (+ the pickles' opcodes)
        hi = 0.62 if r[0] == "gpt_oss_mxfp4" else 0.56  # 4 devices x 16 rows share 32-value MXFP4 groups
        assert 0.45 * r[5] < r[4] < hi * r[5], reads
    print("per-process reads:", [(r[0], r[1], round(r[4] / r[5], 3)) for r in reads])
    single = np.asarray(golden_model.run(z["tokens"]).logits)
    assert np.abs(np.load(tmp_path / "logits.npy") - single).max() < 1e-6
    assert np.abs(np.load(tmp_path / "logits.npy.release.npy") - single).max() < 1e-6
    fams = [*sorted(p.name for p in HF.parent.iterdir() if p.is_dir()), mx.name]
    assert len(fams) == 7 and all(f"HF {f} {i} True" in p.stdout for f in fams for i in (0, 1)), p.stdout[-3000:]

    two = study.load(study.load_spec(spec).output)
    assert two.routing.n_tokens == one_process.routing.n_tokens > 1000
    assert two.same_as(one_process)  # int64 counts and float sums, bit for bit

    # the mesh study: each process read about half the model, and the counts are the single-process ones exactly
    m = re.search(r"bytes read per process: 0: ([\d,]+) of ([\d,]+) .*, 1: ([\d,]+) of", p.stdout)
    assert m, p.stdout[-2000:]
    r0, tot, r1 = (int(g.replace(",", "")) for g in m.groups())
    assert 0.45 * tot < r0 < 0.56 * tot and 0.45 * tot < r1 < 0.56 * tot, m.group(0)
    meshed = study.load(study.load_spec(mesh_spec).output)
    a, b = meshed.arrays(), one_process.arrays()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if np.issubdtype(b[k].dtype, np.floating):  # sums of a sharded forward: equal to rounding
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:  # counts (and labels): exactly
            assert np.array_equal(a[k], b[k]), k
    print("mesh study, float arrays not bit-identical:", [k for k in a if not np.array_equal(a[k], b[k])])


def test_sigkill_then_resume_with_2_then_1_processes(tmp_path, one_process):
    spec_path = _spec_copy(tmp_path)
    spec = study.load_spec(spec_path)
    job = ["--", "grokviz", "study", str(spec_path), "--quiet"]

    # process 1 SIGKILLed at the start of round 2 (index 1): the survivor fails its next collective and exits
    # non-zero by itself (launcher grace 20 s, heartbeat 5 s); the launcher names the dead process and its phase
    p, _ = _launch(job, tmp_path, {store.FAULT_ENV: "1:1:start", dist.ENV_HEARTBEAT: "5"}, grace=20)
    assert p.returncode == 1
    m = re.search(r"process 1 \(pid \d+\) was killed by SIGKILL while '([^']*)'; process 0 (was killed by|exited "
                  r"with).*job stopped ([\d.]+) s after", p.stderr)
    assert m, p.stderr
    assert "study round 1/7" in m.group(1)  # its last phase: reducing / finishing round 1
    assert float(m.group(3)) <= 15  # the survivor's own bound: next collective fails, heartbeat 5 s at most
    assert "[p0] grokviz study: error: study round 2/7: process 0 could not reduce" in p.stdout, p.stdout[-2000:]
    assert store.read(spec.progress, store.PROGRESS_FORMAT)[0]["rounds_done"] == 1

    # resumed with 2 processes, process 0 SIGKILLed between the temporary progress file and its rename
    p, _ = _launch(job, tmp_path, {store.FAULT_ENV: "0:3:write"})
    m = re.search(r"process 0 \(pid \d+\) was killed by SIGKILL while 'study round 4/7: writing progress'.*"
                  r"job stopped ([\d.]+) s after", p.stderr)
    assert p.returncode == 1 and m, p.stderr
    assert float(m.group(1)) <= GRACE + 2.5  # the launcher's bound: grace + 2 s (+ polling)
    assert store.read(spec.progress, store.PROGRESS_FORMAT)[0]["rounds_done"] == 3  # the old file survived
    assert not spec.output.exists()

    # resumed in this (single) process: same results as the uninterrupted run
    res = study.run(spec, progress=False)
    assert res.same_as(one_process) and study.load(spec.output).same_as(one_process)


def test_never_joining_process_fails_within_join_timeout(tmp_path):
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "grokviz.cli", "launch", "-n", "2", "--join-timeout", "2", "--",
                        sys.executable, "-c", "import time; time.sleep(60)"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 1 and time.monotonic() - t < 20
    assert "did not join the job within 2 s" in p.stderr and "p0:" in p.stderr and "p1:" in p.stderr, p.stderr


def test_initialize_single_process_and_argument_checks(monkeypatch):
    for k in (dist.ENV_COORDINATOR, dist.ENV_NUM, dist.ENV_ID):
        monkeypatch.delenv(k, raising=False)
    info = dist.initialize()  # nothing to detect here: a single-process run
    assert (info.process_id, info.num_processes, info.coordinator) == (0, 1, None)
    with pytest.raises(ValueError, match="give all of"):
        dist.initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match="process_id must be in"):
        dist.initialize("127.0.0.1:1234", 2, 5)
    assert dist.sum_exact([2**40, 3]).tolist() == [2**40, 3]
    with pytest.raises(ValueError, match="integer counts"):
        dist.sum_exact([0.5])


def test_launch_argument_errors():
    from grokviz.distributed.launch import launch

    with pytest.raises(ValueError, match="no command"):
        launch([], 2)
    with pytest.raises(ValueError, match=">= 1"):
        launch(["true"], 0)


def test_results_differ_from_a_foreign_spec(tmp_path, one_process):
    spec = dataclasses.replace(study.load_spec(_spec_copy(tmp_path)), batches_per_round=2)
    assert study.prepare(spec).fingerprint != one_process.meta["fingerprint"]


def test_inspect_plan_hosts_x_devices(capsys):
    from grokviz.cli import main

    assert main(["inspect", "--plan", "grok-1", "--hosts", "2", "--devices", "8", "--dtype", "int8"]) == 0
    out = capsys.readouterr().out
    assert "mesh (data, model) = (2, 8) (16 devices)" in out and "hosts x devices: 2 x 8" in out
    per_dev = float(re.search(r"parameter bytes per device ([\d.]+) GB", out).group(1))
    per_host = float(re.search(r"per host ([\d.]+) GB", out).group(1))
    read, total = map(float, re.search(r"each host reads ([\d.]+) GB of the ([\d.]+) GB", out).groups())
    assert abs(per_host - 8 * per_dev) < 0.05 and 0.49 * total < read < 0.51 * total
    assert main(["inspect", "--plan", "grok-1", "--hosts", "2", "--mesh", "3x8"]) == 1
    assert "multiple of the number of hosts" in capsys.readouterr().err

#!/usr/bin/env python3
"""Routing-study throughput: ``grokviz study`` on the tiny model with 1 and 2 processes (one core each, via
``grokviz launch --cpus-per-process 1``) against the same statistics gathered with Hugging Face + forward hooks.

    bash scripts/env.sh .venv/bin/python bench/bench_study.py [--docs 96] [--hf-python /work/bench-venv/bin/python]

A third grokviz row runs the same spec with ``mesh = [1, 2]``: the model's model axis over both processes, each
reading only its shards (``grokviz.distributed.sharded``), every batch run by both together.

Data: ``--docs`` rows of 128 random token ids (seed 0) in one ``.npy`` file, batches of 8 (the study spec's
``files`` dataset), so both sides see the same token batches. grokviz: the bundled tiny model (d_model 128,
4 layers, 4 q / 2 kv heads of 32, 8 experts top-2, expert FFN 176), collecting routing + top_tokens (expert load,
co-activation, consecutive-token counts, first-choice flow, per-(layer, token, expert) counts, entropy / gate mass
/ z-loss / probability sums). HF: ``MixtralForCausalLM`` of the same shapes (random init, fp32, sdpa attention,
``torch.set_num_threads(1)`` pinned to one core), a forward hook on every layer's router (``mlp.gate``) taking its
logits, and the same statistics computed per batch in torch/numpy. Needs torch + transformers in
``--hf-python`` (the bench venv); the HF row is left out with a message when they are missing.

Figures. ``steady tok/s``: real tokens of every round after the first (which holds the compile) over the time
between the first and the last round's end, as process 0 logs them; ``job s``: the whole command, start-up,
model load and compile included. HF: tokens over the time of every batch after the first. The machine must be
quiet for numbers to quote (the other benchmarks' foreign-load filter is not applied here: one job, one figure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BATCH, SEQ, VOCAB = 8, 128, 4096

HF_WORKER = r'''
import json, sys, time
import numpy as np, torch
from transformers import MixtralConfig, MixtralForCausalLM
torch.set_num_threads(1)
ids = np.load(sys.argv[1]); B = int(sys.argv[2])
cfg = MixtralConfig(vocab_size=4096, hidden_size=128, intermediate_size=176, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
                    attn_implementation="sdpa")
torch.manual_seed(0)
model = MixtralForCausalLM(cfg).eval()
L, E, k, V = 4, 8, 2, 4096
logits = {}
for i, layer in enumerate(model.model.layers):
    layer.mlp.gate.register_forward_hook(lambda mod, inp, out, i=i: logits.__setitem__(i, out[0]))
st = dict(load=np.zeros((L, E), np.int64), coact=np.zeros((L, E, E), np.int64), consec=np.zeros((L, 3), np.int64),
          flow=np.zeros((L - 1, E, E), np.int64), tokens=np.zeros((L, V, E), np.int64), entropy=np.zeros(L),
          gate_mass=np.zeros(L), z_loss=np.zeros(L), prob=np.zeros((L, E)), n=0)
times = []
with torch.inference_mode():
    for b in range(0, len(ids), B):
        x = ids[b:b + B]
        t = time.perf_counter()
        model(torch.from_numpy(x))
        first = []
        for l in range(L):
            lg = logits[l].double().reshape(x.shape[0], x.shape[1], E)
            p = torch.softmax(lg, -1)
            w, ex = torch.topk(p, k, -1)
            ex_n, flat = ex.numpy(), ex.reshape(-1, k).numpy()
            st["load"][l] += np.bincount(flat.ravel(), minlength=E)
            oh = np.zeros((flat.shape[0], E), np.int64); np.put_along_axis(oh, flat, 1, 1)
            st["coact"][l] += oh.T @ oh
            a, c = ex_n[:, 1:], ex_n[:, :-1]
            st["consec"][l] += [int((a[..., 0] == c[..., 0]).sum()),
                                int((a[..., :, None] == c[..., None, :]).any(-1).sum()), a.shape[0] * a.shape[1]]
            np.add.at(st["tokens"][l], (np.repeat(x.ravel(), k), flat.ravel()), 1)
            st["entropy"][l] += float(-(p * torch.log(p)).sum(-1).sum())
            st["gate_mass"][l] += float(w.sum())
            st["z_loss"][l] += float((torch.logsumexp(lg, -1) ** 2).sum())
            st["prob"][l] += p.sum((0, 1)).numpy()
            first.append(ex_n[..., 0].ravel())
        for l in range(L - 1):
            np.add.at(st["flow"][l], (first[l], first[l + 1]), 1)
        st["n"] += x.size
        times.append(time.perf_counter() - t)
steady = sum(times[1:])
print("RESULT " + json.dumps({"tokens": int(st["n"]), "steady_tok_s": (st["n"] - ids[:B].size) / steady,
                             "load_total": int(st["load"].sum())}))
'''


def write_data(d: Path, docs: int) -> Path:
    import numpy as np

    ids = np.random.default_rng(0).integers(3, VOCAB, size=(docs, SEQ)).astype(np.int32)
    np.save(d / "ids.npy", ids)
    return d / "ids.npy"


def grokviz_job(d: Path, n: int, rounds: int, mesh: list | None = None) -> dict:
    nb = len(__import__("numpy").load(d / "ids.npy")) // BATCH
    tag = f"{n}{'_mesh' if mesh else ''}"
    spec = d / f"study_{tag}.json"
    spec.write_text(json.dumps({"model": "tiny", "output": str(d / f"res_{tag}.npz"), "batch_size": BATCH,
                                "max_len": SEQ, "batches_per_round": max(nb // rounds, 1),
                                "dataset": {"files": [str(d / "ids.npy")]}, **({"mesh": mesh} if mesh else {})}))
    cmd = [sys.executable, "-m", "grokviz.cli", "launch", "-n", str(n), "--cpus-per-process", "1", "--",
           "grokviz", "study", str(spec)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    job = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"grokviz study failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rounds_done = [(int(b), float(s)) for b, s in re.findall(r"\((\d+)/\d+ batches, ([\d.]+) s\)", p.stdout)]
    tokens = int(re.search(r"([\d,]+) tokens; wrote", p.stdout).group(1).replace(",", ""))
    if len(rounds_done) < 2:
        raise SystemExit(f"grokviz study logged {len(rounds_done)} round(s); give more --docs or --rounds")
    (b0, t0), (b1, t1) = rounds_done[0], rounds_done[-1]
    per_batch = tokens / b1
    return {"tokens": tokens, "steady_tok_s": (b1 - b0) * per_batch / (t1 - t0), "job_s": job,
            "results": d / f"res_{tag}.npz"}


def gemm_gflops() -> float:
    """The harness's fp32 2048^3 GEMM in this process (median of 5), for the CPU line."""
    import numpy as np

    f = H.gemm_ref_fn("jax")
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return f.flop / float(np.median(ts)) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=96, help="rows of 128 tokens (multiple of 8)")
    ap.add_argument("--rounds", type=int, default=6, help="progress rounds per job")
    ap.add_argument("--hf-python", default="/work/bench-venv/bin/python")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        d = Path(tmp)
        write_data(d, args.docs)
        for n in (1, 2):
            r = grokviz_job(d, n, args.rounds)
            rows.append((f"grokviz study, {n} process{'es' if n > 1 else ''} x 1 core", r))
        r = grokviz_job(d, 2, args.rounds, mesh=[1, 2])  # the model over both processes, read shard by shard
        rows.append(("grokviz study, 2 processes, mesh [1, 2]", r))
        from grokviz import study

        ref = study.load(rows[0][1]["results"])
        same = [study.load(r["results"]).same_as(ref) for _, r in rows[1:]]
        counts = study.load(rows[2][1]["results"]).routing.load
        print(f"2 processes == 1 process bit for bit: {same[0]}; mesh [1, 2] counts == 1 process: "
              f"{bool((counts == ref.routing.load).all())}")
        if Path(args.hf_python).exists():
            cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), args.hf_python, "-c", HF_WORKER,
                   str(d / "ids.npy"), str(BATCH)]
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode == 0 and "RESULT " in p.stdout:
                r = json.loads(p.stdout.split("RESULT ", 1)[1])
                r["job_s"] = time.perf_counter() - t
                rows.append(("HF Mixtral + router hooks, 1 core", r))
            else:
                print(f"HF row left out: {p.stderr.strip().splitlines()[-1:]}")
        else:
            print(f"HF row left out: no {args.hf_python}")
    load = os.getloadavg()[0]
    print(H.cpu_line(gemm_gflops()))
    print(f"routing study, tiny config, {args.docs} x {SEQ} tokens, batch {BATCH}; load average {load:.1f} on "
          f"{os.cpu_count()} cores (quiet machine needed for quotable numbers)")
    print(f"{'':44}{'tokens':>9}{'steady tok/s':>15}{'job s':>9}")
    for name, r in rows:
        print(f"{name:44}{r['tokens']:>9,}{r['steady_tok_s']:>15,.0f}{r['job_s']:>9.1f}")


if __name__ == "__main__":
    main()

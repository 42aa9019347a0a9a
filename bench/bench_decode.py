#!/usr/bin/env python3
"""Decode throughput: grokviz ``model.generate`` (plain, and with routing captured every step) vs Hugging Face
``generate`` on the same Mixtral weights, batch 1 and 4, 256-token prompt, 128 new tokens, greedy; one worker
process per framework, interleaved; each decode step also as a multiple of its memory floor.

The lead's commands (a quiet machine; about 10 minutes):

    bash scripts/env.sh /work/bench-venv/bin/python bench/bench_decode.py --json /tmp/bench_decode.json
    /work/bench-venv/bin/python bench/bench_decode.py --quick          # smoke test, < 1 min

Config of record (bench/README.md, shared/bench-peers/_common.py): vocab 8192, d_model 256, 4 layers, 8 q / 2
kv heads of 32, 8 experts top-2, expert FFN 512, fp32. The weights are transformers' init (seed 0) of
MixtralForCausalLM at that size, saved with ``save_pretrained`` and read by ``gv.load`` (family mixtral), so
both generate from the same numbers and greedy continuations are compared token for token.

Modes, per batch size, each at ``max_new_tokens`` = N (128) and = 1:
  grokviz:plain      model.generate(ids, N, temperature=0, stop=())          (one compiled program; compile apart)
  grokviz:routing    + capture="routing" (router logits/probs, top-k experts/weights, expert load every step)
  hf:plain           model.generate(ids, max_new_tokens=N, do_sample=False), sdpa, eos_token_id None
  hf:router          + output_router_logits=True (passed to every forward; generate does not keep them)
  _gemm_2048, _copy  a jax 2048^3 fp32 GEMM (the CPU line) and a 256 MiB numpy copy (memory bandwidth)

One decode step = (t(N) - t(1)) / (N - 1): both runs do the prefill and sample the first token; the N run adds
N - 1 decode steps (with routing captured, both also run the model on the last token, so the difference holds).
Decode tokens/s = batch / step time; end-to-end tokens/s = batch * N / t(N).

Memory floor of one step = bytes it must read / copy bandwidth. Bytes: every weight but the experts (q/k/v/o,
norms, router, lm_head; embedding rows), the experts that the batch's tokens select in each layer (the mean
number of distinct experts per layer and step, measured from grokviz's captured routing), and the fp32 KV cache
of the filled positions (prompt + the mean generated prefix). Copy bandwidth = 2 x bytes / time of the numpy copy
(read + write, STREAM's convention), timed interleaved with the modes. The column "× floor, all experts" counts
every expert's weights instead: grokviz's ``experts_sparse`` runs its main pass as one batched matmul over all
E experts with ``min(8, batch)`` capacity rows each (``grokviz/model/moe.py``: ``sparse_capacity``), so at decode
every step streams every expert's weights (batch 1, top-2 of 8: 4x the expert bytes the selected experts need;
HF's grouped_mm reads only the experts hit). That column is the floor of the program as written.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
import bench_peers as BP  # noqa: E402

RECORD = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2)
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
COPY_BYTES = 256 << 20


def copy_ref_fn(nbytes: int = COPY_BYTES):
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)

    def f():
        np.copyto(dst, src)
    f.nbytes = nbytes
    return f


class DecGrokvizWorker(BP.GrokvizWorker):
    def load(self, folder: str) -> dict:
        import jax.numpy as jnp

        import grokviz as gv

        self.model = gv.load(folder, dtype=jnp.float32, progress=False, tokenizer=False)
        return {"family": self.model.cfg.family}

    def setup(self, spec: dict) -> dict:
        import numpy as np

        from grokviz.generation import loop

        self.fns = {}
        gc.unfreeze()
        gc.collect()
        ids = H.tokens(spec["batch"], spec["prompt"], self.model.cfg.vocab_size)
        info, out = {}, {}
        for mode, capture in (("plain", None), ("routing", "routing")):
            for n in (spec["new"], 1):
                def run(n=n, capture=capture):
                    return self.model.generate(ids, n, temperature=0.0, stop=(), capture=capture)
                t0 = time.perf_counter()
                res = run()
                name = f"grokviz:{mode}@{n}"
                info[name] = {"compile_s": round(time.perf_counter() - t0, 2)}
                self.fns[name] = run
                if n == spec["new"]:
                    out[mode] = res
        top = out["routing"].steps["blocks.moe.top_k_experts"]  # [step, layer, batch, k]
        distinct = np.mean([[len(np.unique(top[s, la])) for la in range(top.shape[1])] for s in range(top.shape[0])])
        if self.ref is None:
            self.ref, self.copy = H.gemm_ref_fn("jax"), copy_ref_fn()
        self.fns[H.GEMM_REF], self.fns["_copy"] = self.ref, self.copy
        self.traces = loop.TRACE_COUNT[0]
        self._freeze()
        return {"info": info, "names": list(self.fns), "gemm_flop": self.ref.flop, "copy_bytes": self.copy.nbytes,
                "tokens": out["plain"].tokens.tolist(), "routing_tokens_equal": bool(
                    (out["plain"].tokens == out["routing"].tokens).all()), "distinct_experts": float(distinct)}

    def traces_since_setup(self, _=None) -> int:
        from grokviz.generation import loop

        return loop.TRACE_COUNT[0] - self.traces


class DecHFWorker(BP._WorkerBase):
    def __init__(self):
        self.malloc = os.environ.get("GLIBC_TUNABLES", "")
        import torch
        import transformers

        self.torch, self.transformers, self.fns = torch, transformers, {}

    def info(self) -> dict:
        t = self.torch
        return {"pid": os.getpid(), "torch": t.__version__, "transformers": self.transformers.__version__,
                "torch_threads": t.get_num_threads(), "cpu_capability": t.backends.cpu.get_cpu_capability(),
                "malloc": self.malloc, "jax_imported": "jax" in sys.modules}

    def build(self, spec: dict) -> dict:
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(**spec["config"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                            sliding_window=None, attn_implementation="sdpa")
        self.torch.manual_seed(H.SEED)
        self.model = MixtralForCausalLM(cfg).eval()
        self.model.generation_config.eos_token_id = None  # always N tokens, as grokviz's stop=()
        self.model.generation_config.pad_token_id = 0
        self.model.save_pretrained(spec["folder"])
        return {"experts_implementation": getattr(self.model.config, "_experts_implementation", None)}

    def setup(self, spec: dict) -> dict:
        torch = self.torch
        gc.unfreeze()
        ids = torch.from_numpy(H.tokens(spec["batch"], spec["prompt"], self.model.config.vocab_size).astype("int64"))
        mask = torch.ones_like(ids)
        self.fns, tokens = {}, None
        for mode, kw in (("plain", {}), ("router", {"output_router_logits": True})):
            for n in (spec["new"], 1):
                def run(n=n, kw=kw):
                    with torch.inference_mode():
                        return self.model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
                res = run()
                if mode == "plain" and n == spec["new"]:
                    tokens = res[:, ids.shape[1]:].tolist()
                self.fns[f"hf:{mode}@{n}"] = run
        self._freeze()
        return {"info": {}, "names": list(self.fns), "tokens": tokens}


BP.WORKERS.update(dec_grokviz=DecGrokvizWorker, dec_hf=DecHFWorker)  # also runs in the spawned workers


def step_bytes(c: dict, batch: int, context: float, distinct: float) -> float:
    D, V, L, E, F = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["num_local_experts"], \
        c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = 2 * D + D * (q + 2 * kv) + q * D + D * E + distinct * 3 * D * F
    weights = batch * D + L * per_layer + D + V * D
    cache = L * batch * context * 2 * kv
    return 4.0 * (weights + cache)


COLS = [("batch", "batch"), ("mode", "mode"), ("step_ms", "decode step ms"), ("tok_s", "decode tok/s"),
        ("x_plain", "× own plain"), ("x_hf", "× HF plain"), ("x_floor", "× memory floor"),
        ("x_floor_all", "× floor, all experts"),
        ("e2e_ms", "generate ms (N)"), ("e2e_tok_s", "end-to-end tok/s"), ("compile_s", "compile s")]


def main():
    p = H.base_argparser(__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes, 1 rep: a smoke test of the whole script")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--pause", type=float, default=BP.PAUSE_WORKERS)
    args = p.parse_args()
    config = RECORD
    if args.quick:
        config, args.prompt, args.new, args.batches = QUICK, 16, 8, "1,2"
        args.warmup, args.reps, args.max_foreign = 1, 1, 1.0
        H._WAIT_BUDGET[0] = 0.0
    workers = BP.start_workers(("dec_hf", "dec_grokviz"), "bench_decode")
    if workers is None:
        return
    tmp = tempfile.mkdtemp(prefix="bench_decode_")
    gz, hf = workers["dec_grokviz"], workers["dec_hf"]
    rows, metas, N = [], {}, args.new
    try:
        built = hf.call("build", {"config": config, "folder": os.path.join(tmp, "mixtral")})
        gz.call("load", os.path.join(tmp, "mixtral"))
        print(f"# grokviz bench_decode  {H.env_info()}\n# grokviz worker {gz.info}\n# HF worker {hf.info} {built}\n"
              f"# config {config}; prompt {args.prompt}, new tokens {N}, greedy")
        for b in (int(x) for x in args.batches.split(",")):
            spec = {"batch": b, "prompt": args.prompt, "new": N}
            g, h = gz.call("setup", spec), hf.call("setup", spec)
            same = g["tokens"] == h["tokens"]
            fns = {n: w.runner(n) for w, r in ((gz, g), (hf, h)) for n in r["names"] if not n.startswith("_")}
            fns[H.GEMM_REF], fns["_copy"] = gz.runner(H.GEMM_REF), gz.runner("_copy")
            times, meta = H.bench_interleaved(fns, args.warmup, args.reps, args.max_foreign, verbose=args.verbose,
                                              pause_s=args.pause, pids=[gz.pid, hf.pid])
            med = {n: H.summarize(t)["median_ms"] for n, t in times.items()}
            bw = 2 * g["copy_bytes"] / (med["_copy"] / 1e3)
            context = args.prompt + (N - 1) / 2
            floor_ms = step_bytes(config, b, context, g["distinct_experts"]) / bw * 1e3
            floor_all_ms = step_bytes(config, b, context, config["num_local_experts"]) / bw * 1e3
            step = {m: (med[f"{m}@{N}"] - med[f"{m}@1"]) / (N - 1)
                    for m in ("grokviz:plain", "grokviz:routing", "hf:plain", "hf:router")}
            for m, s in step.items():
                own = "grokviz:plain" if m.startswith("grokviz") else "hf:plain"
                rows.append({"batch": b, "mode": m, "step_ms": round(s, 3), "tok_s": round(b / s * 1e3, 1),
                             "x_plain": round(s / step[own], 2), "x_hf": round(s / step["hf:plain"], 2),
                             "x_floor": round(s / floor_ms, 2), "x_floor_all": round(s / floor_all_ms, 2),
                             "e2e_ms": med[f"{m}@{N}"],
                             "e2e_tok_s": round(b * N / med[f"{m}@{N}"] * 1e3, 1),
                             "compile_s": g["info"].get(f"{m}@{N}", {}).get("compile_s")})
            meta.update(gemm_gflops=round(H.gemm_gflops(times[H.GEMM_REF], g["gemm_flop"]), 1),
                        copy_GBps=round(bw / 1e9, 2), floor_ms=round(floor_ms, 4),
                        floor_all_experts_ms=round(floor_all_ms, 4),
                        distinct_experts_per_layer=round(g["distinct_experts"], 2), greedy_tokens_equal_hf=same,
                        routing_capture_tokens_equal_plain=g["routing_tokens_equal"],
                        grokviz_retraces_during_timing=gz.call("traces_since_setup"), medians_ms=med)
            metas[b] = meta
            print(f"# batch {b}: {meta}", flush=True)
        m0 = metas[next(iter(metas))]
        print(f"\n{H.cpu_line(m0['gemm_gflops'])}; copy bandwidth {m0['copy_GBps']} GB/s (numpy, 256 MiB, this "
              f"run); torch {hf.info['torch']} ({hf.info['cpu_capability']}, {hf.info['torch_threads']} threads)\n")
        print(H.markdown_table(rows, COLS))
        H.write_json(args.json, {"meta": metas, "rows": rows, "env": H.env_info(), "cpu": H.cpu_info(),
                                 "config": config, "workers": {"grokviz": gz.info, "hf": hf.info}})
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

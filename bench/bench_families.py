#!/usr/bin/env python3
"""Granite-MoE at granite-3.0-1b-a400m's size: grokviz vs transformers' GraniteMoeForCausalLM on the same weights,
fp32 and bf16 forward at 1x512, one worker process per framework, interleaved; and the load time and peak RSS of
``gv.load`` reading a 2.03 GB sharded bf16 checkpoint in a fresh process.

The lead's commands (a quiet machine; about 10-15 minutes, ~14 GB of RAM at the peak, ~7 GB of /tmp):

    bash scripts/env.sh /work/bench-venv/bin/python bench/bench_families.py --json /tmp/bench_families.json
    bash scripts/env.sh /work/bench-venv/bin/python bench/bench_families.py --load-only     # the load row alone
    /work/bench-venv/bin/python bench/bench_families.py --quick                            # smoke test, < 1 min

(``/work/bench-venv`` holds torch 2.13 + transformers 5.24 and an editable grokviz; the load measurement needs
neither torch nor transformers: ``--load-only`` also runs with ``.venv/bin/python``.)

Config: ``_hfckpt.GRANITE_1B`` (granite-3.0-1b-a400m's config.json, each value listed there): 24 layers, d_model
1024, 16 q / 8 kv heads of 64, 32 experts top-8, expert FFN 512, vocab 49155, tied embeddings, Granite's
multipliers. Random weights: transformers' own init (``torch.manual_seed(0)``) of GraniteMoeForCausalLM, saved
with ``save_pretrained`` to a temporary folder that grokviz reads with ``gv.load`` (its Hugging Face loader), so
both sides hold the same numbers; the logits of both on the same tokens are compared (max |diff| / max |logit|)
before anything is timed. bf16: both models cast from their fp32 weights (``model.to(torch.bfloat16)``; grokviz
``astype``), compared against each other and timed in a second interleaved run.

Modes (1x512 tokens from ``numpy.random.default_rng(0)`` in [1, vocab), no padding), timed in one interleaved run
per dtype (the method of ``bench_peers.py``: one worker process per framework, a coordinator that imports neither,
the same random round-robin order, the foreign-load filter counting both workers' CPU time as ours):
  grokviz:plain     jitted forward, logits only (compile apart)
  grokviz:routing   + grokviz.hooks.ROUTING_HOOKS (router logits/probs, top-k experts/weights, expert load)
  hf:sdpa_plain     model(ids, use_cache=False), attn_implementation="sdpa"
  hf:sdpa_router    + output_router_logits=True
  _gemm_2048        a jitted 2048^3 fp32 matmul in the grokviz worker: the CPU line's GEMM rate and the fp32 floor

Load: a granite-1b-wide checkpoint with 18 layers (``_hfckpt.GRANITE_LOAD``: 1.01 G parameters, 2.03 GB in
bf16, 5 shards + ``model.safetensors.index.json``, written by ``_hfckpt.write_hf_folder``) is read by
``gv.load(folder)`` in a fresh interpreter (``--mem-only load@FOLDER``); peak RSS is that process's VmHWM, which
includes the interpreter with jax and grokviz imported (the ``base`` column). Target: peak <= 1.2x the weights.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
import _hfckpt as C  # noqa: E402
import bench_peers as BP  # noqa: E402


class FamGrokvizWorker(BP.GrokvizWorker):
    """grokviz on a Hugging Face folder; never imports torch."""

    def load(self, folder: str) -> dict:
        import jax.numpy as jnp

        import grokviz as gv

        t0 = time.perf_counter()
        self.model = gv.load(folder, dtype=jnp.float32, progress=False, tokenizer=False)
        return {"load_s": round(time.perf_counter() - t0, 2)}

    def setup(self, spec: dict) -> dict:
        import functools

        import jax
        import jax.numpy as jnp
        import numpy as np
        from bench_forward import capture_of

        from grokviz.model import forward

        self.fns = {}
        gc.unfreeze()
        gc.collect()
        cfg = self.model.cfg
        if spec["dtype"] == "bf16":
            self.model.params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), self.model.params)
            gc.collect()
        params = self.model.params
        toks = jnp.asarray(H.tokens(spec["batch"], spec["seq"], cfg.vocab_size))
        info = {}
        for m in ("plain", "routing"):
            fn = jax.jit(functools.partial(forward, cfg=cfg, capture=capture_of(m)))
            compiled, t_lower, t_compile, t_first = H.compile_timed(fn, params, toks)
            if m == "plain":
                np.save(spec["logits_path"], np.asarray(compiled(params, toks).logits, np.float32))

            def run(compiled=compiled):
                return H.block(compiled(params, toks))

            self.fns[f"grokviz:{m}"] = run
            info[f"grokviz:{m}"] = {"compile_s": round(t_lower + t_compile, 2)}
        if self.ref is None:
            self.ref = H.gemm_ref_fn("jax")
        self.fns[H.GEMM_REF] = self.ref
        self._freeze()
        return {"info": info, "names": list(self.fns), "gemm_flop": self.ref.flop,
                "flops_total": H.forward_flops(cfg, spec["batch"], spec["seq"])["total"]}


class FamHFWorker(BP._WorkerBase):
    """transformers' GraniteMoeForCausalLM (sdpa); never imports jax."""

    def __init__(self):
        self.malloc = os.environ.get("GLIBC_TUNABLES", "")
        import torch
        import transformers

        self.torch, self.transformers, self.fns, self.model = torch, transformers, {}, None

    def info(self) -> dict:
        t = self.torch
        return {"pid": os.getpid(), "torch": t.__version__, "transformers": self.transformers.__version__,
                "torch_threads": t.get_num_threads(), "cpu_capability": t.backends.cpu.get_cpu_capability(),
                "malloc": self.malloc, "jax_imported": "jax" in sys.modules}

    def build(self, spec: dict) -> dict:
        """Random-init the model (seed 0) and save it to spec["folder"] (fp32 safetensors)."""
        from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

        kw = {k: v for k, v in spec["config"].items() if k not in ("model_type", "architectures")}
        cfg = GraniteMoeConfig(**kw, attn_implementation="sdpa")
        self.torch.manual_seed(H.SEED)
        self.model = GraniteMoeForCausalLM(cfg).eval()
        t0 = time.perf_counter()
        self.model.save_pretrained(spec["folder"])
        return {"save_s": round(time.perf_counter() - t0, 2),
                "experts_implementation": getattr(self.model.config, "_experts_implementation", None)}

    def setup(self, spec: dict) -> dict:
        import numpy as np

        torch = self.torch
        self.fns = {}
        gc.unfreeze()
        if spec["dtype"] == "bf16":
            self.model.to(torch.bfloat16)
        ids = torch.from_numpy(H.tokens(spec["batch"], spec["seq"], self.model.config.vocab_size).astype("int64"))
        with torch.inference_mode():
            np.save(spec["logits_path"], self.model(ids, use_cache=False).logits.float().numpy())

        def hf_run(**kw):
            def f():
                with torch.inference_mode():
                    return self.model(ids, use_cache=False, **kw)
            return f

        self.fns = {"hf:sdpa_plain": hf_run(), "hf:sdpa_router": hf_run(output_router_logits=True)}
        self._freeze()
        return {"info": {}, "names": list(self.fns)}


BP.WORKERS.update(fam_grokviz=FamGrokvizWorker, fam_hf=FamHFWorker)  # also runs in the spawned workers

COLS = [("dtype", "dtype"), ("mode", "mode"), ("median_ms", "median ms"), ("p25_ms", "p25"), ("p75_ms", "p75"),
        ("x_hf_sdpa", "× HF sdpa plain"), ("x_plain", "× own plain"), ("x_floor", "× fp32 floor"),
        ("compile_s", "compile s")]


def compare_logits(a_path: str, b_path: str) -> dict:
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    return {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(b).max()),
            "rel": float(np.abs(a - b).max() / np.abs(b).max()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}


def run_forward(args, config: dict, batch: int, seq: int) -> None:
    workers = BP.start_workers(("fam_hf", "fam_grokviz"), "bench_families forward")
    if workers is None:
        return
    tmp = tempfile.mkdtemp(prefix="bench_families_")
    gz, hf = workers["fam_grokviz"], workers["fam_hf"]
    rows, metas = [], {}
    try:
        folder = os.path.join(tmp, "granite")
        built = hf.call("build", {"config": config, "folder": folder})
        loaded = gz.call("load", folder)
        print(f"# grokviz bench_families  {H.env_info()}\n# grokviz worker {gz.info}\n# HF worker {hf.info}\n"
              f"# HF save_pretrained {built}; gv.load of that fp32 folder {loaded}; shape {batch}x{seq}")
        for dtype in ("fp32", "bf16"):
            paths = {k: os.path.join(tmp, f"{k}_{dtype}.npy") for k in ("gv", "hf")}
            g = gz.call("setup", {"dtype": dtype, "batch": batch, "seq": seq, "logits_path": paths["gv"]})
            h = hf.call("setup", {"dtype": dtype, "batch": batch, "seq": seq, "logits_path": paths["hf"]})
            agree = compare_logits(paths["gv"], paths["hf"])
            print(f"# {dtype} logits, grokviz vs HF on the same weights: {agree}", flush=True)
            fns = {n: w.runner(n) for w, r in ((gz, g), (hf, h)) for n in r["names"] if n != H.GEMM_REF}
            fns[H.GEMM_REF] = gz.runner(H.GEMM_REF)
            times, meta = H.bench_interleaved(fns, args.warmup, args.reps, args.max_foreign, verbose=args.verbose,
                                              pause_s=args.pause, pids=[gz.pid, hf.pid])
            rate = H.gemm_gflops(times[H.GEMM_REF], g["gemm_flop"])
            floor_ms = g["flops_total"] / (rate * 1e9) * 1e3
            med = {n: H.summarize(t)["median_ms"] for n, t in times.items()}
            for n in times:
                if n == H.GEMM_REF:
                    continue
                own = "grokviz:plain" if n.startswith("grokviz") else "hf:sdpa_plain"
                rows.append({"dtype": dtype, "mode": n, **H.summarize(times[n]), **g["info"].get(n, {}),
                             "x_hf_sdpa": round(med[n] / med["hf:sdpa_plain"], 2),
                             "x_plain": round(med[n] / med[own], 2),
                             "x_floor": round(med[n] / floor_ms, 2) if dtype == "fp32" else None})
            meta.update(gemm_gflops=round(rate, 1), floor_ms=round(floor_ms, 2), logits=agree)
            metas[dtype] = meta
            print(f"# {dtype}: {meta}", flush=True)
        print(f"\n{batch}x{seq}, {H.cpu_line(metas['fp32']['gemm_gflops'])}; torch {hf.info['torch']} "
              f"({hf.info['cpu_capability']}, {hf.info['torch_threads']} threads)\n")
        print(H.markdown_table(rows, COLS))
        H.write_json(args.json, {"meta": metas, "rows": rows, "env": H.env_info(), "cpu": H.cpu_info(),
                                 "workers": {"grokviz": gz.info, "hf": hf.info}, "config": config})
    finally:
        for w in workers.values():
            w.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- load time and peak RSS
def mem_only_load(folder: str) -> None:
    """In a fresh interpreter: gv.load(folder) once; print one JSON line (MB = 10^6 bytes)."""
    import jax
    import jax.numpy as jnp

    import grokviz as gv

    jnp.zeros(1).block_until_ready()
    base = H.rss_mb()
    t0 = time.perf_counter()
    model = gv.load(folder, progress=False, tokenizer=False)
    jax.block_until_ready(jax.tree_util.tree_leaves(model.params))
    load_s = time.perf_counter() - t0
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
    mib = 1 << 20
    peak, after = H.peak_rss_mb() * mib, H.rss_mb() * mib
    print(json.dumps({"weights_MB": round(weights / 1e6, 1), "base_rss_MB": round(base * mib / 1e6, 1),
                      "peak_rss_MB": round(peak / 1e6, 1), "rss_after_MB": round(after / 1e6, 1),
                      "peak_x_weights": round(peak / weights, 3), "load_s": round(load_s, 2),
                      "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}))


def run_load(args, quick: bool) -> None:
    config = dict(C.GRANITE_QUICK, num_hidden_layers=4) if quick else C.GRANITE_LOAD
    folder = args.load_dir or tempfile.mkdtemp(prefix="bench_families_load_")
    made = None
    if not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        t0 = time.perf_counter()
        made = C.write_hf_folder(folder, config, dtype="bfloat16", shards=5)
        made["write_s"] = round(time.perf_counter() - t0, 1)
    try:
        res = H.mem_subprocess(os.path.abspath(__file__), f"load@{folder}")
        res["folder"] = folder
        print(f"# load: written {made}" if made else f"# load: reusing {folder}")
        print(json.dumps(res))
        print(H.markdown_table([res], [("weights_MB", "weights MB"), ("base_rss_MB", "base RSS MB"),
                                       ("peak_rss_MB", "peak RSS MB"), ("peak_x_weights", "peak × weights"),
                                       ("load_s", "load s")]))
        print("# target: peak RSS <= 1.2x the weights" + (" (--quick: sizes too small for the ratio to mean "
                                                            "anything; base RSS dominates)" if quick else ""))
    finally:
        if not args.load_dir:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def main():
    p = H.base_argparser(__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes, 1 rep: a smoke test of the whole script")
    p.add_argument("--load-only", action="store_true", help="only the load time / peak RSS measurement")
    p.add_argument("--no-load", action="store_true", help="skip the load measurement")
    p.add_argument("--load-dir", default="", help="write (or reuse) the load checkpoint here instead of a temp dir")
    p.add_argument("--pause", type=float, default=BP.PAUSE_WORKERS)
    args = p.parse_args()
    if args.mem_only:
        kind, _, folder = args.mem_only.partition("@")
        assert kind == "load", args.mem_only
        return mem_only_load(folder)
    if args.quick:  # a smoke test: no waiting for quiet, every round kept
        args.warmup, args.reps, args.max_foreign = 1, 1, 1.0
        H._WAIT_BUDGET[0] = 0.0
    if not args.load_only:
        if args.quick:
            run_forward(args, C.GRANITE_QUICK, 1, 32)
        else:
            run_forward(args, C.GRANITE_1B, 1, 512)
    if not args.no_load:
        run_load(args, args.quick)


if __name__ == "__main__":
    main()

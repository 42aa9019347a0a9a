#!/usr/bin/env python3
"""grokviz against Hugging Face ``MixtralForCausalLM`` on the same shapes, in the same process, interleaved.

Needs torch + transformers (the ``bench`` extra); skips with a message when they are not importable. Keep
them out of the project venv:

    python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch==2.13.0 transformers -e .
    /work/bench-venv/bin/python bench/bench_peers.py

Both models: vocab 8192, d_model 256, 4 layers, 8 q / 2 kv heads of 32, 8 experts top-2, expert FFN 512,
fp32, CPU, each with its own random init (seed 0). The GEMM work is identical; Grok adds memory-bound
pieces (4 norms per layer, the attention soft cap, GELU gating), Mixtral has 2 norms per layer and SiLU.
Routing differs (different weights), so per-expert loads differ; both run only the 2 selected experts.

Modes, timed round-robin in a random order each round (+ a jax 2048^3 GEMM for the floor):
  grokviz:plain, grokviz:routing, grokviz:routing_attn   (jitted, compile apart)
  hf:sdpa_plain                                           model(ids) with attn_implementation="sdpa"
  hf:eager_router_attn                                    output_router_logits + output_attentions (eager)
torch (OpenMP) and XLA keep separate thread pools; a short pause between modes lets spinning threads go idle.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402


def hf_model(attn: str, seed: int = H.SEED):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.02,
                        tie_word_embeddings=False, sliding_window=None, attn_implementation=attn)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def main():
    p = H.base_argparser(__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(H.SHAPES))
    p.add_argument("--pause", type=float, default=0.05, help="seconds of sleep before each timed call")
    args = p.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"# bench_peers skipped: torch/transformers not importable ({e}); see the module docstring")
        return
    import jax

    from bench_forward import make_fn, setup

    print(f"# grokviz bench_peers  {H.env_info() | {'torch_threads': torch.get_num_threads()}}")
    hf = {"sdpa": hf_model("sdpa"), "eager": hf_model("eager")}
    print(f"# HF experts implementation: {hf['sdpa'].config._experts_implementation}")
    all_rows, metas = [], {}
    for shape in args.shapes.split(","):
        cfg, params, toks = setup(shape)
        b, t = H.SHAPES[shape]
        ids = torch.from_numpy(H.tokens(b, t).astype("int64"))
        fns, info = {}, {}
        for m in ("plain", "routing", "routing_attn"):
            fns[f"grokviz:{m}"], info[f"grokviz:{m}"] = make_fn(cfg, params, toks, m)

        def hf_run(model, **kw):
            def f():
                with torch.inference_mode():
                    return model(ids, use_cache=False, **kw)
            return f

        fns["hf:sdpa_plain"] = hf_run(hf["sdpa"])
        fns["hf:eager_router_attn"] = hf_run(hf["eager"], output_router_logits=True, output_attentions=True)
        ref = H.gemm_ref_fn("jax")
        fns[H.GEMM_REF] = ref
        times, meta = H.bench_interleaved(fns, args.warmup, args.reps, args.max_foreign, verbose=args.verbose,
                                          pause_s=args.pause)
        rate = H.gemm_gflops(times[H.GEMM_REF], ref.flop)
        floor_ms = H.forward_flops(cfg, b, t)["total"] / (rate * 1e9) * 1e3
        med = {n: H.summarize(times[n])["median_ms"] for n in fns}
        for n in fns:
            if n == H.GEMM_REF:
                continue
            s = H.summarize(times[n])
            all_rows.append({"shape": shape, "mode": n, **s, **info.get(n, {}),
                             "x_hf_sdpa": round(s["median_ms"] / med["hf:sdpa_plain"], 2),
                             "x_floor": round(s["median_ms"] / floor_ms, 2)})
        meta.update(gemm_gflops=round(rate, 1), floor_ms=round(floor_ms, 2))
        metas[shape] = meta
        print(f"# {shape}: {meta}", flush=True)
    print(H.markdown_table(all_rows, [("shape", "shape"), ("mode", "mode"), ("median_ms", "median ms"),
                                      ("p25_ms", "p25"), ("p75_ms", "p75"), ("x_hf_sdpa", "× HF sdpa plain"),
                                      ("x_floor", "× floor"), ("compile_s", "compile s")]))
    print(f"# torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, jax {jax.__version__}; loadavg end "
          f"{os.getloadavg()}")
    H.write_json(args.json, {"meta": metas, "rows": all_rows, "env": H.env_info()})


if __name__ == "__main__":
    main()

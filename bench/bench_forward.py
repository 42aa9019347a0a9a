#!/usr/bin/env python3
"""grokviz forward pass on the configuration of record: plain vs capture modes vs the machine floor.

Config: vocab 8192, d_model 256, 4 layers, 8 q / 2 kv heads of 32, 8 experts top-2, expert FFN 512, fp32,
``init_params(key(0))``; tokens from ``numpy.random.default_rng(0)`` (no padding). Shapes 4x256 and 1x1024.

Modes (each its own jitted program; compile time reported apart):
  plain          logits only
  routing        + grokviz.hooks.ROUTING_HOOKS (router logits/probs, top-k experts/weights, expert load)
  routing_attn   + blocks.attn.pattern of every layer
  everything     capture="*" (every registered hook)
  _gemm_2048     a jitted 2048^3 fp32 matmul, timed interleaved: its rate defines the floor

floor = forward matmul FLOPs (q/k/v/o, causal QK^T + PV, router, the k selected experts, unembedding) / that
rate. Each mode is reported as a multiple of the floor and of plain (same process, same rounds).

Run:  bash scripts/env.sh .venv/bin/python bench/bench_forward.py [--shapes b4_t256,b1_t1024] [--reps 9] [--mem]
      [--json f]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

MODES = ("plain", "routing", "routing_attn", "everything")


def capture_of(mode: str) -> frozenset:
    from grokviz.hooks import ROUTING_HOOKS, select

    return {"plain": frozenset(), "routing": select(list(ROUTING_HOOKS)),
            "routing_attn": select(list(ROUTING_HOOKS) + ["blocks.attn.pattern"]),
            "everything": select("*")}[mode]


def make_fn(cfg, params, toks, mode: str, expert_impl: str = "sparse"):
    """(callable that blocks, compile info) for one mode."""
    import functools

    import jax

    from grokviz.model import forward

    fn = jax.jit(functools.partial(forward, cfg=cfg, capture=capture_of(mode), expert_impl=expert_impl))
    compiled, t_lower, t_compile, t_first = H.compile_timed(fn, params, toks)

    def run():
        return H.block(compiled(params, toks))

    return run, {"lower_s": round(t_lower, 3), "compile_s": round(t_compile, 3), "first_call_s": round(t_first, 3)}


def setup(shape: str, num_layers: int = 4):
    import jax
    import jax.numpy as jnp

    import grokviz as gv

    cfg = H.config_of_record(num_layers)
    params = gv.init_params(cfg, jax.random.key(H.SEED))
    b, t = H.SHAPES[shape]
    toks = jnp.asarray(H.tokens(b, t, cfg.vocab_size))
    return cfg, params, toks


def mem_only(spec: str) -> None:
    import json

    mode, shape = spec.split("@")
    cfg, params, toks = setup(shape)
    H.reset_peak_rss()
    run, info = make_fn(cfg, params, toks, mode)
    compile_peak = H.peak_rss_mb()
    res = H.measure_peak(run)
    res["compile_peak_rss_mb"] = round(compile_peak, 1)
    print(json.dumps(res))


def time_shape(shape: str, args, modes=MODES, extra_fns=None) -> tuple[list[dict], dict]:
    cfg, params, toks = setup(shape)
    fns, info = {}, {}
    for m in modes:
        fns[m], info[m] = make_fn(cfg, params, toks, m)
    fns.update(extra_fns or {})
    ref = H.gemm_ref_fn("jax")
    fns[H.GEMM_REF] = ref
    times, meta = H.bench_interleaved(fns, args.warmup, args.reps, args.max_foreign, verbose=args.verbose)
    rate = H.gemm_gflops(times[H.GEMM_REF], ref.flop)
    b, t = H.SHAPES[shape]
    flops = H.forward_flops(cfg, b, t)
    floor_ms = flops["total"] / (rate * 1e9) * 1e3
    plain = H.summarize(times["plain"])["median_ms"]
    rows = []
    for m in [*modes, *(extra_fns or {})]:
        s = H.summarize(times[m])
        r = {"shape": shape, "mode": m, **s, **info.get(m, {}), "x_plain": round(s["median_ms"] / plain, 3),
             "x_floor": round(s["median_ms"] / floor_ms, 2), "floor_ms": round(floor_ms, 1),
             "gemm_gflops": round(rate, 1), "gflop": round(flops["total"] / 1e9, 3)}
        if args.mem and m in modes:
            r.update(H.mem_subprocess(os.path.abspath(__file__), f"{m}@{shape}"))
        rows.append(r)
    meta.update(gemm_gflops=round(rate, 1), floor_ms=round(floor_ms, 2), flops=flops)
    return rows, meta


COLS = [("shape", "shape"), ("mode", "mode"), ("median_ms", "median ms"), ("p25_ms", "p25"), ("p75_ms", "p75"),
        ("x_plain", "× plain"), ("x_floor", "× floor"), ("compile_s", "compile s"), ("first_call_s", "1st call s"),
        ("peak_rss_mb", "peak RSS MiB"), ("delta_rss_mb", "Δ fwd MiB")]


def main():
    p = H.base_argparser(__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(H.SHAPES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mem", action="store_true", help="peak RSS per mode in a fresh subprocess")
    args = p.parse_args()
    if args.mem_only:
        return mem_only(args.mem_only)
    import jax

    print(f"# grokviz bench_forward  {H.env_info() | {'jax': jax.__version__}}")
    all_rows, metas = [], {}
    for shape in args.shapes.split(","):
        rows, meta = time_shape(shape, args, tuple(args.modes.split(",")))
        all_rows += rows
        metas[shape] = meta
        print(f"# {shape}: floor {meta['floor_ms']} ms ({meta['flops']['total'] / 1e9:.2f} GFLOP at "
              f"{meta['gemm_gflops']} GFLOP/s, jax 2048^3 GEMM interleaved); rounds kept {meta['rounds_kept']}, "
              f"dropped {meta['rounds_dropped']}, filled-contended {meta['rounds_filled_contended']}, "
              f"foreign load kept mean/max {meta['foreign_load_kept_mean']}/{meta['foreign_load_kept_max']}, "
              f"waited {meta['waited_s']} s", flush=True)
    print(H.markdown_table(all_rows, COLS))
    print(f"# loadavg end {os.getloadavg()}")
    H.write_json(args.json, {"meta": metas, "rows": all_rows, "env": H.env_info()})


if __name__ == "__main__":
    main()

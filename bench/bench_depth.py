#!/usr/bin/env python3
"""Compile time and step time against depth (4, 16, 64 layers) on the configuration of record at 4x256.

The layers run under ``lax.scan`` over stacked weights, so the compiled program holds one block whatever the
depth: compile time should stay nearly flat while step time grows linearly. Compile times are measured in
interleaved rounds (a fresh ``lower().compile()`` per round, depths in a random order each round); step
times are interleaved as in bench_forward. ``--unroll`` adds the Python-unrolled program for contrast.

Run:  bash scripts/env.sh .venv/bin/python bench/bench_depth.py [--depths 4,16,64] [--modes plain,routing_attn]
      [--reps 9]
"""

from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
from bench_forward import capture_of  # noqa: E402


def main():
    p = H.base_argparser(__doc__.split("\n")[0])
    p.add_argument("--depths", default="4,16,64")
    p.add_argument("--modes", default="plain,routing_attn")
    p.add_argument("--shape", default="b4_t256")
    p.add_argument("--compile-rounds", type=int, default=5)
    p.add_argument("--unroll", action="store_true", help="also time the unrolled program (compile grows with L)")
    args = p.parse_args()

    import jax
    import numpy as np

    import grokviz as gv
    from grokviz.model import forward

    print(f"# grokviz bench_depth  {H.env_info() | {'jax': jax.__version__}}")
    depths = [int(d) for d in args.depths.split(",")]
    modes = args.modes.split(",")
    b, t = H.SHAPES[args.shape]
    toks = jax.numpy.asarray(H.tokens(b, t))
    params = {L: gv.init_params(H.config_of_record(L), jax.random.key(H.SEED)) for L in depths}
    variants = [(L, m, u) for L in depths for m in modes for u in ([False, True] if args.unroll else [False])]

    def jitted(L, m, u):
        cfg = H.config_of_record(L)
        return jax.jit(functools.partial(forward, cfg=cfg, capture=capture_of(m), unroll=u))

    # compile: interleaved rounds, each a fresh trace + lower + compile
    lower_s = {v: [] for v in variants}
    comp_s = {v: [] for v in variants}
    rng = np.random.default_rng(H.SEED)
    for r in range(args.compile_rounds):
        H.wait_quiet(args.max_foreign, max_wait_s=20)
        for i in rng.permutation(len(variants)):
            v = variants[i]
            t0 = time.perf_counter()
            lowered = jitted(*v).lower(params[v[0]], toks)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            lower_s[v].append(t1 - t0)
            comp_s[v].append(t2 - t1)
            if args.verbose:
                print(f"  compile round {r} {v}: lower {t1 - t0:.2f}s compile {t2 - t1:.2f}s", file=sys.stderr)

    # step time: interleaved
    fns = {}
    for v in variants:
        c = jitted(*v).lower(params[v[0]], toks).compile()
        H.block(c(params[v[0]], toks))
        fns[f"L{v[0]}:{v[1]}{':unroll' if v[2] else ''}"] = (lambda c=c, pp=params[v[0]]: H.block(c(pp, toks)))
    times, meta = H.bench_interleaved(fns, args.warmup, args.reps, args.max_foreign, verbose=args.verbose)

    rows = []
    for v, name in zip(variants, fns):
        L, m, u = v
        s = H.summarize(times[name])
        lo, co = float(np.median(lower_s[v])), float(np.median(comp_s[v]))
        rows.append({"layers": L, "mode": m + (" (unrolled)" if u else " (scan)"), "lower_s": round(lo, 3),
                     "compile_s": round(co, 3), "total_compile_s": round(lo + co, 3),
                     "compile_p25": round(float(np.percentile(comp_s[v], 25)), 3),
                     "compile_p75": round(float(np.percentile(comp_s[v], 75)), 3),
                     "step_ms": s["median_ms"], "step_p25": s["p25_ms"], "step_p75": s["p75_ms"],
                     "ms_per_layer": round(s["median_ms"] / L, 2)})
    base = {(r["mode"]): r for r in rows if r["layers"] == min(depths)}
    for r in rows:
        r["compile_x_min_depth"] = round(r["total_compile_s"] / base[r["mode"]]["total_compile_s"], 2)
        r["step_x_min_depth"] = round(r["step_ms"] / base[r["mode"]]["step_ms"], 2)
    print(f"# {args.shape}; compile: median of {args.compile_rounds} interleaved rounds (lower = trace+lower, "
          f"compile = XLA); step: {meta}")
    print(H.markdown_table(rows, [("layers", "layers"), ("mode", "mode"), ("lower_s", "trace+lower s"),
                                  ("compile_s", "XLA compile s"), ("total_compile_s", "total s"),
                                  ("compile_x_min_depth", f"× L={min(depths)}"), ("step_ms", "step ms"),
                                  ("step_p25", "p25"), ("step_p75", "p75"), ("ms_per_layer", "ms/layer"),
                                  ("step_x_min_depth", f"step × L={min(depths)}")]))
    H.write_json(args.json, {"meta": meta, "rows": rows, "env": H.env_info()})


if __name__ == "__main__":
    main()

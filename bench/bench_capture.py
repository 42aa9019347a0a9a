#!/usr/bin/env python3
"""Cost of capture (issue 3): plain forward vs all routing hooks vs routing + every attention pattern.

Configs: the golden tiny config (2 layers, D 64, batch 2 x 24) and a larger tiny config (D 512, 8 layers,
8/2 heads of 64, 8 experts top-2, batch 1 x 512). Modes run interleaved in one process (bench/_harness.py:
random order per round, foreign-load filter); peak RSS of each mode is measured in a fresh subprocess so the
modes do not share a high-water mark.

Run:  bash scripts/env.sh .venv/bin/python bench/bench_capture.py [--reps 9]
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

MODES = ("plain", "routing", "routing_attn")


def setup(name):
    import jax

    import grokviz as gv
    from grokviz.testing import load_golden

    if name == "golden":
        cfg, params, z = load_golden()
        return cfg, params, z["tokens"]
    cfg = gv.GrokConfig(name="larger-tiny", vocab_size=8192, d_model=512, num_layers=8, num_q_heads=8,
                        num_kv_heads=2, head_dim=64, widening_factor=2, sequence_len=1024)
    return cfg, gv.init_params(cfg, jax.random.key(0)), H.tokens(1, 512, cfg.vocab_size)


def make(cfg, params, toks, mode):
    import functools

    import jax
    import jax.numpy as jnp

    from grokviz.hooks import ROUTING_HOOKS, select
    from grokviz.model import forward

    cap = {"plain": [], "routing": list(ROUTING_HOOKS),
           "routing_attn": list(ROUTING_HOOKS) + ["blocks.attn.pattern"]}[mode]
    fn = jax.jit(functools.partial(forward, cfg=cfg, capture=select(cap)))
    toks = jnp.asarray(toks)
    compiled, _, t_compile, _ = H.compile_timed(fn, params, toks)
    return (lambda: H.block(compiled(params, toks))), t_compile


def mem_only(spec):
    name, mode = spec.split(":")
    cfg, params, toks = setup(name)
    run, _ = make(cfg, params, toks, mode)
    print(json.dumps(H.measure_peak(run)))


def main():
    ap = H.base_argparser(__doc__.splitlines()[0])
    args = ap.parse_args()
    if args.mem_only:
        return mem_only(args.mem_only)
    print(f"# bench_capture  {json.dumps(H.env_info())}")
    for name in ("golden", "larger"):
        cfg, params, toks = setup(name)
        fns, compile_s = {}, {}
        for mode in MODES:
            fns[mode], compile_s[mode] = make(cfg, params, toks, mode)
        times, meta = H.bench_interleaved(fns, reps=args.reps, max_foreign=args.max_foreign)
        plain = H.summarize(times["plain"])["median_ms"]
        rows = []
        for mode in MODES:
            s = H.summarize(times[mode])
            mem = H.mem_subprocess(os.path.abspath(__file__), f"{name}:{mode}")
            rows.append({"mode": mode, **s, "ratio": round(s["median_ms"] / plain, 3),
                         "compile_s": round(compile_s[mode], 2), "peak_rss_mb": mem.get("peak_rss_mb"),
                         "delta_rss_mb": mem.get("delta_rss_mb")})
        print(f"\n## {cfg.describe()}, tokens {list(toks.shape)}  ({json.dumps(meta)})\n")
        print(H.markdown_table(rows, [("mode", "mode"), ("median_ms", "median ms"), ("p25_ms", "p25"),
                                      ("p75_ms", "p75"), ("ratio", "× plain"), ("compile_s", "compile s"),
                                      ("peak_rss_mb", "peak RSS MiB"), ("delta_rss_mb", "Δ RSS MiB")]))


if __name__ == "__main__":
    main()

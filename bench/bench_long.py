#!/usr/bin/env python3
"""Long context: batch 1 x seq 8192 on the configuration of record; peak memory of the capture modes.

Variants (each in a fresh subprocess, so that VmHWM is its own; compile peak reported apart):
  plain        logits only
  routing      routing hooks only (``grokviz.hooks.ROUTING_HOOKS``)
  long         routing hooks + the full attention pattern of ONE layer (``AttentionSpec(layers=(L-1,))``) +
               reduced summaries of every layer: ``attn.entropy`` [b,h,t], ``attn.top_keys`` /
               ``attn.top_key_weights`` [b,h,t,4], ``attn.pattern_at`` (the last query) [b,h,1,t]
  entropy_all  routing hooks + entropy/top-keys for every layer, no full map

For reference the script prints what the full pattern of every layer would take (L x H x T^2 x 4 bytes) —
it is not run. Timing here is one forward after compile per process (median of ``--reps``), not interleaved:
the long-context question is memory, and absolute times at this size are dominated by the T^2 attention.

Run:  bash scripts/env.sh .venv/bin/python bench/bench_long.py [--seq 8192] [--variants plain,long] [--reps 3]
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

VARIANTS = ("plain", "routing", "long", "entropy_all")


def spec_of(variant: str, cfg):
    from grokviz.hooks import ROUTING_HOOKS, AttentionSpec, select

    reduced = ["blocks.attn.entropy", "blocks.attn.top_keys", "blocks.attn.top_key_weights"]
    if variant == "plain":
        return frozenset(), None
    if variant == "routing":
        return select(list(ROUTING_HOOKS)), None
    if variant == "long":
        return (select(list(ROUTING_HOOKS) + reduced + ["blocks.attn.pattern_at", "blocks.attn.pattern"]),
                AttentionSpec(layers=(cfg.num_layers - 1,), queries=(-1,), top_keys=4))
    if variant == "entropy_all":
        return select(list(ROUTING_HOOKS) + reduced), AttentionSpec(top_keys=4)
    raise ValueError(variant)


def run_one(variant: str, seq: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    import grokviz as gv
    from grokviz.model import forward

    cfg = H.config_of_record(4)
    params = gv.init_params(cfg, jax.random.key(H.SEED))
    toks = jnp.asarray(H.tokens(1, seq, cfg.vocab_size))
    capture, spec = spec_of(variant, cfg)
    base = H.rss_mb()
    H.reset_peak_rss()
    fn = jax.jit(functools.partial(forward, cfg=cfg, capture=capture, attn_spec=spec))
    t0 = time.perf_counter()
    compiled = fn.lower(params, toks).compile()
    compile_s = time.perf_counter() - t0
    compile_peak = H.peak_rss_mb()
    H.reset_peak_rss()
    before = H.rss_mb()
    times = []
    out = None
    for _ in range(max(1, reps)):
        out = None
        t0 = time.perf_counter()
        out = H.block(compiled(params, toks))
        times.append(time.perf_counter() - t0)
    peak = H.peak_rss_mb()
    out_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(out)) / 2**20
    cache_mb = {k: round(v.nbytes / 2**20, 1) for k, v in out.cache.items()}
    ma = compiled.memory_analysis()
    temp_mb = round(ma.temp_size_in_bytes / 2**20, 1) if ma is not None else None
    return {"variant": variant, "seq": seq, "compile_s": round(compile_s, 2),
            "first_s": round(times[0], 2), "step_s": round(sorted(times)[len(times) // 2], 2),
            "base_rss_mb": round(base, 1), "compile_peak_rss_mb": round(compile_peak, 1),
            "rss_before_fwd_mb": round(before, 1), "fwd_peak_rss_mb": round(peak, 1),
            "fwd_delta_mb": round(peak - before, 1), "outputs_mb": round(out_mb, 1),
            "xla_temp_mb": temp_mb, "cache_mb": cache_mb}


def main():
    p = H.base_argparser(__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    if args.mem_only:
        variant, seq = args.mem_only.split("@")
        print(json.dumps(run_one(variant, int(seq), args.reps)))
        return
    print(f"# grokviz bench_long  {H.env_info()}")
    cfg = H.config_of_record(4)
    T, Hh, L = args.seq, cfg.num_q_heads, cfg.num_layers
    one_map = T * T * Hh * 4 / 2**20
    print(f"# b1 x t{T}: one layer's [head, seq, kv_seq] fp32 map = {one_map:.0f} MiB; every layer's = "
          f"{L * one_map:.0f} MiB (not run)")
    rows = []
    for v in args.variants.split(","):
        H.wait_quiet(args.max_foreign, max_wait_s=30)
        r = H.mem_subprocess(os.path.abspath(__file__), f"{v}@{T}", ["--reps", str(args.reps)])
        r.setdefault("variant", v)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(H.markdown_table(rows, [("variant", "variant"), ("compile_s", "compile s"), ("step_s", "step s"),
                                  ("compile_peak_rss_mb", "compile peak RSS MiB"),
                                  ("rss_before_fwd_mb", "RSS before fwd"), ("fwd_peak_rss_mb", "fwd peak RSS MiB"),
                                  ("fwd_delta_mb", "Δ fwd MiB"), ("xla_temp_mb", "XLA temp MiB"),
                                  ("outputs_mb", "outputs MiB")]))
    H.write_json(args.json, {"rows": rows, "env": H.env_info()})


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""One attention layer at the configuration of record (8 q / 2 kv heads of 32, causal, 30*tanh cap): the
reference form (``attn_impl="reference"``: the full score tensor, or query chunks of 512 from 1024 tokens on)
against the tiled form (``grokviz.model.tiled``) at several (query, key) tile sizes and the fused CPU kernel
(``attn_impl="fused"``, ``grokviz.kernels``; skipped with a note when it cannot be built) at its tile sizes;
medians of interleaved rounds, foreign-load filtered (see ``_harness``). Also the attention core alone (queries,
keys and values given: tiled, fused, and torch's fused ``scaled_dot_product_attention`` without the cap when
torch is importable, e.g. from /work/bench-venv; their errors are against the tiled core), one layer's experts
(top-2 of 8, FFN 512) and the floors: each part's GEMM FLOPs over the 2048^3 fp32 GEMM rate timed in the same
rounds.

Run:  bash scripts/env.sh .venv/bin/python bench/bench_attention.py [--shapes 1x1024,4x256,1x8192]
      [--tiles 64x64,128x128,256x128,128x256,256x256] [--fused-tiles 64x128,32x128,128x128] [--reps 7]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

TILES = "64x64,128x128,256x128,128x256,256x256"
FUSED_TILES = "64x128,32x128,128x128"


def layer_fns(cfg, b, t, tiles, fused_tiles=()):
    """{mode: callable} for one layer of [b, t] inputs: reference / tiled / fused at each tile size, the cores
    (tiled, fused, torch sdpa) / experts; and {mode: max rel err vs its reference}."""
    import importlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    import grokviz as gv
    from grokviz import kernels
    from grokviz.hooks import Point
    from grokviz.kernels import fused as F
    from grokviz.model import tiled as T
    from grokviz.model.block import EXPERT_IMPLS
    from grokviz.model.moe import route

    A = importlib.import_module("grokviz.model.attention")  # the module (grokviz.model.attention is the function)

    params = gv.init_params(cfg, jax.random.key(H.SEED))
    p = jax.tree_util.tree_map(lambda a: a[0], params["blocks"])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, cfg.d_model)), jnp.float32)
    toks = jnp.asarray(H.tokens(b, t, cfg.vocab_size))
    mask = A.attention_mask(toks, cfg.pad_token)

    def attn_fn(impl, tq=None, tk=None):
        mod = F if impl == "fused" else T

        def f(p, x, mask):
            old = mod.TILE_Q, mod.TILE_K
            mod.TILE_Q, mod.TILE_K = tq or old[0], tk or old[1]
            try:
                return A.attention(p, x, mask, cfg, Point(frozenset(), prefix="blocks."),
                                   spec=A.with_impl(None, impl))
            finally:
                mod.TILE_Q, mod.TILE_K = old
        return jax.jit(f)

    fns, outs = {}, {}
    modes = {"reference": attn_fn("reference")}
    for spec in tiles:
        tq, tk = (int(v) for v in spec.split("x"))
        if tq <= t and tk <= t:
            modes[f"tiled {tq}x{tk}"] = attn_fn("tiled", tq, tk)
    fused = kernels.available()
    if not fused:
        print(f"# fused kernel skipped: {kernels.reason()}", flush=True)
    for spec in fused_tiles if fused else ():
        tq, tk = (int(v) for v in spec.split("x"))
        modes[f"fused {tq}x{tk}"] = attn_fn("fused", tq, tk)
    for name, f in modes.items():
        outs[name] = np.asarray(f(p, x, mask))
        fns[name] = (lambda f=f: f(p, x, mask).block_until_ready())
    ref = outs["reference"]
    errs = {n: float(np.abs(o - ref).max() / np.abs(ref).max()) for n, o in outs.items()}

    # the cores alone on the same q, k, v: tiled, fused, and torch's fused kernel (no soft cap: it has none)
    r = np.random.default_rng(2)
    kvh, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    qg = jnp.asarray(r.standard_normal((b, kvh, g, t, d)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((b, t, kvh, d)), jnp.float32) for _ in range(2))
    cores = {"core tiled": jax.jit(lambda qg, k, v, m: T.attend_tiled(qg, k, v, m, cfg, jnp.float32)[0])}
    if fused:
        cores["core fused"] = jax.jit(lambda qg, k, v, m: F.attend_fused(qg, k, v, m, cfg, jnp.float32))
        cores["core fused + pattern"] = jax.jit(
            lambda qg, k, v, m: F.attend_fused(qg, k, v, m, cfg, jnp.float32, pattern=True)[0])
    core_out = {n: np.asarray(f(qg, k, v, mask)) for n, f in cores.items()}
    for n, f in cores.items():
        fns[n] = (lambda f=f: f(qg, k, v, mask).block_until_ready())
        errs[n] = float(np.abs(core_out[n] - core_out["core tiled"]).max() / np.abs(core_out["core tiled"]).max())
    torch_fn = torch_sdpa_fn(np.asarray(qg), np.asarray(k), np.asarray(v), cfg)
    if torch_fn is not None:
        fns["core torch sdpa (no cap)"] = torch_fn

    def experts(p, x):
        _, ex = route(x, p, cfg, Point(frozenset(), prefix="blocks."))
        return EXPERT_IMPLS["sparse"](p, x, ex, cfg)
    ej = jax.jit(experts)
    ej(p, x).block_until_ready()
    fns["experts (sparse)"] = lambda: ej(p, x).block_until_ready()
    return fns, errs


def torch_sdpa_fn(qg, k, v, cfg):
    """torch.nn.functional.scaled_dot_product_attention (causal, GQA, the logit multiplier as scale; no soft cap)
    on the same q, k, v, or None without torch."""
    try:
        import torch
    except ImportError:
        print("# torch not importable: no torch sdpa row", flush=True)
        return None
    b, kvh, g, t, d = qg.shape
    tq = torch.from_numpy(qg.reshape(b, kvh * g, t, d).copy())
    tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (k, v))
    scale = float(cfg.attn_logit_multiplier)

    def f():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale,
                                                                    enable_gqa=True)
    f()
    return f


def floors(cfg, b, t) -> dict:
    """GEMM FLOPs of one layer: attention (q/k/v/o projections + QK^T and PV over the causal triangle), experts."""
    f = H.forward_flops(cfg.replace(num_layers=1), b, t)
    return {"attention": f["attn_proj"] + f["attn_core"], "attention core": f["attn_core"],
            "experts": f["experts_topk"]}


def main():
    p = H.base_argparser(__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1x1024,4x256,1x8192")
    p.add_argument("--tiles", default=TILES)
    p.add_argument("--fused-tiles", default=FUSED_TILES)
    args = p.parse_args()
    cfg = H.config_of_record(1)
    print(f"# grokviz bench_attention  {H.env_info()}")
    rows, gemm_rates = [], []
    for shape in args.shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        fns, errs = layer_fns(cfg, b, t, args.tiles.split(","), args.fused_tiles.split(","))
        fns[H.GEMM_REF] = H.gemm_ref_fn("jax")
        reps = args.reps if t <= 1024 else max(3, args.reps // 2)
        times, meta = H.bench_interleaved(fns, warmup=args.warmup, reps=reps, max_foreign=args.max_foreign,
                                          verbose=args.verbose)
        gflops = H.gemm_gflops(times[H.GEMM_REF], fns[H.GEMM_REF].flop)
        gemm_rates.append(gflops)
        fl = floors(cfg, b, t)
        ref_ms = H.summarize(times["reference"])["median_ms"]
        for name, ts in times.items():
            if name == H.GEMM_REF:
                continue
            s = H.summarize(ts)
            part = "experts" if name.startswith("experts") else "attention core" if name.startswith("core") \
                else "attention"
            rows.append({"shape": f"{b}x{t}", "mode": name, **s,
                         "x_reference": round(s["median_ms"] / ref_ms, 2) if part == "attention" else None,
                         "floor_ms": round(fl[part] / (gflops * 1e9) * 1e3, 2),
                         "rel_err": None if name not in errs else f"{errs[name]:.1e}",
                         "rounds_dropped": meta["rounds_dropped"]})
        print(f"# {b}x{t}: {meta}", flush=True)
    print(H.cpu_line(sum(gemm_rates) / len(gemm_rates)))
    print(H.markdown_table(rows, [("shape", "shape"), ("mode", "mode"), ("median_ms", "median ms"),
                                  ("p25_ms", "p25"), ("p75_ms", "p75"), ("x_reference", "x reference"),
                                  ("floor_ms", "GEMM floor ms"), ("rel_err", "max rel err vs reference")]))
    H.write_json(args.json, {"rows": rows, "env": H.env_info(), "cpu": H.cpu_line()})


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Per-layer breakdown of the forward (issue 17): one layer's attention and experts against their own floors.

On the configuration of record (bench/_harness.py) at each shape, one interleaved run times, from the model's own
parts (grokviz.model.attention / moe / transformer, called on layer 0's params):

* ``attention (impl)``: the attention sublayer (projections, RoPE, the attention itself, output projection) under
  each attention implementation (``grokviz.model.attention.ATTN_IMPLS`` that resolve to distinct forms);
* ``attention core (impl)``: the same minus the projections (queries, keys and values are inputs);
* ``projections``: q/k/v and output projections alone;
* ``moe (sparse)``: router, the top-k experts (the forward's default sparse form) and the combine;
* ``moe (dense)``: the same with every expert run on every token (the slow reference form);
* ``unembed``: final norm and unembedding;
* ``forward / layers``: the whole forward (default implementation) divided by the number of layers, for scale.

Floors: each part's matmul FLOPs (``_harness.forward_flops``, per layer) over the rate of a 2048^3 fp32 GEMM timed
interleaved in the same rounds; the core's floor counts QK^T and PV of the causal lower triangle. Memory-bound work
(softmax, tanh, masks) has no FLOP floor, which is why the core's ratio is the one to watch.

Run:  bash scripts/env.sh .venv/bin/python bench/bench_layers.py [--shapes b4_t256,b1_t1024] [--reps 9]
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

COLS = [("shape", "shape"), ("part", "part (one layer)"), ("median_ms", "median ms"), ("p25_ms", "p25"),
        ("p75_ms", "p75"), ("gflop", "GFLOP"), ("floor_ms", "floor ms"), ("x_floor", "× floor"),
        ("x_forward_layer", "× forward/layer")]


def impls() -> list[str]:
    """The attention implementations to time: every named one except aliases that resolve to another."""
    A = importlib.import_module("grokviz.model.attention")  # the module (grokviz.model.attention is the function)

    out = [i for i in A.ATTN_IMPLS if i != "auto"]
    if "fused" in out:
        try:
            from grokviz import kernels

            if not kernels.available():
                print(f"# fused kernel unavailable: {kernels.unavailable_reason()}", flush=True)
                out.remove("fused")
        except ImportError:
            out.remove("fused")
    return out


def parts(shape: str):
    """{name: (jitted fn, args, GFLOP or None)} for one layer of the configuration of record at ``shape``."""
    import jax
    import jax.numpy as jnp

    import grokviz as gv
    from grokviz.hooks import Point
    A = importlib.import_module("grokviz.model.attention")  # the module (grokviz.model.attention is the function)
    from grokviz.model import forward, moe, transformer
    from grokviz.params import dense

    cfg = H.config_of_record()
    params = gv.init_params(cfg, jax.random.key(H.SEED))
    b, t = H.SHAPES[shape]
    toks = jnp.asarray(H.tokens(b, t, cfg.vocab_size))
    flops = {k: v / 1e9 for k, v in H.forward_flops(cfg, b, t).items()}
    L = cfg.num_layers
    p = transformer.split_layers(params, cfg)["blocks"][0]
    masks = transformer.build_masks(toks, cfg)
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.d_model), jnp.float32)
    q, k, v = A.project_qkv(p, x, cfg)
    q, k = A.rope(q, masks.positions, cfg.rope_base, cfg), A.rope(k, masks.positions, cfg.rope_base, cfg)
    qg = q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim).transpose(0, 2, 3, 1, 4)
    core_gf = flops["attn_core"] / L
    proj_gf = flops["attn_proj"] / L
    out = {}
    for impl in impls():
        spec = A.with_impl(None, impl)

        def sub(p, x, mask, pos, spec=spec):
            return A.attention(p, x, mask, cfg, Point(prefix="blocks."), spec=spec, positions=pos)

        def core(qg, k, v, mask, spec=spec):
            # attention minus the projections: the model's own dispatch on given queries, keys and values
            point = Point(prefix="blocks.")
            if A.use_tiled(point, spec, t):
                return A._attend_tiled(qg, k, v, mask, cfg, point, spec, jnp.float32, None, None)
            return A._attend_chunked(qg, k, v, mask, cfg, point, spec, jnp.float32) if A.use_chunked(
                point, t) else A._mix(A._probs(qg, k, *mask, cfg)[2], v)

        out[f"attention ({impl})"] = (jax.jit(sub), (p, x, masks.full, masks.positions),
                                         proj_gf + core_gf)
        if impl in ("tiled", "reference"):  # the fused form is timed through the sublayer (its own dispatch)
            out[f"attention core ({impl})"] = (jax.jit(core), (qg, k, v, masks.full), core_gf)

    def proj(p, x):
        q, k, v = A.project_qkv(p, x, cfg)
        return q, k, v, q.reshape(b, t, -1) @ dense(p["w_o"], x.dtype)

    out["projections"] = (jax.jit(proj), (p, x), proj_gf)

    def moe_part(p, x, impl):
        gates, experts = moe.route(x, p, cfg, Point(prefix="blocks."))
        y = (moe.experts_sparse if impl == "sparse" else moe.experts_dense)(p, x, experts, cfg)
        return moe.combine(gates, y, None, experts)

    out["moe (sparse)"] = (jax.jit(functools.partial(moe_part, impl="sparse")), (p, x),
                           (flops["experts_topk"] + flops["router"]) / L)
    dense_gf = (flops["experts_topk"] * cfg.num_experts / cfg.top_k + flops["router"]) / L
    out["moe (dense)"] = (jax.jit(functools.partial(moe_part, impl="dense")), (p, x), dense_gf)
    out["unembed"] = (jax.jit(lambda params, h: transformer.unembed(params, h, cfg)), (params, x), flops["unembed"])
    out["forward / layers"] = (jax.jit(functools.partial(forward, cfg=cfg)), (params, toks), flops["total"])
    return out, L


def main():
    ap = H.base_argparser(__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="b4_t256,b1_t1024")
    args = ap.parse_args()

    import jax

    print(f"# grokviz bench_layers  {H.env_info() | {'jax': jax.__version__}}")
    rows, metas = [], {}
    gemm = H.gemm_ref_fn("jax")
    for shape in args.shapes.split(","):
        ps, L = parts(shape)
        fns = {}
        for name, (fn, a, _) in ps.items():
            compiled = fn.lower(*a).compile()
            fns[name] = functools.partial(lambda c, a: H.block(c(*a)), compiled, a)
        fns[H.GEMM_REF] = gemm
        times, meta = H.bench_interleaved(fns, warmup=args.warmup, reps=args.reps, max_foreign=args.max_foreign,
                                          verbose=args.verbose)
        rate = H.gemm_gflops(times[H.GEMM_REF], gemm.flop)
        meta["gemm_gflops"] = round(rate, 1)
        metas[shape] = meta
        print(f"# {shape}: {meta}", flush=True)
        fwd_layer = H.summarize(times["forward / layers"])["median_ms"] / L
        for name, (_, _, gf) in ps.items():
            s = H.summarize(times[name])
            if name == "forward / layers":
                s = {k: (round(v / L, 2) if k.endswith("_ms") else v) for k, v in s.items()}
                gf = gf / L
            floor = gf / rate * 1e3 if gf else None
            rows.append({"shape": shape, "part": name, **s, "gflop": round(gf, 3) if gf else None,
                         "floor_ms": round(floor, 2) if floor else None,
                         "x_floor": round(s["median_ms"] / floor, 2) if floor else None,
                         "x_forward_layer": round(s["median_ms"] / fwd_layer, 2)})
    rate = min(m["gemm_gflops"] for m in metas.values())
    print(f"# {H.cpu_line(rate)} (lowest of the shapes' runs)")
    print(H.markdown_table(rows, COLS))
    H.write_json(args.json, {"rows": rows, "meta": metas, "env": H.env_info(), "cpu": H.cpu_info()})


if __name__ == "__main__":
    main()

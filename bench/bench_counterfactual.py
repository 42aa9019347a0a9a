#!/usr/bin/env python3
"""Counterfactual expert outputs (``grokviz.analysis.experts.expert_outputs``: what every expert, picked or not,
outputs at one MoE layer) as a multiple of the plain forward, at 4x256 on the configuration of record, one
interleaved run. Target (issue 16): <= 1.5x the plain forward.

Modes (each returns numpy arrays on the host, as a notebook gets them):
  plain        model.run(tokens).logits
  cf_all       expert_outputs(model, tokens, layer): one jitted computation, the blocks up to that layer with
               the MoE input captured, then every expert of that layer on every position ([4, 256, 8, 256])
  cf_last      the same at the last position only (positions=[-1])
  cf_dla       counterfactual_dla(model, tokens, layer, target): every layer (the readout needs the final
               residual stream), then every expert of that layer on every position and its DLA to one target
  hook         model.run(tokens, capture="blocks.moe.expert_outputs_all"): the hook itself, every MoE layer

Run:  bash scripts/env.sh .venv/bin/python bench/bench_counterfactual.py [--layer 3] [--reps 9]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402


def main(argv=None):
    p = H.base_argparser(__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    import grokviz as gv
    from grokviz.analysis.experts import counterfactual_dla, expert_outputs

    cfg = H.config_of_record()
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(H.SEED)))
    toks = H.tokens(args.batch, args.seq, cfg.vocab_size)

    fns = {
        "plain": lambda: np.asarray(model.run(toks).logits),
        "cf_all": lambda: expert_outputs(model, toks, args.layer)["outputs"],
        "cf_last": lambda: expert_outputs(model, toks, args.layer, positions=[-1])["outputs"],
        "cf_dla": lambda: counterfactual_dla(model, toks, args.layer, 7)["ungated"],
        "hook": lambda: np.asarray(model.run(toks, capture=["blocks.moe.expert_outputs_all"]).cache[
            "blocks.moe.expert_outputs_all"]),
    }
    for f in fns.values():  # compile outside the timed rounds
        f()
    gemm = H.gemm_ref_fn("jax")
    fns[H.GEMM_REF] = gemm
    times, meta = H.bench_interleaved(fns, warmup=args.warmup, reps=args.reps, max_foreign=args.max_foreign,
                                      verbose=args.verbose)
    gflops = H.gemm_gflops(times[H.GEMM_REF], gemm.flop)
    base = float(np.median(times["plain"]))
    rows = []
    for name in ("plain", "cf_all", "cf_last", "cf_dla", "hook"):
        s = H.summarize(times[name])
        rows.append({"mode": name, "median": s["median_ms"], "p25": s["p25_ms"], "p75": s["p75_ms"],
                     "x_plain": round(s["median_ms"] / base, 2)})
    print(H.cpu_line(gflops))
    print(f"# {args.batch}x{args.seq}, layer {args.layer}; {meta}")
    print(H.markdown_table(rows, [("mode", "mode"), ("median", "median ms"), ("p25", "p25"), ("p75", "p75"),
                                  ("x_plain", "× plain")]))
    H.write_json(args.json, {"env": H.env_info(), "meta": meta, "rows": rows, "gemm_gflops": gflops})


if __name__ == "__main__":
    main()

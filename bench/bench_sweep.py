#!/usr/bin/env python3
"""Ablation sweep over every (layer, expert) [or (layer, head)]: the prefix-reusing, vmapped sweep of
``grokviz.analysis.patching.ablation_sums`` vs one full ``model.run`` per ablation
(``separate_ablation_sums``), on the same tokens, giving the same Δloss/KL numbers.

Model: the bundled trained tiny model (``gv.load("tiny")``) when its weights are present, else a random model
with the same configuration (``grokviz.train.tiny_config()``: 4 layers, d_model 128, 8 experts top-2, vocab 4096).
Tokens: 4 x 128 random ids (no padding), seed 0. Both modes are compiled before timing; they run interleaved in
a new random order each round, with the foreign-load filter of ``_harness.py``; medians and the ratio come from
the same run. Target: sweep / separate < 0.6.

Run:  bash scripts/env.sh .venv/bin/python bench/bench_sweep.py [--kind expert|head] [--batch 4] [--seq 128] [--reps 5]
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402


def load_model():
    import jax

    import grokviz as gv

    try:
        return gv.load("tiny"), "tiny (trained)"
    except Exception as err:  # weights not shipped yet: a random model of the same configuration
        from grokviz.train import tiny_config

        cfg = tiny_config()
        return gv.Model(cfg, gv.init_params(cfg, jax.random.key(0))), f"random, tiny config ({type(err).__name__})"


def main(argv=None):
    p = H.base_argparser(__doc__.splitlines()[0])
    p.set_defaults(reps=5, max_foreign=0.3)
    p.add_argument("--kind", default="expert", choices=["expert", "head"])
    p.add_argument("--mode", default="zero", choices=["zero", "remove"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)

    import numpy as np

    from grokviz.analysis import patching as P

    model, what = load_model()
    cfg = model.cfg
    toks = H.tokens(args.batch, min(args.seq, cfg.sequence_len), vocab=cfg.vocab_size)
    kw = dict(kind=args.kind, mode=args.mode)
    fns = {"sweep": lambda: P.ablation_sums(model, toks, **kw),
           "separate": lambda: P.separate_ablation_sums(model, toks, **kw)}
    a, b = fns["sweep"](), fns["separate"]()  # compile both, and check they agree
    n = b["n_pred"]
    err = float(np.max(np.abs((a["nll"] - a["base_nll"]) - (b["nll"] - b["base_nll"])) / n))
    times, meta = H.bench_interleaved(fns, warmup=args.warmup, reps=args.reps, max_foreign=args.max_foreign,
                                      verbose=args.verbose)
    units = cfg.num_experts if args.kind == "expert" else cfg.num_q_heads
    rows = [{"mode": k, **H.summarize(v)} for k, v in times.items()]
    ratio = statistics.median(times["sweep"]) / statistics.median(times["separate"])
    print(f"# {what}: {cfg.describe()}")
    print(f"# {args.kind} ablations ({args.mode}): {cfg.num_layers} layers x {units} = {cfg.num_layers * units}; "
          f"tokens {toks.shape}; max |Δloss sweep - separate| = {err:.2e} nats")
    print(H.markdown_table(rows, [("mode", "mode"), ("median_ms", "median ms"), ("p25_ms", "p25"),
                                  ("p75_ms", "p75"), ("n", "rounds")]))
    print(f"\nratio sweep / separate (medians): {ratio:.3f}   (target < 0.6)")
    print(f"# rounds kept {meta['rounds_kept']}, dropped {meta['rounds_dropped']}, "
          f"filled-contended {meta['rounds_filled_contended']}, foreign load mean {meta['foreign_load_kept_mean']}")
    H.write_json(args.json, {"env": H.env_info(), "model": what, "rows": rows, "ratio": ratio, "meta": meta,
                             "max_delta_loss_err": err})


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Routing fragility scan (``grokviz.analysis.fragility.routing_fragility``: top-k margins and selection flips
under bf16 activations, int8 weights and embedding noise) over 100k tokens of the bundled tiny model.

Tokens: documents of the bundled validation split, in order, until ``--tokens`` real tokens (windows of
``--max-len``, batches of ``--batch``). Timed end to end, twice: *cold* (a fresh process: includes compiling the
four forward programs and quantising the weights) and *warm* (the same scan again, programs compiled). Target:
cold < 60 s on an idle machine. Also reports the per-layer summary and the most fragile layer.

Run:  bash scripts/env.sh .venv/bin/python bench/bench_fragility.py [--tokens 100000] [--batch 16] [--max-len 128]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402


def main(argv=None):
    p = H.base_argparser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--no-warm", action="store_true", help="skip the second (warm) scan")
    args = p.parse_args(argv)

    import grokviz as gv
    from grokviz.analysis.dataset import default_dataset
    from grokviz.analysis.fragility import routing_fragility

    load0 = os.getloadavg()[0]
    model = gv.load("tiny", progress=False)
    docs, n = [], 0
    for d in default_dataset("validation"):
        ids = model.tokenizer.encode(d["text"])
        take = ids[: args.tokens - n]
        docs.append(take)
        n += len(take)
        if n >= args.tokens:
            break
    kw = dict(batch_size=args.batch, max_len=args.max_len, progress=False)
    t0 = time.perf_counter()
    fr = routing_fragility(model, docs, **kw)
    cold = time.perf_counter() - t0
    warm = None
    if not args.no_warm:
        t0 = time.perf_counter()
        routing_fragility(model, docs, **kw)
        warm = time.perf_counter() - t0
    n_tok = int(fr.layers["n_tokens"].iloc[0])
    load1 = os.getloadavg()[0]
    print(f"# tiny model {model.cfg.describe()}; {n_tok} tokens, batch {args.batch} x {args.max_len}; "
          f"load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs"
          + ("  (BUSY MACHINE: indicative only)" if max(load0, load1) > 0.5 * (os.cpu_count() or 1) else ""))
    print(f"cold scan (compile included): {cold:.1f} s ({n_tok / cold:,.0f} tokens/s)   target < 60 s idle")
    if warm is not None:
        print(f"warm scan: {warm:.1f} s ({n_tok / warm:,.0f} tokens/s)")
    print(fr.layers.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"most fragile layer (mean flip rate over the variants): {fr.most_fragile_layer()}")
    H.write_json(args.json, {"env": H.env_info(), "tokens": n_tok, "cold_s": cold, "warm_s": warm,
                             "layers": fr.layers.to_dict("records"), "most_fragile_layer": fr.most_fragile_layer(),
                             "loadavg": [load0, load1]})


if __name__ == "__main__":
    main()

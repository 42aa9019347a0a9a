"""Interaction latency of the grokviz widgets: the time from a control change to the figures being updated
(observer -> analysis / model re-run -> figure builders -> FigureWidget.batch_update), with the tiny model on a
128-token prompt, after the first compile. Median and p90 over rounds.

    .venv/bin/python bench/bench_widgets.py [--rounds 30]

Measured in the Python process (no browser attached, so the websocket hop is not included; the browser test
sees one round trip through Lab in about 0.15 s warm on top of this).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

TEXT = ("The router of a mixture-of-experts layer sends every token to two of its eight experts. Some experts "
        "specialise in punctuation, others in numbers like 1, 2 and 3, or in names. ") * 20


def load_model():
    import grokviz as gv

    try:
        return gv.load("tiny"), "bundled tiny (trained)"
    except (ImportError, FileNotFoundError):  # same shapes, random weights: identical latency
        import jax

        from grokviz import train
        from grokviz.tokenizer import load_tokenizer

        cfg = train.tiny_config()
        return (gv.Model(cfg, gv.init_params(cfg, jax.random.key(0)), tokenizer=load_tokenizer(train.TOKENIZER_PATH)),
                "tiny config, random weights (trained weights not present)")


def timed(fn, rounds: int) -> list[float]:
    fn(0)  # warm-up (compile / first figure)
    out = []
    for i in range(1, rounds + 1):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()

    from grokviz import viz

    model, what = load_model()
    cfg = model.cfg
    tokens = model.encode(TEXT)[:, : a.seq]
    assert tokens.shape == (1, a.seq), tokens.shape
    L, E, H = cfg.num_layers, cfg.num_experts, cfg.num_q_heads

    t = time.perf_counter()
    run = model.run(tokens, capture=["blocks.moe.*", "blocks.attn.pattern", "blocks.attn.scores", "blocks.attn.logits"])
    first_run = time.perf_counter() - t
    routing = viz.RoutingExplorer(run)
    load = viz.ExpertLoadDashboard(run)
    attn = viz.AttentionExplorer(run)
    flow = viz.RoutingFlow(run, layers=(0, min(L - 1, 3)))
    t = time.perf_counter()
    lab = viz.AblationLab(model, tokens)
    lab_build = time.perf_counter() - t

    def ablate(i):
        l, e = divmod(i % (L * E), E)
        box = lab.expert_boxes[l, e]
        box.value = not box.value

    iv0 = lab._iv0
    cases = {
        "RoutingExplorer: layer slider": lambda i: setattr(routing.layer_slider, "value", i % L),
        "RoutingExplorer: token slider": lambda i: setattr(routing.token_slider, "value", (7 * i) % a.seq),
        "ExpertLoadDashboard: layer slider": lambda i: setattr(load.layer_slider, "value", i % L),
        "AttentionExplorer: head select": lambda i: setattr(attn.head_select, "value", i % H),
        "AttentionExplorer: layer slider": lambda i: setattr(attn.layer_slider, "value", i % L),
        "RoutingFlow: layer range": lambda i: setattr(flow.range_slider, "value", (i % (L - 1), L - 1)),
        "AblationLab: expert checkbox (re-run + redraw)": ablate,
        "  of which model.run with interventions": lambda i: np.asarray(
            model.run(tokens, capture=["blocks.moe.top_k_experts"],
                      interventions=iv0.remove_expert(i % L, i % E)).logits),
    }
    rows = []
    for name, fn in cases.items():
        ms = timed(fn, a.rounds)
        rows.append((name, statistics.median(ms), float(np.percentile(ms, 90)), max(ms)))

    print(f"model: {what}; {cfg.describe() if hasattr(cfg, 'describe') else cfg.name}")
    print(f"prompt: {a.seq} tokens; rounds: {a.rounds} after one warm-up; first run (compile) {first_run:.2f} s; "
          f"AblationLab build {lab_build:.2f} s")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print()
    print("| interaction | median ms | p90 ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, med, p90, mx in rows:
        print(f"| {name} | {med:.1f} | {p90:.1f} | {mx:.1f} |")


if __name__ == "__main__":
    main()

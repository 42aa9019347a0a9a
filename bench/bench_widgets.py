"""Interaction latency of the grokviz widgets: the time from a control change to the figures being updated
(observer -> analysis / model re-run -> figure builders -> FigureWidget.batch_update), with the tiny model on a
128-token prompt, after the first compile. Median and p90 over rounds.

    .venv/bin/python bench/bench_widgets.py [--rounds 30]
    .venv/bin/python bench/bench_widgets.py --scale [--compare REF] [--rounds 5]

``--scale``: each view built on a 64-layer, 128-expert, top-8 model (random weights, small widths): build time,
the widgets it creates (each one a comm model a front end has to open) and the figure payload (the JSON its
FigureWidgets send, as plotly's widget serializer writes it), plus one control change per view.
``--compare REF``: the same for grokviz/viz as of git ``REF`` (loaded beside the current one), before/after.

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


def viz_at(ref: str):
    """grokviz/viz as of git ``ref``, imported as ``grokviz._viz_<ref>`` (its relative imports reach today's
    core: the views are what differs)."""
    import importlib.util
    import re
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    names = subprocess.run(git + ["ls-tree", "--name-only", ref, "grokviz/viz/"], check=True, capture_output=True,
                           text=True).stdout.split()
    folder = Path(tempfile.mkdtemp(prefix="grokviz-viz-ref-"))
    for name in names:
        blob = subprocess.run(git + ["show", f"{ref}:{name}"], check=True, capture_output=True).stdout
        (folder / Path(name).name).write_bytes(blob)
    mod_name = "grokviz._viz_" + re.sub(r"\W", "_", ref)
    spec = importlib.util.spec_from_file_location(mod_name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def payload(view) -> tuple[int, int]:
    """(widgets in the view's tree, bytes of its FigureWidgets' data + layout as the widget serializer sends
    them: JSON, binary buffers counted by their length)."""
    import json

    import plotly.graph_objects as go
    from plotly.serializers import _py_to_js

    n, todo, size = 0, [view], 0
    while todo:
        w = todo.pop()
        n += 1
        todo += list(getattr(w, "children", ()))
        if isinstance(w, go.FigureWidget):
            for part in (w._widget_data, w._widget_layout):
                size += len(json.dumps(_py_to_js(part, None), default=lambda b: "x" * b.nbytes))
    return n, size


def scale(a) -> None:
    import jax

    import grokviz as gv
    from grokviz import viz

    cfg = gv.GrokConfig.golden(num_layers=64, num_experts=128, top_k=8, d_model=32, num_q_heads=4,
                               num_kv_heads=2, head_dim=8, sequence_len=256)
    model = gv.Model(cfg, gv.init_params(cfg, jax.random.key(0)))
    tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(1, a.seq)).astype(np.int32)
    t = time.perf_counter()
    run = model.run(tokens, capture=["blocks.moe.*"])
    first_run = time.perf_counter() - t
    versions = [("now", viz)] + ([(a.compare, viz_at(a.compare))] if a.compare else [])
    rows = []
    for label, v in versions:
        builds = {"RoutingExplorer": lambda v=v: v.RoutingExplorer(run),
                  "ExpertLoadDashboard": lambda v=v: v.ExpertLoadDashboard(run),
                  "RoutingFlow": lambda v=v: v.RoutingFlow(run),
                  "AblationLab": lambda v=v: v.AblationLab(model, tokens)}
        for name, build in builds.items():
            t = time.perf_counter()
            view = build()
            built = time.perf_counter() - t
            n, size = payload(view)
            change = _one_change(name, view, label == "now")
            ms = timed(change, a.rounds)
            rows.append((name, label, built, n, size, statistics.median(ms)))
            del view
    print(f"model: {cfg.describe() if hasattr(cfg, 'describe') else cfg.name}; random weights; prompt {a.seq} "
          f"tokens; first run (compile) {first_run:.1f} s; change = median of {a.rounds} after one warm-up")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print()
    print("| view | viz | build s | widgets | figure payload KB | one change ms |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, built, n, size, med in rows:
        print(f"| {name} | {label} | {built:.2f} | {n} | {size / 1024:.0f} | {med:.0f} |")


def _one_change(name: str, view, now: bool):
    """The view's main control, moved the way a user moves it (old and new AblationLab controls differ)."""
    if name == "RoutingExplorer":
        opts = [o[1] if isinstance(o, tuple) else o for o in getattr(view.layer_slider, "options", ())]
        vals = opts or list(range(view.layer_slider.max + 1))
        return lambda i: setattr(view.layer_slider, "value", vals[i % len(vals)])
    if name == "ExpertLoadDashboard":
        opts = [o[1] if isinstance(o, tuple) else o for o in getattr(view.layer_slider, "options", ())]
        vals = opts or list(range(view.layer_slider.max + 1))
        return lambda i: setattr(view.layer_slider, "value", vals[(i + 1) % len(vals)])
    if name == "RoutingFlow":
        return lambda i: setattr(view.range_slider, "value", (i % 4, 4))
    if now:
        return lambda i: setattr(view.expert_picker.text, "value", f"{i % 120}-{i % 120 + 3}")

    def tick(i):
        box = view.expert_boxes[0, i % 128]
        box.value = not box.value
    return tick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--scale", action="store_true", help="64 layers x 128 experts, top-8: build, widgets, payload")
    ap.add_argument("--compare", metavar="REF", help="with --scale: also measure grokviz/viz as of git REF")
    a = ap.parse_args()
    if a.scale:
        if a.rounds == 30:
            a.rounds = 5
        return scale(a)

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
        lab.toggle_expert(l, e, e not in lab.state.at("removed", l))

    iv0 = lab._iv0
    cases = {
        "RoutingExplorer: layer slider": lambda i: setattr(routing.layer_slider, "value", i % L),
        "RoutingExplorer: token slider": lambda i: setattr(routing.token_slider, "value", (7 * i) % a.seq),
        "ExpertLoadDashboard: layer slider": lambda i: setattr(load.layer_slider, "value", i % L),
        "AttentionExplorer: head select": lambda i: setattr(attn.head_select, "value", i % H),
        "AttentionExplorer: layer slider": lambda i: setattr(attn.layer_slider, "value", i % L),
        "RoutingFlow: layer range": lambda i: setattr(flow.range_slider, "value", (i % (L - 1), L - 1)),
        "AblationLab: one expert on/off (re-run + redraw)": ablate,
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

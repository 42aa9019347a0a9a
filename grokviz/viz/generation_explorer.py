"""GenerationExplorer: watch routing while the model writes, inspect any token, remove experts and compare."""

from __future__ import annotations

import dataclasses
import html
import time

import ipywidgets as W
import numpy as np

from ..interventions import Interventions
from . import generation_figures as G
from .base import (
    COLUMN_WIDTH,
    View,
    check_index,
    check_moe_layer,
    figure_widget,
    flex_row,
    moe_layer_slider,
    shown,
    slider,
    split,
    sync,
)
from .generation_panels import GenerationPanels
from .generation_trace import ATTENTION, Trace
from .scale import format_ids, parse_ids

TOP_CHOICES = (8, 16, 32, 64)
MAIN = ("strip", "timeline", "probs", "attn", "load")   # the parts that show one continuation


@dataclasses.dataclass
class GenerationState:
    layer: int = 0          # the MoE layer the token strip and the load are shown at
    token: int = 0          # token index: prompt tokens, then generated ones
    top: int = 0            # experts shown in router probabilities and load (0 = all)
    head: int = -1          # attention head shown (-1 = mean over heads)
    removed: set = dataclasses.field(default_factory=set)   # {(layer, expert)} removed in the regeneration
    show: str = "baseline"  # which continuation the strip, timeline and inspector show: "baseline" | "removed"


class GenerationExplorer(GenerationPanels, View):
    """Generate from ``prompt`` and watch it: the prompt and continuation coloured by first-choice expert at a
    layer (slider over the MoE layers), a layers x steps routing timeline that grows as tokens stream in, the
    selected token's router probabilities at every layer and its attention row (pick a token with the slider
    or click it in the strip or the timeline), prefill vs decode expert load next to random routing (k/E), and
    an expert-removal field that regenerates with the same seed and settings and shows both continuations
    side by side: where they diverge and each choice's log-probability.

    Generation streams through a callback (tokens appear before the routing captured with them, which is
    filled in when the run ends). ``interventions``: edits both runs keep (e.g. a router bias); removals are
    added to them, values only, so regenerating never recompiles. ``attention=False`` skips capturing the
    attention maps (a large model's prefill maps are big)."""

    def __init__(self, model, prompt, max_new_tokens: int = 32, *, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                 stop=None, interventions: Interventions | None = None, layer: int | None = None,
                 token: int | None = None, top: int | None = None, attention: bool = True, stream: bool = True,
                 min_interval: float = 0.1, width: int = COLUMN_WIDTH):
        t0 = time.perf_counter()
        self.model, self.cfg = model, model.cfg
        if not isinstance(prompt, str) and (np.ndim(prompt) != 1 or np.asarray(prompt).dtype.kind not in "iu"):
            raise ValueError("GenerationExplorer shows one prompt: give text or token ids [seq]")
        self.prompt = prompt
        # generate's "routing" set (a superset of what is drawn): the program a plain
        # generate(..., capture=["routing", "blocks.attn.pattern"], stream=True) compiles serves the view too
        self.capture = ("routing",) + ((ATTENTION,) if attention else ())
        self.gen_kwargs = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
        self.max_new_tokens = max_new_tokens
        self._iv0 = interventions if interventions is not None else Interventions.none(self.cfg)
        self.stream, self.min_interval, self.width = bool(stream), float(min_interval), int(width)
        self.generations, self.stream_draws = 0, []   # model calls; arrived step count at each streamed draw
        tok = model.tokenizer
        n_vocab = int(tok.vocab_size) if tok is not None else 0
        self._piece = lambda i: tok.id_to_piece(int(i)) if int(i) < n_vocab else str(int(i))
        E = self.cfg.num_experts
        self.layers = [int(l) for l in self.cfg.moe_layer_ids]
        self.num_layers = int(self.cfg.num_layers)
        layer = check_moe_layer("layer", self.layers[0] if layer is None else layer, self.layers, self.num_layers)
        choices = [t for t in TOP_CHOICES if t < E]
        top = (32 if E > 32 else 0) if top is None else top
        if top and top not in choices:
            raise ValueError(f"top={top!r} must be 0 (all experts) or one of {choices} (fewer than {E} experts)")
        self._init_view()
        self.state = GenerationState(layer=layer, top=top)
        self.cols = G.per_line(width)
        w_a, w_b = split(width, 55, 45)
        # controls
        self.layer_slider = moe_layer_slider("gv-gen-layer", self.layers, layer, width=340)
        self.token_slider = slider("gv-gen-token", "token", 0, 1, 0, width=340)
        self.top_select = W.Dropdown(options=[(f"all {E}", 0)] + [(f"top {t}", t) for t in choices], value=top,
                                     description="experts", layout=W.Layout(width="180px"))
        heads = [("mean", -1)] + [(f"h{h}", h) for h in range(self.cfg.num_q_heads)]
        self.head_select = W.Dropdown(options=heads, value=-1, description="head",
                                      layout=W.Layout(width="150px"))
        self.remove_field = W.Text(value="", description="remove", placeholder="experts at this layer: 3, 17, 90-95",
                                   continuous_update=False, layout=W.Layout(width="360px"))
        self.remove_field.add_class("gv-gen-remove")
        self.reset_button = W.Button(description="reset", layout=W.Layout(width="80px"))
        self.show_select = W.ToggleButtons(options=[("baseline", "baseline"), ("with removal", "removed")],
                                           value="baseline", description="show", disabled=True)
        self.show_select.add_class("gv-gen-show")
        self.seed_field = W.BoundedIntText(value=int(seed) if np.ndim(seed) == 0 else 0, min=0, max=2**32 - 1,
                                           description="seed", layout=W.Layout(width="180px"))
        self.seed_field.add_class("gv-gen-seed")
        self._quiet = False
        self.error = W.HTML("")
        self.status = W.HTML("")
        self.status.add_class("gv-gen-status")
        self.compare_html = W.HTML("")
        self.compare_html.add_class("gv-gen-compare")
        self.traces: dict[str, Trace] = {}
        self._partial: list[int] = []
        self._partial_first: list[np.ndarray] = []   # per arrived token: first-choice expert per MoE layer
        self._partial_gate: list[np.ndarray] = []
        self._last_draw = 0.0
        self.strip_fig = figure_widget(self._strip_pending(), width - 8)
        self.timeline_fig = figure_widget(self._timeline_pending(), w_a)
        self.figures = [self.strip_fig, self.timeline_fig]
        self.html_parts = [self.status, self.compare_html]
        self._finish([W.HBox([self.layer_slider, self.token_slider, *shown(self.top_select, choices),
                              *shown(self.head_select, attention)],
                             layout=W.Layout(flex_flow="row wrap")), self.status, self.strip_fig],
                     "gv-generation-explorer", width)
        # the first generation streams into the strip and the timeline, which are already in the view
        self.traces["baseline"] = self._generate(self._iv0, "baseline")
        n = len(self.traces["baseline"])
        self.state.token = check_index("token", n - 1 if token is None else token, n,
                                       f"the prompt and continuation have {n} tokens")
        self.token_slider.max, self.token_slider.value = n - 1, self.state.token
        self.probs_fig = figure_widget(self._probs(), w_b)
        self.attn_fig = figure_widget(self._attn(), w_a)
        self.load_fig = figure_widget(self._load(), w_b)
        self.compare_fig = figure_widget(self._compare(), width - 8)
        self.figures = [self.strip_fig, self.timeline_fig, self.probs_fig, self.attn_fig, self.load_fig,
                        self.compare_fig]
        sync(self.strip_fig, self._strip())
        sync(self.timeline_fig, self._timeline())
        self.status.value = self._status()
        self.compare_html.value = self._compare_text()
        self.seed_field.observe(self._on_seed, names="value")
        self.layer_slider.observe(self._on("layer", "strip", "timeline", "load", "removal"), names="value")
        self.token_slider.observe(self._on("token", "strip", "timeline", "probs", "attn"), names="value")
        self.top_select.observe(self._on("top", "probs", "load"), names="value")
        self.head_select.observe(self._on("head", "attn"), names="value")
        self.show_select.observe(self._on_show, names="value")
        self.remove_field.observe(self._on_remove_text, names="value")
        self.reset_button.on_click(lambda _: self.reset())
        self.strip_fig.data[0].on_click(self._click_strip)
        self.timeline_fig.data[0].on_click(self._click_timeline)
        self.children = (W.HBox([self.layer_slider, self.token_slider, *shown(self.top_select, choices),
                                 *shown(self.head_select, attention),
                                 self.seed_field], layout=W.Layout(flex_flow="row wrap")), self.status, self.strip_fig,
                         flex_row([self.timeline_fig, self.probs_fig], width),
                         flex_row([self.attn_fig, self.load_fig], width),
                         W.HBox([self.remove_field, self.reset_button, self.show_select, self.error],
                                layout=W.Layout(flex_flow="row wrap")), self.compare_html, self.compare_fig)
        self.build_s = time.perf_counter() - t0

    # --- generation ---
    def _generate(self, iv: Interventions, which: str) -> Trace:
        self._partial, self._partial_first, self._partial_gate, self._last_draw = [], [], [], 0.0
        self._streaming = which

        def sink(event):
            if not bool(event.alive[0]):
                return
            self._partial.append(int(event.tokens[0]))
            if event.experts is not None:  # the token's first-choice expert per MoE layer, drawn as it arrives
                self._partial_first.append(np.asarray(event.experts)[:, 0, 0])
                self._partial_gate.append(np.zeros(len(self.layers)) if event.gates is None
                                          else np.asarray(event.gates)[:, 0, 0])
            self.status.value = self._status_streaming(which)
            now = time.perf_counter()
            if self.stream and (now - self._last_draw >= self.min_interval
                                or len(self._partial) == self.max_new_tokens):
                self._last_draw = now
                self.stream_draws.append((which, len(self._partial)))
                if which == "removed":
                    sync(self.compare_fig, self._compare_pending())
                elif which == self.state.show:
                    sync(self.strip_fig, self._strip_pending())
                    sync(self.timeline_fig, self._timeline_pending())

        self.generations += 1
        # the program runs on generate's worker thread; its events are drawn here, on the kernel's thread
        stream = self.model.generate(self.prompt, self.max_new_tokens, capture=list(self.capture), interventions=iv,
                                     stream=True, **{**self.gen_kwargs, "seed": self.seed_field.value})
        try:
            for event in stream:
                sink(event)
            result = stream.result()
        finally:
            self._streaming = None
        return Trace(result, self.cfg, self._piece)

    def _prompt_ids(self) -> list[int]:
        if isinstance(self.prompt, str):
            return list(self.model.tokenizer.encode(self.prompt))
        return [int(i) for i in np.asarray(self.prompt)]

    # --- controls -> state ---
    def _on(self, field: str, *parts: str):
        def handler(change):
            if self._quiet:
                return
            setattr(self.state, field, change["new"])
            self._changed(*parts)
        return handler

    def _on_show(self, change) -> None:
        if self._quiet:
            return
        self.state.show = change["new"]
        self._changed(*MAIN)

    def _on_seed(self, change) -> None:
        self.gen_kwargs["seed"] = int(change["new"])
        self._changed("base")

    def _fit_token(self) -> None:
        """Keep the token slider within the shown continuation (no redraw of its own)."""
        n = len(self._trace())
        self.state.token = min(self.state.token, n - 1)
        self._quiet = True
        try:
            if self.token_slider.value > n - 1:
                self.token_slider.value = n - 1
            self.token_slider.max = n - 1
            self.token_slider.value = self.state.token
        finally:
            self._quiet = False

    def _on_remove_text(self, change) -> None:
        if self._quiet:
            return
        try:
            ids = parse_ids(change["new"], self.cfg.num_experts, "expert")
        except ValueError as e:
            self.error.value = f'<span style="color:#c00">{html.escape(str(e))}</span>'
            return
        err = self._set_removed(self.state.layer, ids)
        self.error.value = "" if err is None else f'<span style="color:#c00">{html.escape(err)}</span>'

    def _set_removed(self, layer: int, ids) -> str | None:
        new = {(l, e) for l, e in self.state.removed if l != layer} | {(layer, int(e)) for e in ids}
        if new == self.state.removed:
            return None
        try:
            self._removal_iv(new)
        except ValueError as e:
            return str(e)
        self.state.removed = new
        self._changed("regen", "removal")
        return None

    def _removal_iv(self, removed) -> Interventions:
        if not removed:
            return self._iv0
        ls, es = (np.asarray(v) for v in zip(*sorted(removed)))
        return self._iv0.remove_expert(ls, es)

    def _click_strip(self, trace, points, _state) -> None:
        if points.xs:
            i = int(points.ys[0]) * self.cols + int(points.xs[0])
            if i < len(self._trace()):
                self.set_token(i)

    def _click_timeline(self, trace, points, _state) -> None:
        if points.xs and int(points.xs[0]) < self._trace().n_gen:
            self.set_token(self._trace().n_prompt + int(points.xs[0]))

    def set_layer(self, layer: int) -> None:
        self.layer_slider.value = check_moe_layer("layer", layer, self.layers, self.num_layers)

    def set_token(self, token: int) -> None:
        n = len(self._trace())
        self.token_slider.value = check_index("token", token, n, f"the prompt and continuation have {n} tokens")

    def set_top(self, top: int) -> None:
        self.top_select.value = top

    def set_head(self, head: int | None) -> None:
        H = self.cfg.num_q_heads
        self.head_select.value = -1 if head is None else check_index("head", head, H, f"the model has {H} heads")

    def set_removed(self, layer: int, experts) -> None:
        """Remove exactly ``experts`` (ids, or text like "3, 17, 90-95") at MoE layer ``layer`` and regenerate."""
        layer = check_moe_layer("layer", layer, self.layers, self.num_layers)
        E = self.cfg.num_experts
        ids = parse_ids(experts, E) if isinstance(experts, str) else \
            [check_index("expert", e, E, f"the model has {E} experts") for e in experts]
        err = self._set_removed(layer, ids)
        if err is not None:
            raise ValueError(err)

    def set_seed(self, seed: int) -> None:
        """Regenerate with sampling seed ``seed`` (the removal run too): streams into the strip and timeline."""
        self.seed_field.value = check_index("seed", seed, 2**32, "seeds are uint32")

    def set_show(self, which: str) -> None:
        if which not in ("baseline", "removed"):
            raise ValueError(f"show must be 'baseline' or 'removed', got {which!r}")
        if which == "removed" and "removed" not in self.traces:
            raise ValueError("nothing is removed yet: set_removed(layer, experts) first")
        self.show_select.value = which

    def reset(self) -> None:
        if self.state.removed:
            self.state.removed = set()
            self._changed("regen", "removal")

    # --- state -> view ---
    def _draw(self, parts) -> None:
        if "base" in parts:
            self.traces["baseline"] = self._generate(self._iv0, "baseline")
            parts = parts | set(MAIN) | ({"regen"} if self.state.removed else set())
        if "regen" in parts:
            self.traces.pop("removed", None)
            if self.state.removed:
                self.traces["removed"] = self._generate(self._removal_iv(self.state.removed), "removed")
            elif self.state.show == "removed":
                self.state.show = "baseline"
                self._quiet = True
                try:
                    self.show_select.value = "baseline"
                finally:
                    self._quiet = False
            self.show_select.disabled = "removed" not in self.traces
            parts = parts | {"compare"} | (set(MAIN) if self.state.show == "removed" or not self.state.removed
                                           else set())
        self._fit_token()
        if "removal" in parts:
            self._quiet = True
            try:
                self.remove_field.value = format_ids(e for l, e in self.state.removed if l == self.state.layer)
            finally:
                self._quiet = False
        self.status.value = self._status()
        for part, fig, build in (("strip", self.strip_fig, self._strip),
                                 ("timeline", self.timeline_fig, self._timeline),
                                 ("probs", self.probs_fig, self._probs), ("attn", self.attn_fig, self._attn),
                                 ("load", self.load_fig, self._load), ("compare", self.compare_fig, self._compare)):
            if part in parts:
                sync(fig, build())
        if "compare" in parts:
            self.compare_html.value = self._compare_text()

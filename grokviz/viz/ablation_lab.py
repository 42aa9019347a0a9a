"""AblationLab: tick experts or heads off and watch the prediction, the loss and the routing change."""

from __future__ import annotations

import dataclasses

import ipywidgets as W
import jax
import jax.numpy as jnp
import numpy as np

from ..analysis.common import last_real_position, next_token_kl, next_token_loss
from ..api import Run
from ..interventions import Interventions
from . import figures as F
from .base import COLUMN_WIDTH, View, check_index, figure_widget, flex_row, real_positions, split, sync

CAPTURE = ("blocks.moe.top_k_experts",)


@dataclasses.dataclass
class AblationState:
    removed: set = dataclasses.field(default_factory=set)   # {(layer, expert)}
    heads: set = dataclasses.field(default_factory=set)     # {(layer, head)}
    mode: str = "remove"                                    # "remove": reroute; "zero": keep routing, zero output

    def interventions(self, base: Interventions) -> Interventions:
        """``base`` with this state's ablations added (same shapes as ``base``: never recompiles)."""
        rm = np.array(base.expert_remove, bool)
        scale = np.array(base.expert_scale, np.float32)
        heads = np.array(base.head_scale, np.float32)
        for l, e in self.removed:
            if self.mode == "remove":
                rm[l, e] = True
            else:
                scale[l, e] = 0.0
        for l, h in self.heads:
            heads[l, h] = 0.0
        # jax arrays like Interventions.none's: a numpy leaf would be a new entry in jit's dispatch cache
        return dataclasses.replace(base, expert_remove=jnp.asarray(rm), expert_scale=jnp.asarray(scale),
                                   head_scale=jnp.asarray(heads))


def _probs(logits: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1), np.float64)


class AblationLab(View):
    """Checkboxes (layers x experts) and head toggles; each change re-runs the model once with the intervention
    (values only: no recompile) and shows the change in next-token distribution, loss and routing.

    ``source``: a Model (run on ``prompt``) or a Run, whose settings (interventions included: the ablations are
    added to them, top_k, attention, bucketing) every re-run keeps."""

    def __init__(self, source, prompt=None, *, row: int = 0, show_heads: bool = True, width: int = COLUMN_WIDTH):
        if isinstance(source, Run):
            base_run = source if prompt is None else source.model.run(prompt, **source.settings())
        elif prompt is None:
            raise ValueError("give a prompt (text or token ids [batch, seq]) to run the model on")
        else:
            # with (empty) interventions from the start, so ablating later re-uses this run's compiled program
            base_run = source.run(prompt, capture=list(CAPTURE), interventions=Interventions.none(source.cfg))
        if not frozenset(CAPTURE) <= base_run.capture:
            base_run = base_run.rerun(capture=sorted(base_run.capture | set(CAPTURE)))
        self.model, self.cfg, self._base_run = base_run.model, base_run.cfg, base_run
        self.pos = real_positions(base_run, row)
        self.row = row
        self._iv0 = base_run.interventions if base_run.interventions is not None else Interventions.none(self.cfg)
        self._init_view()
        self.state = AblationState()
        self.runs = 0                                   # model runs since construction (one per change)
        self.base = self.current = self._measure(base_run)
        self.str_tokens = base_run.str_tokens(row)
        self.vocab_labels = _VocabLabels(self.model)
        L, E, H = self.cfg.num_layers, self.cfg.num_experts, self.cfg.num_q_heads
        self.expert_boxes, self.head_boxes = {}, {}
        rows = []
        for l in range(L):
            boxes = []
            for e in range(E):
                cb = W.Checkbox(value=False, description=f"E{e}", indent=False, layout=W.Layout(width="52px"))
                cb.add_class("gv-ablation-checkbox")
                cb.observe(lambda ch, l=l, e=e: self._on_expert(l, e, ch["new"]), names="value")
                self.expert_boxes[l, e] = cb
                boxes.append(cb)
            rows.append(self._control_row(l, boxes))
        head_rows = []
        for l in range(L if show_heads else 0):
            boxes = []
            for h in range(H):
                tb = W.ToggleButton(value=False, description=f"h{h}", tooltip=f"ablate layer {l} head {h}",
                                    layout=W.Layout(width="48px"))
                tb.add_class("gv-head-toggle")
                tb.observe(lambda ch, l=l, h=h: self._on_head(l, h, ch["new"]), names="value")
                self.head_boxes[l, h] = tb
                boxes.append(tb)
            head_rows.append(self._control_row(l, boxes))
        self.mode_select = W.ToggleButtons(options=[("remove (reroute)", "remove"), ("zero output", "zero")],
                                           value="remove", description="experts")
        self.mode_select.add_class("gv-ablation-mode")
        self.mode_select.observe(self._on_mode, names="value")
        self.reset_button = W.Button(description="reset")
        self.reset_button.on_click(lambda _: self.reset())
        self.summary = W.HTML(self._summary())
        self.summary.add_class("gv-ablation-summary")
        w_dist, w_route = split(width, 52, 48)
        self.dist_fig = figure_widget(self._dist(), w_dist)
        self.route_fig = figure_widget(self._route(), w_route)
        self.figures = [self.dist_fig, self.route_fig]
        self.html_parts = [self.summary]
        controls = W.VBox([W.HBox([self.mode_select, self.reset_button], layout=W.Layout(flex_flow="row wrap")),
                           W.Label("experts"), *rows] + ([W.Label("attention heads")] + head_rows if head_rows else []))
        self._finish([controls, self.summary, flex_row([self.dist_fig, self.route_fig], width)],
                     "gv-ablation-lab", width)

    @staticmethod
    def _control_row(layer: int, boxes) -> W.HBox:
        return W.HBox([W.Label(f"layer {layer}", layout=W.Layout(width="60px", flex="0 0 auto")),
                       W.HBox(boxes, layout=W.Layout(flex_flow="row wrap"))])

    def _measure(self, run: Run) -> dict:
        logits = np.asarray(run.logits)
        return dict(run=run, logits=logits, real=run.real,
                    first=np.asarray(run.cache["blocks.moe.top_k_experts"])[..., 0],   # [layer, batch, seq]
                    loss=float(next_token_loss(logits, run.tokens, self.cfg.pad_token)))

    # --- controls -> state (each change runs the model once) ---
    def _on_expert(self, layer, expert, on) -> None:
        (self.state.removed.add if on else self.state.removed.discard)((layer, expert))
        self._changed("run")

    def _on_head(self, layer, head, on) -> None:
        (self.state.heads.add if on else self.state.heads.discard)((layer, head))
        self._changed("run")

    def _on_mode(self, change) -> None:
        self.state.mode = change["new"]
        if self.state.removed:
            self._changed("run")
        else:
            self._changed("summary")

    def toggle_expert(self, layer: int, expert: int, on: bool = True) -> None:
        L, E = self.cfg.num_layers, self.cfg.num_experts
        key = (check_index("layer", layer, L, f"the model has {L} layers"),
               check_index("expert", expert, E, f"the model has {E} experts"))
        self.expert_boxes[key].value = bool(on)

    def toggle_head(self, layer: int, head: int, on: bool = True) -> None:
        L, H = self.cfg.num_layers, self.cfg.num_q_heads
        key = (check_index("layer", layer, L, f"the model has {L} layers"),
               check_index("head", head, H, f"the model has {H} query heads"))
        if key in self.head_boxes:
            self.head_boxes[key].value = bool(on)
        elif bool(on) != (key in self.state.heads):      # heads not shown as toggles
            self._on_head(*key, on)

    def set_mode(self, mode: str) -> None:
        if mode not in ("remove", "zero"):
            raise ValueError(f"mode must be 'remove' or 'zero', got {mode!r}")
        self.mode_select.value = mode

    def reset(self) -> None:
        """Clear every ablation: one model run at most (none when nothing was ablated)."""
        with self.hold():
            for w in [*self.expert_boxes.values(), *self.head_boxes.values()]:
                w.value = False
            if self.state.heads:                          # heads without toggles
                self.state.heads.clear()
                self._changed("run")

    # --- state -> view ---
    def _draw(self, parts) -> None:
        if "run" in parts:
            self.runs += 1
            self.current = self._measure(self._base_run.rerun(interventions=self.state.interventions(self._iv0),
                                                              capture=list(CAPTURE)))
        self.summary.value = self._summary()
        if "run" in parts:
            sync(self.dist_fig, self._dist())
            sync(self.route_fig, self._route())

    def _last(self) -> int:
        return int(last_real_position(self._base_run.tokens, self.cfg.pad_token)[self.row])

    def _kl(self) -> float:
        r, last = self.row, self._last()
        pick = [last, last]     # next_token_kl compares positions 0..seq-2: a two-position slice gives `last`
        return float(next_token_kl(self.base["logits"][r:r + 1, pick], self.current["logits"][r:r + 1, pick])[0, 0])

    def _summary(self) -> str:
        b, c = self.base, self.current
        what = ", ".join([f"L{l}E{e}" for l, e in sorted(self.state.removed)]
                         + [f"L{l}h{h}" for l, h in sorted(self.state.heads)]) or "nothing"
        changed = float((self._first(b) != self._first(c)).mean())
        return (f"<b>ablated ({self.state.mode}):</b> {what} &nbsp; <b>loss</b> {b['loss']:.4f} \u2192 "
                f"{c['loss']:.4f} ({c['loss'] - b['loss']:+.4f}) &nbsp; <b>KL(next token)</b> {self._kl():.4f} "
                f"&nbsp; <b>routing changed</b> {changed:.1%}")

    def _first(self, m: dict) -> np.ndarray:
        return m["first"][:, self.row, self.pos]           # [layer, real tokens of the row]

    def _dist(self):
        r, last = self.row, self._last()
        extra = f" after token {last} {F.show_token(self.str_tokens[last])!r} (KL {self._kl():.3f})"
        return F.next_token_change(_probs(self.base["logits"][r, last]), _probs(self.current["logits"][r, last]),
                                   self.vocab_labels, title_extra=extra)

    def _route(self):
        return F.routing_change(self._first(self.base), self._first(self.current),
                                [self.str_tokens[p] for p in self.pos], self.cfg.num_experts)


class _VocabLabels:
    """Token id -> piece, looked up lazily (a real vocabulary has 131k entries; a plot shows about 20)."""

    def __init__(self, model):
        self.tok = model.tokenizer
        self.n = int(self.tok.vocab_size) if self.tok is not None else 0

    def __getitem__(self, i: int) -> str:
        i = int(i)
        return self.tok.id_to_piece(i) if i < self.n else str(i)

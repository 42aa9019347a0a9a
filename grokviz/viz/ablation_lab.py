"""AblationLab: take experts or heads out and watch the prediction, the loss and the routing change.

The expert mode control offers the three named ablations (grokviz.interventions.ABLATIONS), stored by those
names: ``"route_around"`` (the router skips the expert, the next-best takes its slot), ``"contribution"`` (its
output x 0, routing unchanged) and ``"swap"`` (its slots run another expert at the same gates; the ``to`` menu
picks the target, by default the next expert ``e + 1 mod E``)."""

from __future__ import annotations

import dataclasses
import html

import ipywidgets as W
import jax
import numpy as np

from ..analysis.common import last_real_position, next_token_kl, next_token_loss
from ..api import Run
from ..interventions import Interventions
from . import figures as F
from .base import (
    COLUMN_WIDTH,
    View,
    check_index,
    check_moe_layer,
    figure_widget,
    flex_row,
    real_positions,
    routing_layers,
    split,
    sync,
)
from .scale import format_ids, parse_ids

CAPTURE = ("blocks.moe.top_k_experts",)
CHECKBOX_MAX = 16      # up to this many experts, the selected layer also gets one checkbox per expert


@dataclasses.dataclass
class AblationState:
    removed: set = dataclasses.field(default_factory=set)   # {(layer, expert)}, layer = a MoE layer's number
    heads: set = dataclasses.field(default_factory=set)     # {(layer, head)}
    mode: str = "route_around"      # one of interventions.ABLATIONS: route_around, contribution (x 0) or swap
    layer: int = 0                                          # the layer the controls edit
    # the swap target (-1: the next expert, e + 1 mod E); a plain attribute, not a field, so the view's repr
    # keeps its form (the summary line names the target)
    swap_to = -1

    def interventions(self, base: Interventions) -> Interventions:
        """``base`` with this state's ablations added (same shapes as ``base``: never recompiles)."""
        iv = base
        if self.removed:
            ls, es = (np.asarray(v) for v in zip(*sorted(self.removed)))
            if self.mode == "swap":
                E = base.expert_swap.shape[-1]
                to = (es + 1) % E if self.swap_to < 0 else np.full_like(es, self.swap_to)
                iv = iv.ablate_expert(ls, es, how="swap", to=to)
            else:
                iv = iv.ablate_expert(ls, es, how=self.mode)
        if self.heads:
            ls, hs = (np.asarray(v) for v in zip(*sorted(self.heads)))
            iv = iv.ablate_head(ls, hs)
        return iv

    def at(self, which: str, layer: int) -> list[int]:
        """The experts (``which="removed"``) or heads ablated at ``layer``."""
        return sorted(i for l, i in getattr(self, which) if l == layer)


def _probs(logits: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1), np.float64)


class _IdPicker:
    """Which ids (experts or heads) are ablated at the edited layer: a text field ("3, 17, 90-95") and, for a few
    ids, one box per id, kept in step. ``commit(ids)`` is told of each user change and returns an error text
    (the change is refused and shown) or None; :meth:`show` puts ids in the controls without telling it."""

    def __init__(self, what: str, n: int, css: str, commit, current, make_box):
        self.what, self.n, self._commit, self._current, self._quiet = what, n, commit, current, False
        self.text = W.Text(value="", description=f"{what}s", placeholder="none; e.g. 3, 17, 90-95",
                           continuous_update=False, layout=W.Layout(width="340px"))
        self.text.add_class(f"gv-ablation-{what}s")
        self.error = W.HTML("")
        self.error.add_class("gv-ablation-error")
        self.boxes = {}
        for i in range(n if n <= CHECKBOX_MAX else 0):
            box = make_box(i)
            box.add_class(css)
            box.observe(self._on_box, names="value")
            self.boxes[i] = box
        self.text.observe(self._on_text, names="value")
        self.widget = W.VBox([W.HBox([self.text, self.error], layout=W.Layout(flex_flow="row wrap")),
                              W.HBox(list(self.boxes.values()), layout=W.Layout(flex_flow="row wrap"))])

    def show(self, ids, enabled: bool = True) -> None:
        ids = set(ids)
        self._quiet = True
        try:
            self.text.value = format_ids(ids)
            self.text.disabled = not enabled
            for i, box in self.boxes.items():
                box.value, box.disabled = i in ids, not enabled
        finally:
            self._quiet = False

    def _on_text(self, change) -> None:
        if self._quiet:
            return
        try:
            ids = parse_ids(change["new"], self.n, self.what)
        except ValueError as e:
            self.error.value = f'<span style="color:#c00">{html.escape(str(e))}</span>'
            return
        self._apply(ids)

    def _on_box(self, change) -> None:
        if not self._quiet and self._apply([i for i, box in self.boxes.items() if box.value]):
            self.show(self._current())                    # a refused tick is taken back (a typed text stays)

    def _apply(self, ids) -> bool:
        err = self._commit(ids)
        self.error.value = "" if err is None else f'<span style="color:#c00">{html.escape(err)}</span>'
        return err is not None


class AblationLab(View):
    """Remove or zero experts and ablate attention heads, one layer at a time: a layer menu (every layer; dense
    ones have heads only), an expert field and a head field taking lists and ranges ("3, 17, 90-95"; a model
    with up to 16 experts or heads also gets one checkbox/toggle each), the mode and reset. A handful of
    controls whatever the model's size. Each change re-runs the model once with the intervention (values
    only: no recompile) and shows the change in next-token distribution, loss and routing.

    ``source``: a Model (run on ``prompt``) or a Run, whose settings (interventions included: the ablations are
    added to them, top_k, attention, bucketing) every re-run keeps."""

    def __init__(self, source, prompt=None, *, row: int = 0, layer: int | None = None, show_heads: bool = True,
                 width: int = COLUMN_WIDTH):
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
        self.layers, self.num_layers = routing_layers(base_run)
        self._iv0 = base_run.interventions if base_run.interventions is not None else Interventions.none(self.cfg)
        self._init_view()
        L = self.num_layers
        layer = self.layers[0] if layer is None else check_index("layer", layer, L, f"the model has {L} layers")
        self.state = AblationState(layer=layer)
        self.runs = 0                                   # model runs since construction (one per change)
        self.base = self.current = self._measure(base_run)
        self.str_tokens = base_run.str_tokens(row)
        self.vocab_labels = _VocabLabels(self.model)
        E, H = self.cfg.num_experts, self.cfg.num_q_heads
        dense = set(range(L)) - set(self.layers)
        self.layer_select = W.Dropdown(options=[(f"{l} (dense: heads only)" if l in dense else str(l), l)
                                                for l in range(L)], value=layer, description="layer",
                                       layout=W.Layout(width="240px"))
        self.layer_select.add_class("gv-ablation-layer")
        self.expert_picker = _IdPicker("expert", E, "gv-ablation-checkbox", lambda ids: self._set("removed", ids),
                                       lambda: self.state.at("removed", self.state.layer),
                                       lambda e: W.Checkbox(value=False, description=f"E{e}", indent=False,
                                                            layout=W.Layout(width="52px")))
        self.head_picker = _IdPicker("head", H, "gv-head-toggle", lambda ids: self._set("heads", ids),
                                     lambda: self.state.at("heads", self.state.layer),
                                     lambda h: W.ToggleButton(value=False, description=f"h{h}",
                                                              tooltip=f"ablate head {h} of the layer",
                                                              layout=W.Layout(width="48px")))
        self.expert_boxes, self.head_boxes = self.expert_picker.boxes, self.head_picker.boxes   # edited layer's
        self.mode_select = W.ToggleButtons(options=[("route around", "route_around"),
                                                    ("contribution (x 0)", "contribution"), ("swap", "swap")],
                                           value="route_around", description="experts",
                                           tooltips=["dropped from the top-k; the next-best expert takes its slot",
                                                     "its gated output x 0; routing unchanged",
                                                     "its slots run the 'to' expert at the same gates"])
        self.mode_select.add_class("gv-ablation-mode")
        self.mode_select.observe(self._on_mode, names="value")
        self.swap_select = W.Dropdown(options=[("next (e+1)", -1)] + [(f"E{e}", e) for e in range(E)], value=-1,
                                      description="to", disabled=True, layout=W.Layout(width="160px"))
        self.swap_select.add_class("gv-ablation-swap-to")
        self.swap_select.observe(self._on_swap_to, names="value")
        self.layer_select.observe(self._on_layer, names="value")
        self.reset_button = W.Button(description="reset")
        self.reset_button.on_click(lambda _: self.reset())
        self.summary = W.HTML(self._summary())
        self.summary.add_class("gv-ablation-summary")
        self._show_layer()
        w_dist, w_route = split(width, 52, 48)
        self.dist_fig = figure_widget(self._dist(), w_dist)
        self.route_fig = figure_widget(self._route(), w_route)
        self.figures = [self.dist_fig, self.route_fig]
        self.html_parts = [self.summary]
        controls = W.VBox([W.HBox([self.layer_select, self.mode_select, self.swap_select, self.reset_button],
                                  layout=W.Layout(flex_flow="row wrap")),
                           self.expert_picker.widget] + ([self.head_picker.widget] if show_heads else []))
        self._finish([controls, self.summary, flex_row([self.dist_fig, self.route_fig], width)],
                     "gv-ablation-lab", width)

    def _measure(self, run: Run) -> dict:
        logits = np.asarray(run.logits)
        return dict(run=run, logits=logits, real=run.real,
                    first=np.asarray(run.cache["blocks.moe.top_k_experts"])[..., 0],   # [layer, batch, seq]
                    loss=float(next_token_loss(logits, run.tokens, self.cfg.pad_token)))

    # --- controls -> state (each change runs the model once) ---
    def _on_layer(self, change) -> None:
        self.state.layer = int(change["new"])
        self._show_layer()

    def _show_layer(self) -> None:
        l = self.state.layer
        self.expert_picker.show(self.state.at("removed", l), enabled=l in self.layers)
        self.head_picker.show(self.state.at("heads", l))

    def _set(self, which: str, ids, layer: int | None = None) -> str | None:
        """Make ``ids`` the ablated experts/heads at ``layer`` (default: the edited one); one run when that
        changes anything. Returns an error text (nothing changed) when the intervention is refused."""
        layer = self.state.layer if layer is None else layer
        if which == "removed" and ids and layer not in self.layers:
            return f"layer {layer} is a dense MLP layer: it has no experts"
        new = {(l, i) for l, i in getattr(self.state, which) if l != layer} | {(layer, int(i)) for i in ids}
        if new == getattr(self.state, which):
            return None
        trial = dataclasses.replace(self.state, **{which: new})
        try:
            trial.interventions(self._iv0)
        except ValueError as e:
            return str(e)
        setattr(self.state, which, new)
        if layer == self.state.layer:
            self._show_layer()
        self._changed("run")
        return None

    def _on_mode(self, change) -> None:
        self.state.mode = change["new"]
        self.swap_select.disabled = change["new"] != "swap"
        if self.state.removed:
            self._changed("run")
        else:
            self._changed("summary")

    def _on_swap_to(self, change) -> None:
        self.state.swap_to = int(change["new"])
        self._changed("run" if self.state.removed and self.state.mode == "swap" else "summary")

    def select_layer(self, layer: int) -> None:
        """Edit ``layer`` in the controls (nothing is re-run)."""
        L = self.num_layers
        self.layer_select.value = check_index("layer", layer, L, f"the model has {L} layers")

    def set_experts(self, layer: int, experts) -> None:
        """Ablate exactly ``experts`` (ids, or text like "3, 17, 90-95") at MoE layer ``layer``: one run."""
        self._set_checked("removed", check_moe_layer("layer", layer, self.layers, self.num_layers), experts,
                          self.cfg.num_experts, "expert")

    def set_heads(self, layer: int, heads) -> None:
        """Ablate exactly ``heads`` (ids, or text like "0, 5-7") at ``layer``: one run."""
        L = self.num_layers
        self._set_checked("heads", check_index("layer", layer, L, f"the model has {L} layers"), heads,
                          self.cfg.num_q_heads, "head")

    def _set_checked(self, which, layer, ids, n, what) -> None:
        if isinstance(ids, str):
            ids = parse_ids(ids, n, what)
        else:
            ids = [check_index(what, i, n, f"the model has {n} {what}s") for i in ids]
        err = self._set(which, ids, layer)
        if err is not None:
            raise ValueError(err)

    def toggle_expert(self, layer: int, expert: int, on: bool = True) -> None:
        E = self.cfg.num_experts
        layer = check_moe_layer("layer", layer, self.layers, self.num_layers)
        expert = check_index("expert", expert, E, f"the model has {E} experts")
        ids = set(self.state.at("removed", layer))
        self.set_experts(layer, sorted(ids | {expert} if on else ids - {expert}))

    def toggle_head(self, layer: int, head: int, on: bool = True) -> None:
        L, H = self.num_layers, self.cfg.num_q_heads
        layer = check_index("layer", layer, L, f"the model has {L} layers")
        head = check_index("head", head, H, f"the model has {H} query heads")
        ids = set(self.state.at("heads", layer))
        self.set_heads(layer, sorted(ids | {head} if on else ids - {head}))

    def set_mode(self, mode: str, to: int | None = None) -> None:
        """The expert ablation: ``"route_around"`` (or ``"remove"``), ``"contribution"`` (or ``"zero"``) or
        ``"swap"`` (``to``: the target expert; default the next one, e + 1 mod E)::

            lab.set_mode("swap", to=3)
        """
        from ..interventions import ablation_name

        name = ablation_name(mode)
        if to is not None:
            if name != "swap":
                raise ValueError("to= (the swap target) goes with mode 'swap' only")
            self.swap_select.value = check_index("to", to, self.cfg.num_experts,
                                                 f"the model has {self.cfg.num_experts} experts")
        self.mode_select.value = name

    def reset(self) -> None:
        """Clear every ablation: one model run at most (none when nothing was ablated)."""
        if self.state.removed or self.state.heads:
            self.state.removed, self.state.heads = set(), set()
            self._show_layer()
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
        what = "; ".join([f"L{l} E{format_ids(self.state.at('removed', l))}"
                          for l in sorted({l for l, _ in self.state.removed})]
                         + [f"L{l} h{format_ids(self.state.at('heads', l))}"
                            for l in sorted({l for l, _ in self.state.heads})]) or "nothing"
        changed = float((self._first(b) != self._first(c)).mean())
        # the stored mode names (interventions.ABLATIONS), as the browser test reads them
        mode = self.state.mode if self.state.mode != "swap" else "swap to " + (
            "next" if self.state.swap_to < 0 else f"E{self.state.swap_to}")
        return (f"<b>ablated ({mode}):</b> {what} &nbsp; <b>loss</b> {b['loss']:.4f} \u2192 "
                f"{c['loss']:.4f} ({c['loss'] - b['loss']:+.4f}) &nbsp; <b>KL(next token)</b> {self._kl():.4f} "
                f"&nbsp; <b>routing changed</b> {changed:.1%}")

    def _first(self, m: dict) -> np.ndarray:
        return m["first"][:, self.row, self.pos]           # [MoE layer, real tokens of the row]

    def _dist(self):
        r, last = self.row, self._last()
        extra = f" after token {last} {F.show_token(self.str_tokens[last])!r} (KL {self._kl():.3f})"
        return F.next_token_change(_probs(self.base["logits"][r, last]), _probs(self.current["logits"][r, last]),
                                   self.vocab_labels, title_extra=extra)

    def _route(self):
        return F.routing_change(self._first(self.base), self._first(self.current),
                                [self.str_tokens[p] for p in self.pos], self.cfg.num_experts,
                                layers=self.layers, num_layers=self.num_layers)


class _VocabLabels:
    """Token id -> piece, looked up lazily (a real vocabulary has 131k entries; a plot shows about 20)."""

    def __init__(self, model):
        self.tok = model.tokenizer
        self.n = int(self.tok.vocab_size) if self.tok is not None else 0

    def __getitem__(self, i: int) -> str:
        i = int(i)
        return self.tok.id_to_piece(i) if i < self.n else str(i)

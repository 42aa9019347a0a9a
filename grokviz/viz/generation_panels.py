"""What each panel of the :class:`~grokviz.viz.generation_explorer.GenerationExplorer` shows, built from its
state and its traces (the figures themselves are pure functions in :mod:`.generation_figures` and
:mod:`.figures`): the token strip and the routing timeline (also while tokens stream in), the router
probabilities, attention row and load of the selected token, the status line and the side-by-side comparison of
the baseline and the regeneration with experts removed."""

from __future__ import annotations

import html

import numpy as np

from . import figures as F
from . import generation_figures as G
from .generation_trace import Trace, compare_html
from .scale import format_ids


class GenerationPanels:
    """The panel builders of the GenerationExplorer (a mixin: it reads the explorer's ``state``, ``traces``,
    ``cfg``, ``model``, ``layers``, ``num_layers``, ``max_new_tokens``, ``cols``, ``gen_kwargs``, ``_piece``,
    ``_prompt_ids`` and the streamed ``_partial*`` lists; it changes nothing)."""

    def _trace(self) -> Trace:
        return self.traces[self.state.show]

    def _status_streaming(self, which: str) -> str:
        text = html.escape(self.model.tokenizer.decode(self._partial)) if self.model.tokenizer else \
            " ".join(map(str, self._partial))
        return (f"<b>generating ({which})</b> {len(self._partial)} / {self.max_new_tokens} tokens: "
                f"<span style='font-family:monospace'>{text}</span>")

    def _status(self) -> str:
        t = self._trace()
        s = self.gen_kwargs
        return (f"<b>{t.n_gen}</b> new tokens after a {t.n_prompt}-token prompt (temperature {s['temperature']}, "
                f"top_p {s['top_p']}, top_k {s['top_k']}, seed {s['seed']}); showing <b>{self.state.show}</b>; "
                f"mean log p {t.logprob.mean() if t.n_gen else 0:.3f}")

    def _strip_pending(self):
        ids = self._prompt_ids() + list(self._partial)
        n_p = len(ids) - len(self._partial)
        first, gate = np.full(len(ids), -1), np.zeros(len(ids))
        if self._partial_first:  # generated tokens whose routing has arrived are coloured already
            li = self.layers.index(self.state.layer)
            first[n_p:n_p + len(self._partial_first)] = [f[li] for f in self._partial_first]
            gate[n_p:n_p + len(self._partial_gate)] = [g[li] for g in self._partial_gate]
        return G.token_strip([self._piece(i) for i in ids], first, gate, n_p,
                             self.state.layer, self.cfg.num_experts, total=n_p + self.max_new_tokens, cols=self.cols)

    def _timeline_pending(self):
        n = len(self._partial)
        first, gates = np.full((len(self.layers), n), -1), np.zeros((len(self.layers), n))
        if self._partial_first:
            first[:, :len(self._partial_first)] = np.stack(self._partial_first, axis=1)
            gates[:, :len(self._partial_gate)] = np.stack(self._partial_gate, axis=1)
        return G.routing_timeline(first, gates,
                                  [self._piece(i) for i in self._partial], self.cfg.num_experts,
                                  steps=self.max_new_tokens, layers=self.layers, num_layers=self.num_layers,
                                  layer=self.state.layer)

    def _strip(self):
        t, i = self._trace(), self.layers.index(self.state.layer)
        return G.token_strip(t.pieces, t.experts[i, :, 0], t.gates[i, :, 0], t.n_prompt, self.state.layer,
                             self.cfg.num_experts, selected=self.state.token,
                             total=t.n_prompt + self.max_new_tokens, cols=self.cols)

    def _timeline(self):
        t = self._trace()
        sel = self.state.token - t.n_prompt
        return G.routing_timeline(t.experts[:, t.n_prompt:, 0], t.gates[:, t.n_prompt:, 0], t.pieces[t.n_prompt:],
                                  self.cfg.num_experts, steps=self.max_new_tokens, layers=self.layers,
                                  num_layers=self.num_layers, selected=sel if sel >= 0 else None,
                                  layer=self.state.layer)

    def _probs(self):
        t, i = self._trace(), self.state.token
        return F.router_probs_by_layer(t.probs[:, i], t.experts[:, i], t.gates[:, i], t.pieces[i], i,
                                       layers=self.layers, num_layers=self.num_layers, top=self.state.top or None)

    def _attn(self):
        t, i = self._trace(), self.state.token
        head = None if self.state.head < 0 else self.state.head
        att = t.attention(i, head) if t.has_attention else np.zeros((self.num_layers, i + 1))
        return G.attention_row(att, t.pieces, t.n_prompt, i, t.pieces[i], head)

    def _load(self):
        t = self._trace()
        pre, dec = t.load(self.state.layer, self.cfg.top_k)
        return G.load_vs_random(pre, dec, self.cfg.top_k, self.state.layer, n_prefill=t.n_prompt,
                                n_decode=t.n_gen, top=self.state.top or None)

    def _what(self) -> str:
        by = {}
        for l, e in sorted(self.state.removed):
            by.setdefault(l, []).append(e)
        return "; ".join(f"L{l} E{format_ids(es)}" for l, es in by.items())

    def _pair(self):
        base, new = self.traces["baseline"], self.traces.get("removed")
        a = base.ids[base.n_prompt:].tolist()
        div = G.first_divergence(a, new.ids[new.n_prompt:].tolist()) if new is not None else None
        return base, new, div

    def _compare_pending(self):
        base = self.traces["baseline"]
        return G.continuations(base.pieces[base.n_prompt:], base.logprob, [self._piece(i) for i in self._partial],
                               np.zeros(len(self._partial)), None, steps=self.max_new_tokens,
                               what=self._what(), pending=True)

    def _compare(self):
        base, new, div = self._pair()
        return G.continuations(base.pieces[base.n_prompt:], base.logprob,
                               None if new is None else new.pieces[new.n_prompt:],
                               None if new is None else new.logprob, div, steps=self.max_new_tokens,
                               what=self._what() if new is not None else "")

    def _compare_text(self) -> str:
        base, new, div = self._pair()
        return compare_html(base, new, div, self._what())

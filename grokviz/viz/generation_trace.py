"""The host-side view of one generated row that the generation explorer draws from, indexed by token."""

from __future__ import annotations

import html

import numpy as np

from .scale import show_token

ATTENTION = "blocks.attn.pattern"


def _routing_rows(n_rows: int, cfg) -> list[int]:
    """The layer number of each row of a routing capture: every layer, or the MoE layers only."""
    if n_rows == cfg.num_layers:
        return list(range(n_rows))
    if n_rows == len(cfg.moe_layer_ids):
        return [int(l) for l in cfg.moe_layer_ids]
    raise ValueError(f"a routing capture has {n_rows} layer rows; the model has {cfg.num_layers} layers of which "
                     f"{len(cfg.moe_layer_ids)} are MoE layers")


class Trace:
    """One generated row on the host, indexed by token: the row's real prompt tokens, then its new tokens."""

    def __init__(self, result, cfg, pieces, row: int = 0):
        P, n_p, n_g = result.prompt_width, int(result.prompt_lengths[row]), int(result.lengths[row])
        self.result, self.n_prompt, self.n_gen = result, n_p, n_g
        self.ids = np.concatenate([result.prompt[row, P - n_p:], result.tokens[row, :n_g]]).astype(np.int64)
        self.pieces = [pieces(i) for i in self.ids]
        pre, steps = result.prefill, result.steps

        def both(name):   # [routing layer, token, ...]
            a = np.asarray(pre[name])[:, row, P - n_p:]
            b = np.moveaxis(np.asarray(steps[name])[:n_g, :, row], 0, 1)
            return np.concatenate([a, b], axis=1)

        self.experts, self.gates = both("blocks.moe.top_k_experts"), both("blocks.moe.top_k_weights")
        self.probs = both("blocks.moe.router_probs")
        self.layers = _routing_rows(self.experts.shape[0], cfg)
        self.logprob = np.asarray(result.logprobs[row, :n_g], np.float64)
        self.top_ids = np.asarray(result.top_ids[row, :n_g])
        self.top_logprobs = np.asarray(result.top_logprobs[row, :n_g], np.float64)
        self.has_attention = ATTENTION in steps and ATTENTION in pre
        if self.has_attention:
            self._att_pre = np.asarray(pre[ATTENTION])[:, row]              # [layer, head, P, slots]
            self._att_steps = np.asarray(steps[ATTENTION])[:n_g, :, row]     # [step, layer, head, slots]
            self._slots = np.concatenate([np.arange(P - n_p, P), P + np.arange(n_g)])
        self._P = P

    def __len__(self) -> int:
        return len(self.ids)

    def attention(self, i: int, head: int | None) -> np.ndarray:
        """[layer, i + 1]: token ``i``'s attention over tokens 0..i (one head, or the mean over heads)."""
        if i < self.n_prompt:
            a = self._att_pre[:, :, self._P - self.n_prompt + i]
        else:
            a = self._att_steps[i - self.n_prompt]
        a = a[..., self._slots[:i + 1]]
        return a.mean(axis=1) if head is None else a[:, head]

    def load(self, layer: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Fractions [expert] of the prompt's and of the generated tokens sent to each expert at ``layer``."""
        ex = self.experts[self.layers.index(layer)]
        E = self.probs.shape[-1]
        out = []
        for part in (ex[:self.n_prompt], ex[self.n_prompt:]):
            counts = np.bincount(part.reshape(-1), minlength=E)[:E]
            out.append(counts / max(len(part), 1))
        return out[0], out[1]


def _text(t: Trace, at: int | None) -> str:
    pieces = [html.escape(p.replace("\u2581", " ")) for p in t.pieces[t.n_prompt:]]
    if at is None:
        return "".join(pieces)
    return "".join(pieces[:at]) + "<span style='background:#fdd'>" + "".join(pieces[at:]) + "</span>"


def choice_text(base: Trace, new: Trace, d: int) -> str:
    """What each continuation chose at its first divergence ``d``, with log-probabilities (plain text)."""
    def choice(t, name):
        if d >= t.n_gen:
            return f"{name} had stopped"
        return f"{name} chose {show_token(t.pieces[t.n_prompt + d])!r} (log p {t.logprob[d]:.3f})"

    out = f"First divergence at generated token {d}: {choice(base, 'baseline')}, {choice(new, 'with removal')}"
    if d < base.n_gen and d < new.n_gen:
        other = np.flatnonzero(new.top_ids[d] == base.ids[base.n_prompt + d])
        if other.size:
            out += f"; with removal the baseline's token had log p {new.top_logprobs[d, other[0]]:.3f}"
    return out


def compare_html(base: Trace, new: Trace | None, d: int | None, what: str) -> str:
    """The two continuations as text side by side, from the first divergence ``d`` on highlighted."""
    if new is None:
        return "<i>Remove experts (field below the plots, at the slider's layer) to regenerate and compare.</i>"
    cols = ("<div style='display:flex;gap:16px;font-family:monospace;white-space:pre-wrap'>"
            f"<div style='flex:1'><b>baseline</b><br>{_text(base, d)}</div>"
            f"<div style='flex:1'><b>{html.escape(what)} removed</b><br>{_text(new, d)}</div></div>")
    if d is None:
        return cols + "<div>The continuations are identical.</div>"
    return cols + "<div>" + html.escape(choice_text(base, new, d)) + "</div>"

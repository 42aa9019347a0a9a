"""``GenerationResult``: what one :func:`grokviz.generation.generate` call produced, on the host."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..cache import ActivationCache
from ..hooks import REGISTRY


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationResult:
    """Generated tokens with their probabilities and everything captured while writing them.

    Per generated token ``t`` (axis ``n`` = max_new_tokens; entries past a row's ``lengths[r]`` are padding):

    * ``tokens`` int32 [batch, n] (the pad token, or 0 for a model without one, past a row's stop);
      ``lengths`` [batch]: tokens made per row, its stop token included;
    * ``token_prob`` [batch, n]: the sampler's probability of the token (softmax of the filtered, scaled
      logits, the Grok-1 runner's ``prob``); ``top_ids``/``top_probs`` [batch, n, 8]: that distribution's
      8 most probable tokens, descending;
    * ``logprobs`` [batch, n]: the model's own log-probability of the token (log-softmax of the raw logits);
      ``top_logprobs`` [batch, n, 8]: the same for ``top_ids``;
    * ``logits`` [batch, n, vocab]: the raw logits token ``t`` was drawn from (only with ``keep_logits=True``);
    * ``steps``: {hook: array with a leading step axis [steps, ...]}: what the model computed for generated
      token ``t`` as it was fed back in (routing, its attention row over the cache ``[steps, layer, batch,
      head, slot]``, residuals, ...), each hook's axes without ``seq``; ``steps_run`` entries, the tokens
      made (fewer than ``n`` when every row stopped early); :meth:`step_layers` names the layers along a
      hook's layer axis (routing hooks of a model with dense MLP layers exist at its MoE layers only);
    * ``prefill``: the prompt's capture, an :class:`~grokviz.cache.ActivationCache` over the left-padded
      prompt buffer ``prompt`` [batch, P] (row ``r``'s prompt is at slots ``P - prompt_lengths[r] .. P - 1``;
      attention maps there have ``P + N`` key slots, the cache size).

    Slot (and, for position rule ``index``, position) of generated token ``t`` in the cache: ``P + t``.
    ``sequences()`` is the whole buffer [batch, P + n]: prompt then generated tokens, the layout a full
    forward reproduces the cached logits on.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    token_prob: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    logprobs: np.ndarray
    top_logprobs: np.ndarray
    logits: np.ndarray | None
    steps: dict
    steps_run: int
    prefill: ActivationCache
    step_layout: dict
    prompt: np.ndarray
    prompt_lengths: np.ndarray
    texts: list | None
    settings: dict
    single: bool = False
    model: Any = None

    @property
    def text(self):
        """The generated text: a str for a single prompt, a list of str (one per row) for a batch; None when the
        model has no tokenizer."""
        if self.texts is None:
            return None
        return self.texts[0] if self.single else list(self.texts)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def prompt_width(self) -> int:
        """P: the prompt bucket; generated token t sits in cache slot P + t."""
        return self.prompt.shape[1]

    def new_tokens(self, row: int = 0) -> np.ndarray:
        """int32 [lengths[row]]: the tokens row ``row`` generated, its stop token included."""
        return self.tokens[row, :self.lengths[row]]

    def sequences(self) -> np.ndarray:
        """int32 [batch, P + n]: the left-padded prompt buffer followed by the generated tokens."""
        return np.concatenate([self.prompt, self.tokens], axis=1)

    def step(self, name: str, t: int | None = None) -> np.ndarray:
        """``steps[name]`` (all steps), or generated token ``t``'s entry; KeyError names what was captured."""
        if name not in self.steps:
            raise KeyError(f"{name!r} was not captured while generating; captured: {sorted(self.steps)} "
                           f"(pass capture=[...] to generate)")
        value = self.steps[name]
        if t is None:
            return value
        if not -self.steps_run <= t < self.steps_run:
            raise IndexError(f"step {t} is outside the {self.steps_run} captured steps")
        return value[t]

    def step_layers(self, name: str) -> tuple[int, ...]:
        """The layer numbers along the layer axis of ``steps[name]`` (every layer, or the MoE layers only)."""
        value = self.step(name)
        kept = self.step_layout.get(name, (None, None))[0]
        return tuple(range(value.shape[1])) if kept is None else tuple(kept)

    def first_choice(self, layer: int) -> np.ndarray:
        """int32 [batch, steps]: each generated token's first-choice expert at MoE layer number ``layer`` (needs
        ``blocks.moe.top_k_experts`` captured)."""
        layers = self.step_layers("blocks.moe.top_k_experts")
        if layer not in layers:
            raise IndexError(f"layer {layer} is not among the captured MoE layers {list(layers)}")
        return self.step("blocks.moe.top_k_experts")[:, layers.index(layer), :, 0].T

    def __repr__(self):
        caps = ", ".join(sorted(self.steps)) or "nothing"
        return (f"GenerationResult(batch={self.batch}, new tokens={self.lengths.tolist()}, "
                f"captured per step: {caps})")


def step_axes(name: str) -> tuple[str, ...]:
    """The axes of ``GenerationResult.steps[name]``: ``step`` then the hook's axes without ``seq``."""
    return ("step",) + tuple(a for a in REGISTRY[name].axes if a != "seq")

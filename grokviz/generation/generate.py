"""``generate``: sample a continuation of one prompt or a batch, watching the model as it writes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..cache import ActivationCache
from ..interventions import Interventions, check_interventions
from . import inputs
from .keys import check_rng, seeds_array
from .loop import LAYOUTS, Traced, program_jit
from .result import GenerationResult
from .stream import GenerationStream, register, unregister


def generate(model, prompt, max_new_tokens: int, *, temperature=1.0, top_p=1.0, top_k=0, seed=0, stop=None,
             capture=None, interventions: Interventions | None = None, step_patches: dict | None = None,
             rng: str = "default", stream: bool = False, callback=None, keep_logits: bool = False,
             bucket: bool = True, expert_impl: str = "sparse"):
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` with a KV cache, in one compiled program.

    ``prompt``: text, a list of texts, token ids [seq] or [batch, seq] (trailing pad tokens dropped per row), or
    a list of id lists of different lengths. Rows are left-padded with the pad token to a prompt bucket
    (16, 32, ..., capped by the context) so the last prompt token of every row is at the same slot; for a
    model without a pad token all prompts must have one length. ``bucket=False``: exact sizes (compiles per
    length).

    Sampling (:mod:`grokviz.generation.sampler`, the Grok-1 runner's order): ``temperature`` (>= 0; 0 =
    greedy), ``top_p`` (in (0, 1]; 1 = off), ``top_k`` (in [0, vocab]; 0 = off; a top-k over tokens, not the
    number of experts per token as in :meth:`grokviz.Model.run`), each a number or one per row.
    ``seed``: an int or one per row, in [0, 2**32). ``rng``: ``"default"`` or ``"grok1"``, the runner's key
    chain reproduced bit for bit (:mod:`grokviz.generation.keys`). ``stop``: None (stop at the model's EOS
    token), ``()`` (never stop, as the Grok-1 runner), a token id, a list of ids, or one list per row; a row
    stops after its first stop token, which is kept.

    ``capture``: hook names or globs, or ``"routing"`` (router logits and probabilities, selected experts,
    gates, expert load), recorded for the prompt (``result.prefill``) and for every generated token
    (``result.steps``, a leading step axis; ``blocks.attn.pattern`` gives the new token's attention row per
    layer and head over the cache slots). ``keep_logits``: also return every step's raw logits.

    ``interventions``: an :class:`~grokviz.interventions.Interventions` without patches; its per-layer edits
    (expert removal and scaling, head scaling, router bias and temperature, gate renormalisation) apply to the
    prompt and to every generated token. ``step_patches``: ``{hook: (value [n, layer, batch, ...], mask
    [n, layer, batch] bool)}`` replaces a blocks.* activation of generated token ``t`` (entry ``t`` of the
    step axis) at the masked layers and rows; :func:`grokviz.generation.force_routing_steps` builds forced
    routing. A patch at step ``t`` acts on the model's computation of token ``t`` as it is fed back in: token
    ``t`` itself was already drawn, the logits of token ``t + 1`` change, and the keys and values of token
    ``t`` written to the cache at layers after the patched one carry the patch, so every later step attends to
    the patched token; the cache is never recomputed, exactly as a full forward with that position patched.

    ``stream=True`` returns a :class:`~grokviz.generation.stream.GenerationStream` (iterate for
    :class:`~grokviz.generation.stream.StepEvent` s as tokens are produced, then ``.result()``);
    ``callback(event)`` is called with each event instead (then the result is returned).

    Compiled once per (prompt bucket, new-token bucket, batch, capture set, step-patch hooks, rng mode,
    streaming, keep_logits): prompt content, seeds, sampling settings, stop ids and intervention values never
    recompile.
    """
    cfg = model.cfg
    rng = check_rng(rng)
    rows, single = inputs.prompt_rows(model, prompt)
    b = len(rows)
    longest = max(len(r) for r in rows)
    bucket = bool(bucket) and cfg.pad_token >= 0
    n, width, n_bucket = inputs.sizes(cfg, longest, max_new_tokens, bucket)
    prompts = inputs.layout_prompts(cfg, rows, single, width)
    temperature, top_p, top_k = inputs.settings(cfg, b, temperature, top_p, top_k)
    stop_ids = inputs.stop_array(cfg, stop, b)
    seeds = seeds_array(seed, b)
    capture = inputs.capture_set(capture)
    if interventions is not None:
        if interventions.patches:
            raise ValueError(f"generate: interventions carry patches ({', '.join(interventions.patches)}), which "
                             f"address positions of one forward; give per-step patches as step_patches=")
        check_interventions(interventions, cfg, (b, width))
    patches = inputs.step_patches(cfg, step_patches, n_bucket, n, b)
    run_iv = Interventions.none(cfg) if interventions is None else interventions  # one program with or without
    patches = {k: (jax.device_put(v), jax.device_put(m)) for k, (v, m) in patches.items()}
    settings = dict(max_new_tokens=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                    capture=capture, interventions=interventions, step_patches=step_patches, rng=rng,
                    keep_logits=keep_logits, bucket=bucket, expert_impl=expert_impl)
    streaming = bool(stream) or callback is not None

    def run(sink):
        call_id = register(sink, n) if sink is not None else 0
        try:
            args = Traced(prompt=jax.device_put(prompts.buffer), n=jnp.int32(n),
                          temperature=jax.device_put(temperature), top_p=jax.device_put(top_p),
                          top_k=jax.device_put(top_k), stop=jax.device_put(stop_ids), seeds=jax.device_put(seeds),
                          call_id=jnp.int32(call_id))
            out = program_jit(model.params, args, run_iv, patches, cfg=cfg, n_bucket=n_bucket,
                              capture=capture, rng=rng, stream=streaming,
                              keep_logits=bool(keep_logits), expert_impl=expert_impl)
            out = jax.block_until_ready(out)
        finally:
            if sink is not None:
                unregister(call_id)
        return _result(model, prompts, out, n, settings)

    if stream:
        return GenerationStream(run)
    return run(callback)


def _result(model, prompts, out, n, settings) -> GenerationResult:
    cfg = model.cfg
    alive = np.asarray(out.alive)[:, :n]
    lengths = alive.sum(axis=1).astype(np.int32)
    tokens = np.asarray(out.tokens)[:, :n]
    steps_run = int(out.steps_run)
    pre_layout, step_layout = LAYOUTS.get((cfg, settings["capture"]), ({}, {}))
    steps = {k: np.asarray(v)[:steps_run] for k, v in out.step_cache.items()}
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(tokens[r, :lengths[r]].tolist()) for r in range(len(lengths))]
    return GenerationResult(
        tokens=tokens, lengths=lengths, token_prob=np.asarray(out.prob)[:, :n], top_ids=np.asarray(out.top_ids)[:, :n],
        top_probs=np.asarray(out.top_probs)[:, :n], logprobs=np.asarray(out.logprob)[:, :n],
        top_logprobs=np.asarray(out.top_logprobs)[:, :n],
        logits=None if out.logits is None else np.asarray(out.logits)[:, :n], steps=steps, steps_run=steps_run,
        prefill=ActivationCache(out.prefill_cache, pre_layout, num_layers=cfg.num_layers, moe_layers=cfg.moe_layer_ids),
        step_layout=step_layout, prompt=prompts.buffer,
        prompt_lengths=prompts.lengths, texts=texts, settings=settings, single=prompts.single, model=model)

"""Expert-level analysis: counterfactual expert outputs, their direct logit attribution, the per-expert logit lens
and the single-expert substitution experiment (issue 16; the experts and their write into the residual stream:
docs/families.md#experts, docs/families.md#block, docs/grok1.md#block).

**Counterfactual expert outputs.** What every expert, selected or not, would output for a token at a MoE layer:
the hook ``blocks.moe.expert_outputs_all`` [layer, batch, seq, expert, d_model] (computed only when captured).
:func:`expert_outputs` is one jitted computation: the model's own blocks up to the chosen layer (the MoE input
``blocks.moe.pre_norm`` and the routing captured, nothing sent to the host), then that layer's experts on the chosen
positions with the model's own :func:`grokviz.model.moe.expert_outputs_all` (the hook's computation), so the cost
is at most one forward plus one layer's dense expert work at those positions (bench/bench_counterfactual.py).

**Their direct logit attribution** (:func:`counterfactual_dla`) is the linearisation of
:mod:`grokviz.analysis.attribution`: the layer's MoE write factor (Grok's post-norm ``g * r`` with ``r`` frozen at
the run's ``moe.out``; the residual multiplier for the pre-norm families, :func:`grokviz.model.block.sublayer_write`)
and the final norm's ``r_f`` frozen. An expert's *ungated* attribution is that of its raw output; a selected
expert's gated one (``gate x ungated``) is exactly its term in :func:`~grokviz.analysis.attribution.dla_components`.
For an unselected expert it answers "what would expert e have pushed towards the target had it been picked at gate
1", to first order (the frozen norms hide the rescaling a different write would bring).

**Per-expert logit lens**, after "MoE Lens: An Expert Is All You Need" (Chaudhari et al., arXiv 2025): each selected
expert's gated write pushed through the model's readout (final norm, unembedding: :func:`lens_logits`), and how
well the top-weighted expert alone stands for the whole MoE output (:func:`top_expert_agreement`: cosine of the
writes, top-token agreement of their lenses and of the residual stream with only the top expert added), and the
*single-expert substitution* (:func:`single_expert_substitution`): keep only the top-weighted expert per token at
one layer (the other slots' gates set to 0 by a patch of ``blocks.moe.top_k_weights``) and measure Δloss over a
dataset.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..hooks import Point, select
from ..model import moe as _moe
from ..model.transformer import embed, run_blocks
from ..params import MOE_LEAVES, dense
from .attribution import DLA_CAPTURE, _pieces, _row_position, _rscale, _write_factor, lens_logits
from .common import token_id

__all__ = ["expert_outputs", "counterfactual_dla", "counterfactual_table", "expert_lens", "top_expert_agreement",
           "single_expert_substitution", "CF_HOOK", "RUN_CAPTURE"]

CF_HOOK = "blocks.moe.expert_outputs_all"
#: what expert_outputs captures (little: it is the counterfactual capture's cost over a plain forward)
CF_CAPTURE = ("blocks.moe.out", "blocks.moe.pre_norm", "blocks.moe.top_k_experts", "blocks.moe.top_k_weights")
#: what the lens functions capture: one set (and interventions always given), so they share one compiled program
RUN_CAPTURE = tuple(sorted(set(DLA_CAPTURE) | {"blocks.resid_pre", "blocks.resid_mid", "blocks.moe.pre_norm"}))


def _moe_layer(cfg, layer) -> int:
    n = cfg.num_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n <= layer < n:
        raise ValueError(f"layer must be an int in [-{cfg.num_layers}, {cfg.num_layers}), got {layer!r}")
    layer = int(layer) % cfg.num_layers
    if not cfg.is_moe(layer):
        raise ValueError(f"layer {layer} is a dense MLP layer without experts (MoE layers: {list(cfg.moe_layer_ids)})")
    return layer


def _cf_program(params, tokens, iv, length, pos, *, cfg, layer, full):
    """One jitted computation: the model's own embed and blocks (up to ``layer`` only, or every layer when
    ``full``: then the final residual stream is returned too, for the readout) with the MoE input and routing of
    ``layer`` captured, then every expert of that layer at positions ``pos`` (None: all) with the model's own
    :func:`grokviz.model.moe.expert_outputs_all`. Nothing goes to the host in between."""
    iv_layers, patches = iv.split()
    top = Point(frozenset(), patches={k: v for k, v in patches.items() if not k.startswith("blocks.")})
    h = embed(params, tokens, cfg, top)
    blocks = run_blocks(params, h, tokens, cfg, stop_layer=None if full else layer + 1, length=length,
                        capture=select(CF_CAPTURE), interventions=iv_layers,
                        patches={k: v for k, v in patches.items() if k.startswith("blocks.")})
    c, m = blocks.cache, cfg.moe_layer_ids.index(layer)   # routing hooks are stacked over the MoE layers
    take = (lambda a: a) if pos is None else (lambda a: jnp.take(a, pos, axis=1))  # noqa: E731
    p_layer = {k: jax.tree_util.tree_map(lambda a: a[m], params["blocks"][k]) for k in MOE_LEAVES
               if k in params["blocks"]}
    out = {"outputs": _moe.expert_outputs_all(p_layer, take(c["blocks.moe.pre_norm"][layer]), cfg),
           "experts": take(c["blocks.moe.top_k_experts"][m]), "gates": take(c["blocks.moe.top_k_weights"][m]),
           "moe_out": take(c["blocks.moe.out"][layer])}
    if full:
        out["h_final"] = take(blocks.h)
    return out


_cf_jit = jax.jit(_cf_program, static_argnames=("cfg", "layer", "full"))


def _bucketed(model, tokens, iv):
    """(padded tokens, interventions with padded patches, length) as :meth:`grokviz.Model.run` buckets them, so
    prompts of similar lengths share one compiled program."""
    from ..api import bucket_length, pad_seq

    t = tokens.shape[1]
    if not model.bucket:
        return tokens, iv, None
    width = bucket_length(t, model.cfg.sequence_len)
    padded = np.pad(tokens, ((0, 0), (0, width - t)), constant_values=model.cfg.pad_token)
    if iv.patches and width != t:
        iv = dataclasses.replace(iv, patches={
            k: (pad_seq(k, v, width), np.pad(np.asarray(m), [(0, 0)] * (np.ndim(m) - 1) + [(0, width - t)]))
            for k, (v, m) in iv.patches.items()})
    return padded, iv, jnp.int32(t)


def _counterfactual(model, tokens, layer, positions, interventions, full):
    from ..interventions import Interventions, check_interventions

    cfg = model.cfg
    layer = _moe_layer(cfg, layer)
    tokens = model.to_tokens(tokens)
    if interventions is not None:
        check_interventions(interventions, cfg, tokens.shape)
    iv = Interventions.none(cfg) if interventions is None else interventions
    t = tokens.shape[1]
    pos = None if positions is None else np.asarray([p % t for p in _check_positions(positions, t)], np.int32)
    padded, iv, length = _bucketed(model, tokens, iv)
    out = _cf_jit(model.params, jnp.asarray(padded), iv, length, None if pos is None else jnp.asarray(pos),
                  cfg=cfg, layer=layer, full=full)
    out = {k: np.asarray(v) if pos is not None else np.asarray(v)[:, :t] for k, v in out.items()}
    out.update(positions=np.arange(t) if pos is None else pos.astype(np.int64), layer=layer)
    return out


def expert_outputs(model, tokens, layer: int, *, positions=None, interventions=None) -> dict:
    """Counterfactual outputs of every expert at MoE ``layer`` (what the hook ``blocks.moe.expert_outputs_all``
    computes inside the model, at that layer only): one jitted computation runs the model's own blocks up to
    ``layer`` (the later layers and the readout are not needed) with its MoE input and routing captured, then
    every expert of that layer at ``positions`` (default all) with the model's own
    :func:`grokviz.model.moe.expert_outputs_all`, so choosing positions saves the work of the others.

    Returns numpy arrays: ``outputs`` [batch, pos, expert, d_model] (before gating), ``experts``/``gates``
    [batch, pos, k] (the run's selection), ``moe_out`` [batch, pos, d_model], plus ``positions`` and ``layer``.
    The selected experts' outputs combined with their gates give ``moe_out``. Example::

        cf = gv.analysis.expert_outputs(model, "The cat sat", layer=1)
        cf["outputs"][0, -1, 5]          # what expert 5 would output at the last token
    """
    return _counterfactual(model, tokens, layer, positions, interventions, full=False)


def _run(model, tokens):
    from ..interventions import Interventions

    return model.run(tokens, capture=RUN_CAPTURE, interventions=Interventions.none(model.cfg))


def _check_positions(positions, t):
    from .patching import check_indices

    return check_indices("positions", positions, t)


def _readout(params, cfg, h_final, target, foil=None):
    """The frozen readout direction [b, t, d] of ``logit[target] (- logit[foil])`` (as dla_components)."""
    table = params["embed"] if cfg.tie_embeddings else params["unembed"]
    emb = dense(table, jnp.float32)
    shape = h_final.shape[:2]
    tgt = jnp.broadcast_to(jnp.asarray(target), shape)
    u = emb[tgt] if foil is None else emb[tgt] - emb[jnp.broadcast_to(jnp.asarray(foil), shape)]
    return u * (cfg.output_multiplier * params["final_norm"].astype(jnp.float32)) * _rscale(h_final, cfg.rms_eps)


def _moe_factor(params, cfg, moe_out, layer):
    """[b, t, d or 1]: the layer's MoE write factor with Grok's post-norm r frozen (attribution._write_factor)."""
    scale = params["blocks"].get("moe_post_norm")
    scale = None if scale is None else scale[layer:layer + 1]
    return _write_factor(jnp.asarray(moe_out)[None], scale, cfg)[0]


def _ids(model, ids, shape, name):
    """A token id (or one-token text), or int ids of ``shape`` [batch, seq]; None stays None."""
    if ids is None or isinstance(ids, str) or np.ndim(ids) == 0:
        return None if ids is None else token_id(model, ids)
    ids = np.asarray(ids)
    if ids.shape != tuple(shape) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a token id, one-token text or int ids of shape [batch, seq] = "
                         f"{tuple(shape)}, got shape {ids.shape} and dtype {ids.dtype}")
    return ids


def counterfactual_dla(model, tokens, layer: int, target, *, foil=None, positions=None, interventions=None) -> dict:
    """Direct logit attribution of every expert's counterfactual output at MoE ``layer`` to ``logit[target]``
    (or ``logit[target] - logit[foil]``), through the frozen MoE write factor and final norm.

    ``target``/``foil``: a token id or one-token text, or int ids [batch, seq]. Returns numpy arrays ``ungated``
    [batch, pos, expert] (the raw output's attribution), ``gated`` [batch, pos, k] (``gate x ungated`` of the
    selected experts: their terms in :func:`dla_components`), ``experts``, ``gates``, ``positions``. Example::

        d = gv.analysis.counterfactual_dla(model, "The cat sat on the", layer=2, target=" mat")
        d["ungated"][0, -1].argmax()      # the expert that would push " mat" most at the last token
    """
    tokens = model.to_tokens(tokens)
    tgt, fl = _ids(model, target, tokens.shape, "target"), _ids(model, foil, tokens.shape, "foil")
    cf = _counterfactual(model, tokens, layer, positions, interventions, full=True)
    pos, cfg = cf["positions"], model.cfg
    tgt, fl = (a if a is None or np.ndim(a) == 0 else a[:, pos] for a in (tgt, fl))
    u = _readout(model.params, cfg, jnp.asarray(cf["h_final"]), tgt, fl)
    direction = _moe_factor(model.params, cfg, cf["moe_out"], cf["layer"]) * u
    ungated = np.asarray(jnp.einsum("bted,btd->bte", jnp.asarray(cf["outputs"]), direction))
    gated = np.take_along_axis(ungated, cf["experts"], axis=-1) * cf["gates"]
    return {"ungated": ungated, "gated": gated, "experts": cf["experts"], "gates": cf["gates"], "positions": pos,
            "layer": cf["layer"]}


def counterfactual_table(model, tokens, layer: int, *, target=None, row: int = 0, position: int = -1, k: int = 3,
                         interventions=None) -> pd.DataFrame:
    """One row per expert at one position: what each expert (selected or not) would write there.

    Columns: expert, selected, slot (-1 if not selected), gate (0 if not), norm (of its output), lens_top (the
    ``k`` tokens its write alone reads out as, through the final norm and unembedding), lens_prob (of the first),
    and with ``target`` (id or one-token text) dla (ungated attribution to ``logit[target]``). Example::

        gv.analysis.counterfactual_table(model, "The cat sat on the", layer=1, target=" mat")
    """
    tokens = model.to_tokens(tokens)
    row, position = _row_position(tokens, model.cfg, row, position)
    cf = expert_outputs(model, tokens, layer, positions=[position], interventions=interventions)
    y = cf["outputs"][row, 0]                                      # [E, d]
    ex, g = cf["experts"][row, 0], cf["gates"][row, 0]
    factor = _moe_factor(model.params, model.cfg, cf["moe_out"][row:row + 1, None], cf["layer"])[0, 0]
    probs = np.asarray(jax.nn.softmax(lens_logits(model.params, model.cfg, jnp.asarray(y) * factor), -1))
    top = np.argsort(-probs, axis=-1)[:, :k]
    df = pd.DataFrame({"expert": np.arange(y.shape[0]), "selected": np.isin(np.arange(y.shape[0]), ex),
                       "slot": [int(np.flatnonzero(ex == e)[0]) if e in ex else -1 for e in range(y.shape[0])],
                       "gate": [float(g[ex == e].sum()) for e in range(y.shape[0])],
                       "norm": np.linalg.norm(y, axis=-1),
                       "lens_top": [" | ".join(_pieces(model, t)) for t in top],
                       "lens_prob": probs[np.arange(len(top)), top[:, 0]]})
    if target is not None:
        d = counterfactual_dla(model, tokens, cf["layer"], target, positions=[position], interventions=interventions)
        df["dla"] = d["ungated"][row, 0]
    df.attrs.update(layer=cf["layer"], row=row, position=position)
    return df


def expert_lens(model, tokens, layer: int, *, row: int = 0, position: int = -1, k: int = 5) -> pd.DataFrame:
    """Per-expert logit lens at one position (MoE Lens): each selected expert's gated write into the residual
    stream, and the whole MoE write, read out by the model's own final norm and unembedding.

    Columns: component ("expert" per slot, "moe"), slot, expert, gate, rank, token_id, token, prob. Example::

        gv.analysis.expert_lens(model, "The cat sat on the", layer=3)
    """
    tokens = model.to_tokens(tokens)
    row, position = _row_position(tokens, model.cfg, row, position)
    layer = _moe_layer(model.cfg, layer)
    run = _run(model, tokens)
    m = np.asarray(run.cache["blocks.moe.out", layer])[row, position]
    y = np.asarray(run.cache["blocks.moe.expert_out", layer])[row, position]
    ex = np.asarray(run.cache["blocks.moe.top_k_experts", layer])[row, position]
    g = np.asarray(run.cache["blocks.moe.top_k_weights", layer])[row, position]
    factor = _moe_factor(model.params, model.cfg, m[None, None], layer)[0, 0]
    writes = jnp.asarray(np.concatenate([y * g[:, None], m[None]])) * factor
    probs = np.asarray(jax.nn.softmax(lens_logits(model.params, model.cfg, writes), -1))
    rows = []
    for i, p in enumerate(probs):
        comp, slot = ("expert", i) if i < len(ex) else ("moe", -1)
        e, gate = (int(ex[i]), float(g[i])) if i < len(ex) else (-1, float(g.sum()))
        top = np.argsort(-p)[:k]
        rows += [(comp, slot, e, gate, r, int(v), piece, float(p[v])) for r, (v, piece) in
                 enumerate(zip(top, _pieces(model, top)))]
    return pd.DataFrame(rows, columns=["component", "slot", "expert", "gate", "rank", "token_id", "token", "prob"])


@functools.partial(jax.jit, static_argnames=("cfg",))
def _agreement_sums(params, c, real, moe_ids, cfg):
    """Per MoE layer sums over real tokens: cosine(top write, MoE write), top-1 agreement of their lenses, and of
    the lens of resid_mid + top write against the lens of resid_post."""
    g, y = c["blocks.moe.top_k_weights"], c["blocks.moe.expert_out"]            # [m,b,t,k], [m,b,t,k,d]
    top = jnp.argmax(g, -1)
    y_top = jnp.take_along_axis(y, top[..., None, None], axis=3)[..., 0, :] * jnp.max(g, -1)[..., None]
    moe = c["blocks.moe.out"][moe_ids]
    factor = jax.vmap(lambda m, s: _write_factor(m[None], None if s is None else s[None], cfg)[0])(
        moe, None if not cfg.sandwich else params["blocks"]["moe_post_norm"][moe_ids])
    w_top, w_moe = y_top * factor, moe * factor
    cos = jnp.sum(w_top * w_moe, -1) / jnp.maximum(jnp.linalg.norm(w_top, axis=-1) * jnp.linalg.norm(w_moe, axis=-1),
                                                   1e-30)

    def lens_top1(h):
        return jax.lax.map(lambda x: jnp.argmax(lens_logits(params, cfg, x), -1), h)

    agree_w = lens_top1(w_top) == lens_top1(w_moe)
    agree_r = lens_top1(c["blocks.resid_mid"][moe_ids] + w_top) == lens_top1(c["blocks.resid_post"][moe_ids])
    share = jnp.max(g, -1) / jnp.maximum(jnp.sum(g, -1), 1e-30)
    r = real.astype(jnp.float32)[None]
    return {k: jnp.sum(v.astype(jnp.float32) * r, (1, 2)) for k, v in
            dict(cosine=cos, top1_agree_write=agree_w, top1_agree_resid=agree_r, top_gate_share=share).items()}


def top_expert_agreement(model, data=None, *, batch_size: int = 8, max_len: int | None = None,
                         progress: bool = True) -> pd.DataFrame:
    """How well the top-weighted expert stands for the whole MoE output, per MoE layer, over a dataset (MoE Lens).

    Columns: layer, cosine (mean cosine of the top expert's gated write and the whole MoE write), top1_agree_write
    (their lens readouts' top tokens agree), top1_agree_resid (``resid_mid + top write`` reads out as
    ``resid_post`` does), top_gate_share (top gate / sum of gates), n_tokens. Example::

        gv.analysis.top_expert_agreement(model, None, max_len=64)   # the bundled validation split
    """
    from .dataset import batches

    cfg = model.cfg
    moe_ids = jnp.asarray(cfg.moe_layer_ids)
    cap = ["blocks.moe.top_k_weights", "blocks.moe.expert_out", "blocks.moe.out", "blocks.resid_mid",
           "blocks.resid_post"]
    total, n = None, 0
    for toks in batches(model, data, batch_size=batch_size, max_len=max_len, progress=progress,
                        desc="top-expert agreement"):
        run = _run(model, toks)
        real = jnp.asarray(run.real)
        s = _agreement_sums(model.params, {k: jnp.asarray(run.cache[k]) for k in cap}, real, moe_ids, cfg)
        s = {k: np.asarray(v, np.float64) for k, v in s.items()}
        total = s if total is None else {k: total[k] + s[k] for k in s}
        n += int(np.asarray(run.real).sum())
    if total is None:
        raise ValueError("the dataset is empty")
    return pd.DataFrame({"layer": list(cfg.moe_layer_ids), **{k: v / max(n, 1) for k, v in total.items()},
                         "n_tokens": n})


def single_expert_substitution(model, data=None, *, layers=None, renormalize: bool = False, batch_size: int = 8,
                               max_len: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Keep only the top-weighted expert per token at one MoE layer at a time (the other slots' gates set to 0,
    routing unchanged; ``renormalize``: the kept gate set to 1) and measure the loss over a dataset.

    Columns: layer, loss, base_loss, delta_loss (nats), kl (baseline || substituted), n_tokens. Example::

        gv.analysis.single_expert_substitution(model, None, max_len=64)
    """
    from ..interventions import Interventions
    from .dataset import batches
    from .patching import _layers, _lm_sums_jit

    cfg = model.cfg
    layers = _layers(layers, cfg, "expert")
    L = cfg.num_layers
    none = Interventions.none(cfg)
    sums = np.zeros((len(layers), 2))
    base_nll = n_pred = 0.0
    for toks in batches(model, data, batch_size=batch_size, max_len=max_len, progress=progress,
                        desc="single-expert substitution"):
        base = model.run(toks, capture=["blocks.moe.top_k_weights"])
        g = np.asarray(base.cache["blocks.moe.top_k_weights"])                       # [moe layer, b, t, k]
        keep = np.arange(g.shape[-1]) == np.argmax(g, -1)[..., None]
        value = np.zeros((L,) + g.shape[1:], np.float32)
        value[list(cfg.moe_layer_ids)] = np.where(keep, 1.0 if renormalize else g, 0.0)
        t, bl = jnp.asarray(toks), jnp.asarray(base.logits)
        b_nll, _, n = _lm_sums_jit(bl, t, cfg.pad_token)
        base_nll, n_pred = base_nll + float(b_nll), n_pred + float(n)
        for i, layer in enumerate(layers):  # one run per layer; the patch is data: one compiled program
            mask = np.zeros((L,) + toks.shape, bool)
            mask[layer] = True
            logits = model.run(toks, interventions=none.patch("blocks.moe.top_k_weights", value, mask=mask)).logits
            nll, kl, _ = _lm_sums_jit(jnp.asarray(logits), t, cfg.pad_token, bl)
            sums[i] += (float(nll), float(kl))
    if n_pred == 0:
        raise ValueError("the dataset has no next-token predictions")
    loss, base = sums[:, 0] / n_pred, base_nll / n_pred
    return pd.DataFrame({"layer": layers, "loss": loss, "base_loss": base, "delta_loss": loss - base,
                         "kl": sums[:, 1] / n_pred, "n_tokens": int(n_pred)})

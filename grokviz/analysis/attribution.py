"""Logit lens and direct logit attribution (DLA).

**Logit lens.** Apply the model's own readout (:func:`grokviz.model.unembed`: final ``rms_norm`` with its learned
scale, then the unembedding times the output multiplier) to an intermediate residual stream
(``resid_pre``/``resid_mid``/``resid_post`` of each layer), as if the remaining layers were skipped.

**Direct logit attribution, and the linearisation it uses.** Grok's blocks are sandwich-normed: each sublayer's
write into the residual stream is ``rms_norm_k(out) = g_k * out * r_k`` with ``r_k = rsqrt(mean(out**2) + eps)``,
and the readout is ``g_f * h * r_f``. Both are linear in their input once the scalar ``r`` (per token) is frozen
at its value in the actual run. With ``r_3`` (the MoE post-norm, which follows the gated sum) and ``r_f`` frozen:

* the MoE write of layer ``l`` is exactly ``sum_slots r_3 * g_3 * (gate_s * y_s)``, so each selected expert gets
  the share ``r_3 * g_3 * gate_s * y_s`` (its gated output, scaled by the frozen post-norm factor);
* each attention head gets ``r_2 * g_2 * (head_out_h @ W_o[h])`` (``r_2``: attention post-norm, frozen);
* the token embedding (``embed.out``) is the remaining term;
* a component ``c``'s direct effect on the logit of token v is ``om * r_f * (g_f * c) . E[v]``.

The other families pre-norm their sublayers, so their writes are already linear (times Granite's residual
multiplier) and only ``r_f`` is frozen; their extra writes (the attention output bias of gpt-oss, Qwen1.5-MoE's
shared expert, the MLP of a dense layer) are reported per layer as ``other``, and the readout uses the untied
``lm_head`` where the family has one. These contributions sum *exactly* to the model's logit (the residual
stream is the sum of the writes), which the tests check. They are direct effects only: what a component does
through later layers is not included, and the frozen ``r`` hide how the norms would rescale if a component were
removed (use the ablation sweeps for that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..config import is_real
from ..model.transformer import unembed
from ..params import dense
from .common import next_token_kl, next_token_logprobs, prediction_pairs, token_id
from .patching import check_indices

__all__ = ["lens_logits", "logit_lens", "logit_lens_at", "dla_components", "direct_logit_attribution",
           "DLA_CAPTURE"]

STAGES = ("resid_pre", "resid_mid", "resid_post")
DLA_CAPTURE = ["embed.out", "blocks.attn.head_out", "blocks.attn.out", "blocks.moe.out", "blocks.moe.expert_out",
               "blocks.moe.top_k_weights", "blocks.moe.top_k_experts", "blocks.resid_post"]


def lens_logits(params, cfg, resid) -> jax.Array:
    """[..., d_model] -> [..., vocab]: the model's readout (final norm, tied unembedding, output multiplier)."""
    return unembed(params, jnp.asarray(resid, jnp.float32), cfg)


def _pieces(model, ids):
    tok = model.tokenizer
    return [tok.id_to_piece(int(i)) if tok is not None else str(int(i)) for i in ids]


def _check_stages(stages):
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"stages must be among {list(STAGES)}, got {list(stages)}")
    return stages


def logit_lens(model, tokens, *, stages=STAGES) -> pd.DataFrame:
    """Per (layer, stage): how well the lens readout predicts the next token over the batch.

    Columns: layer, stage, loss (mean next-token NLL, nats), top1 (accuracy), kl_to_final (KL(final || lens)),
    over positions whose token and next token are real. A final row (layer = num_layers, stage "final") is the
    model itself."""
    stages = _check_stages(stages)
    tokens = model.to_tokens(tokens)
    run = model.run(tokens, capture=[f"blocks.{s}" for s in stages])
    toks = jnp.asarray(tokens)
    valid = prediction_pairs(toks, model.cfg.pad_token).astype(jnp.float32)
    n = jnp.maximum(valid.sum(), 1.0)
    final = jnp.asarray(run.logits, jnp.float32)

    def stats(logits):
        nll = -next_token_logprobs(logits, toks)
        top1 = (jnp.argmax(logits[:, :-1], -1) == toks[:, 1:]).astype(jnp.float32)
        kl = next_token_kl(final, logits)
        return [float(jnp.sum(x * valid) / n) for x in (nll, top1, kl)]

    rows = []
    for layer in range(model.cfg.num_layers):
        for s in stages:
            rows.append((layer, s, *stats(lens_logits(model.params, model.cfg, run.cache[f"blocks.{s}", layer]))))
    rows.append((model.cfg.num_layers, "final", *stats(final)))
    return pd.DataFrame(rows, columns=["layer", "stage", "loss", "top1", "kl_to_final"])


def logit_lens_at(model, tokens, *, row: int = 0, position: int = -1, k: int = 5, target=None,
                  stages=STAGES) -> pd.DataFrame:
    """The lens's top-``k`` next-token predictions at one position, per (layer, stage).

    Columns: layer, stage, rank, token_id, token, prob; with ``target`` (a token id), also target_prob and
    target_rank (0 = top) per row. ``target`` may be an id or one-token text. ``position``: an index into the
    row's ``seq`` positions; negative ones count back over its real tokens (``-1``: the last real token)."""
    stages = _check_stages(stages)
    tokens = model.to_tokens(tokens)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= model.cfg.vocab_size:
        raise ValueError(f"k must be an int in [1, {model.cfg.vocab_size}] (the vocabulary size), got {k!r}")
    row, position = _row_position(tokens, model.cfg, row, position)
    target = None if target is None else token_id(model, target)
    run = model.run(tokens, capture=[f"blocks.{s}" for s in stages])
    rows = []
    readouts = [(layer, s, run.cache[f"blocks.{s}", layer][row, position])
                for layer in range(model.cfg.num_layers) for s in stages]
    for layer, s, resid in readouts + [(model.cfg.num_layers, "final", None)]:
        logits = run.logits[row, position] if resid is None else lens_logits(model.params, model.cfg, resid)
        probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32)))
        top = np.argsort(-probs)[:k]
        extra = ()
        if target is not None:
            extra = (float(probs[target]), int(np.sum(probs > probs[target])))
        for r, (v, piece) in enumerate(zip(top, _pieces(model, top))):
            rows.append((layer, s, r, int(v), piece, float(probs[v]), *extra))
    cols = ["layer", "stage", "rank", "token_id", "token", "prob"]
    return pd.DataFrame(rows, columns=cols + (["target_prob", "target_rank"] if target is not None else []))


def _row_position(tokens, cfg, row, position) -> tuple[int, int]:
    """``row`` in [-batch, batch) and ``position`` in [-n_real, seq) (negative: counted back over the row's real
    tokens) as non-negative indices; ``ValueError`` naming the argument and the bound otherwise."""
    b, t = tokens.shape
    (row,) = check_indices("row", row, b)
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
        raise ValueError(f"position must be an int, got {position!r}")
    if position >= 0:
        if position >= t:
            raise ValueError(f"position {position} is outside the sequence of {t} tokens (positions [0, {t}))")
        return row, int(position)
    real = np.flatnonzero(is_real(np.asarray(tokens[row]), cfg.pad_token))
    if -position > len(real):
        raise ValueError(f"position {position} counts back over the real tokens of row {row}, which has "
                         f"{len(real)} (negative positions [-{len(real)}, -1])")
    return row, int(real[position])


def _rscale(x, eps):
    x = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps)


def _write_factor(out, scale, cfg):
    """The per-token factor [layer, b, t, d or 1] that turns a sublayer's output into its residual write (see
    :func:`grokviz.model.block.sublayer_write`), with Grok's post-norm scalar ``r`` frozen at its value in the run:
    ``g * r`` (sandwich) or the residual multiplier (pre-norm)."""
    if cfg.sandwich:
        return scale.astype(jnp.float32)[:, None, None, :] * _rscale(out, cfg.rms_eps)
    return jnp.full(out.shape[:3] + (1,), cfg.residual_multiplier, jnp.float32)


def dla_components(params, cfg, cache, target, foil=None) -> dict:
    """Direct contributions to ``logit[target]`` (or ``logit[target] - logit[foil]``) at every position.

    ``cache``: captures :data:`DLA_CAPTURE` of an intervention-free run; ``target``/``foil``: int [batch, seq]
    token ids (or scalars). Returns numpy arrays: ``embed`` [batch, seq], ``heads`` [layer, batch, seq, head],
    ``experts`` [MoE layer, batch, seq, k] (slot order of ``top_k_experts``; the MoE layers are
    ``cfg.moe_layer_ids``), ``other`` [layer, batch, seq]: the rest of each layer's writes (the attention output
    bias, a shared expert, a dense layer's MLP; 0 in Grok), and ``total`` [batch, seq] (their sum, which equals
    the model's logit / logit difference)."""
    table = params["embed"] if cfg.tie_embeddings else params["unembed"]
    emb = dense(table, jnp.float32)
    b = cfg.output_multiplier * params["final_norm"].astype(jnp.float32)
    h_final = jnp.asarray(cache["blocks.resid_post"])[-1]
    shape = h_final.shape[:2]
    tgt = jnp.broadcast_to(jnp.asarray(target), shape)
    u = emb[tgt] if foil is None else emb[tgt] - emb[jnp.broadcast_to(jnp.asarray(foil), shape)]
    u = u * b * _rscale(h_final, cfg.rms_eps)  # [batch, seq, d]: the frozen readout direction
    p = params["blocks"]
    L, moe_ids = cfg.num_layers, list(cfg.moe_layer_ids)

    moe_out = jnp.asarray(cache["blocks.moe.out"])                                   # [l,b,t,d]
    moe_dir = _write_factor(moe_out, p.get("moe_post_norm"), cfg) * u[None]           # [l,b,t,d]
    gated = jnp.asarray(cache["blocks.moe.expert_out"]) * jnp.asarray(cache["blocks.moe.top_k_weights"])[..., None]
    experts = jnp.einsum("lbtkd,lbtd->lbtk", gated, moe_dir[jnp.asarray(moe_ids)])
    # whatever the layer's MoE output holds beyond its routed experts: a shared expert, or a dense layer's MLP
    routed = jnp.zeros_like(moe_out).at[jnp.asarray(moe_ids)].set(gated.sum(3))
    other = jnp.einsum("lbtd,lbtd->lbt", moe_out - routed, moe_dir)

    attn_out = jnp.asarray(cache["blocks.attn.out"])                                 # [l,b,t,d]
    attn_dir = _write_factor(attn_out, p.get("attn_post_norm"), cfg) * u[None]
    head_out = jnp.asarray(cache["blocks.attn.head_out"])                            # [l,b,t,h,hd]
    w_o = dense(p["w_o"], jnp.float32).reshape(L, cfg.num_q_heads, cfg.head_dim, cfg.d_model)
    heads = jnp.einsum("lbthe,lhed,lbtd->lbth", head_out, w_o, attn_dir)
    if cfg.o_bias:
        other = other + jnp.einsum("ld,lbtd->lbt", p["b_o"].astype(jnp.float32), attn_dir)

    embed = jnp.einsum("btd,btd->bt", jnp.asarray(cache["embed.out"]), u)
    total = embed + heads.sum((0, 3)) + experts.sum((0, 3)) + other.sum(0)
    return {k: np.asarray(v) for k, v in
            dict(embed=embed, heads=heads, experts=experts, other=other, total=total).items()}


def direct_logit_attribution(model, tokens, target, *, row: int = 0, position: int = -1, foil=None) -> pd.DataFrame:
    """DLA table at one position (default: the row's last real token): one row per component.

    Columns: component ("embed", "head", "expert"; and per layer "bias" (attention output bias), "shared"
    (shared expert) or "mlp" (a dense layer) where the family has them), layer (-1 for embed), unit (head or
    expert id), slot (the expert's rank in the token's top-k; -1 otherwise), gate (the gate applied), contribution
    (to ``logit[target]``, or ``logit[target] - logit[foil]``). ``df.attrs["logit"]`` holds the model's value,
    which equals ``df.contribution.sum()``. ``target``/``foil``: token ids (or single-token strings)."""
    tokens = model.to_tokens(tokens)
    row, position = _row_position(tokens, model.cfg, row, position)
    target, foil = token_id(model, target), None if foil is None else token_id(model, foil)
    run = model.run(tokens, capture=DLA_CAPTURE)
    comp = dla_components(model.params, model.cfg, run.cache, target, foil)
    ex = np.asarray(run.cache["blocks.moe.top_k_experts"])[:, row, position]
    gates = np.asarray(run.cache["blocks.moe.top_k_weights"])[:, row, position]
    rows = [("embed", -1, -1, -1, np.nan, float(comp["embed"][row, position]))]
    cfg = model.cfg
    other_name = "mlp" if cfg.moe_layers is not None else "shared" if cfg.shared_expert_ffn else "bias"
    for layer in range(cfg.num_layers):
        for h in range(cfg.num_q_heads):
            rows.append(("head", layer, h, -1, np.nan, float(comp["heads"][layer, row, position, h])))
        if cfg.is_moe(layer):
            m = cfg.moe_layer_ids.index(layer)
            for s in range(cfg.top_k):
                rows.append(("expert", layer, int(ex[m, s]), s, float(gates[m, s]),
                             float(comp["experts"][m, row, position, s])))
        if cfg.o_bias or cfg.shared_expert_ffn or not cfg.is_moe(layer):
            name = "mlp" if not cfg.is_moe(layer) else other_name
            rows.append((name, layer, -1, -1, np.nan, float(comp["other"][layer, row, position])))
    df = pd.DataFrame(rows, columns=["component", "layer", "unit", "slot", "gate", "contribution"])
    lg = np.asarray(run.logits[row, position], np.float64)
    df.attrs["logit"] = float(lg[target] - (lg[foil] if foil is not None else 0.0))
    df.attrs["position"] = position
    return df


"""Measure the shipped tiny model on the held-out split and write its model card.

``python -m grokviz.tiny_card [--dir grokviz/assets/tiny] [--print]`` computes, on the corpus's ``validation``
split only:

* validation loss in nats/token and bits/byte, overall and per domain, against a unigram baseline (token
  frequencies of the *training* split, add-one smoothed);
* per-layer expert load (share of the k routing slots each expert gets) and its coefficient of variation;
* the Mixtral paper's consecutive-token statistics per layer: the share of consecutive token pairs whose first
  choice is the same expert, and whose top-k sets overlap (share at least one expert), next to the baselines of
  uniformly random routing: 1/E and 1 - C(E-k, k)/C(E, k) (12.5% and 46.4% for 8 experts, top-2);
* per-domain routing: for each layer, the expert each domain's tokens prefer;
* next-token predictions and greedy continuations for a few prompts,

and writes ``card_stats.json`` and ``MODEL_CARD.md`` in the model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from math import comb
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .tiny import TINY_DIR, load_tiny

DOMAINS = ("code", "prose", "numbers")
PROMPTS = ["def forward(self, x):", "import os\nimport", "class Parser:\n    def __init__(self", "12 + 7 = ",
           "1, 2, 3, 4, 5, ", "The Python interpreter", "for i in range(", "Return the number of"]


def piece_bytes(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for ('▁' is a space, byte-fallback pieces one byte, controls 0)."""
    sp = tok.sp
    out = np.zeros(sp.get_piece_size(), np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        if sp.is_byte(i):
            out[i] = 1
        else:
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return out


def consecutive_baselines(e: int, k: int) -> tuple[float, float]:
    return 1.0 / e, 1.0 - comb(e - k, k) / comb(e, k)


def measure(model, data, *, seq_len: int = 128, batch: int = 32) -> dict:
    cfg, tok = model.cfg, model.tokenizer
    stream, dom = data.validation, data.domains["validation"]
    n_win = (len(stream) - 1) // seq_len
    wins = np.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n_win)]).astype(np.int32)
    wdom = np.stack([dom[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(n_win)])  # domain of targets
    idom = np.stack([dom[i * seq_len:(i + 1) * seq_len] for i in range(n_win)])          # domain of inputs

    counts = np.bincount(data.train, minlength=cfg.vocab_size).astype(np.float64) + 1.0
    uni_logp = np.log(counts / counts.sum())
    pbytes = piece_bytes(tok)

    @jax.jit
    def fwd(params, x):
        from .model.transformer import forward
        out = forward(params, x, cfg, capture=frozenset({"blocks.moe.top_k_experts"}))
        return jax.nn.log_softmax(out.logits.astype(jnp.float32), -1), out.cache["blocks.moe.top_k_experts"]

    nll, uni, nbytes, doms, experts, edoms = [], [], [], [], [], []
    pad = (-n_win) % batch
    wins_p = np.concatenate([wins, np.repeat(wins[:1], pad, 0)]) if pad else wins
    for s in range(0, len(wins_p), batch):
        w = wins_p[s:s + batch]
        logp, ex = fwd(model.params, jnp.asarray(w[:, :-1]))
        take = min(batch, n_win - s)
        logp, ex, w = np.asarray(logp)[:take], np.asarray(ex)[:, :take], w[:take]
        tgt = w[:, 1:]
        nll.append(-np.take_along_axis(logp, tgt[..., None], -1)[..., 0])
        uni.append(-uni_logp[tgt])
        nbytes.append(pbytes[tgt])
        experts.append(ex)
    nll, uni, nbytes = np.concatenate(nll), np.concatenate(uni), np.concatenate(nbytes)
    experts = np.concatenate(experts, axis=1)  # [L, n_win, T, k]
    L, E, k = cfg.num_layers, cfg.num_experts, cfg.top_k

    def lossrow(mask):
        n, b = mask.sum(), nbytes[mask].sum()
        return {"tokens": int(n), "bytes": int(b),
                "nats_per_token": float(nll[mask].mean()), "unigram_nats_per_token": float(uni[mask].mean()),
                "bits_per_byte": float(nll[mask].sum() / math.log(2) / b),
                "unigram_bits_per_byte": float(uni[mask].sum() / math.log(2) / b)}

    loss = {"all": lossrow(np.ones_like(nll, bool))}
    for i, d in enumerate(DOMAINS):
        loss[d] = lossrow(wdom == i)

    # expert load per layer
    onehot = np.zeros((L, E), np.int64)
    for l in range(L):
        onehot[l] = np.bincount(experts[l].reshape(-1), minlength=E)
    share = onehot / onehot.sum(1, keepdims=True)
    cv = share.std(1) / share.mean(1)
    n_tok = experts.shape[1] * experts.shape[2]
    p = k / E
    cv_random = math.sqrt((1 - p) / (n_tok * p) * (E - 1) / E)

    # consecutive-token statistics (pairs inside a window)
    a, b = experts[:, :, :-1], experts[:, :, 1:]
    first = (a[..., 0] == b[..., 0])                                  # [L, n, T-1]
    overlap = (a[..., :, None] == b[..., None, :]).any(-1).any(-1)    # [L, n, T-1]
    same_dom = (idom[:, :-1] == idom[:, 1:])
    consec = {"first_repeat": first.mean((1, 2)).tolist(), "topk_overlap": overlap.mean((1, 2)).tolist(),
              "pairs": int(first[0].size)}
    per_dom = {}
    for i, d in enumerate(DOMAINS):
        m = (idom[:, :-1] == i) & same_dom
        per_dom[d] = {"first_repeat": [float(first[l][m].mean()) for l in range(L)],
                      "topk_overlap": [float(overlap[l][m].mean()) for l in range(L)]}
    consec["per_domain"] = per_dom
    fb, ob = consecutive_baselines(E, k)

    # per-domain expert preference (first choice share), per layer
    spec = {}
    for i, d in enumerate(DOMAINS):
        m = idom == i
        rows = []
        for l in range(L):
            c = np.bincount(experts[l][..., 0][m], minlength=E) / max(m.sum(), 1)
            rows.append(c.round(4).tolist())
        spec[d] = rows

    return {"loss": loss, "expert_share": share.round(4).tolist(), "load_cv": cv.tolist(),
            "load_cv_random": cv_random, "consecutive": consec,
            "consecutive_baselines": {"first_repeat": fb, "topk_overlap": ob},
            "first_choice_share_by_domain": spec, "validation_windows": int(n_win), "seq_len": seq_len}


def predictions(model, prompts=PROMPTS, top: int = 5, gen: int = 24, width: int = 96) -> list[dict]:
    """Top next tokens and a greedy continuation for each prompt (right padding keeps one compiled shape)."""
    tok, cfg = model.tokenizer, model.cfg

    @jax.jit
    def logits_at(params, x):
        from .model.transformer import forward
        return forward(params, x, cfg).logits

    out = []
    for text in prompts:
        ids = tok.encode(text)
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(ids)] = ids
        first = None
        n = len(ids)
        for g in range(gen):
            lg = np.asarray(logits_at(model.params, jnp.asarray(buf)))[0, n - 1]
            if first is None:
                pr = np.exp(lg - lg.max())
                pr /= pr.sum()
                order = np.argsort(-pr)[:top]
                first = [(tok.id_to_piece(int(i)), float(pr[i])) for i in order]
            nxt = int(np.argmax(lg))
            if nxt == cfg.eos_token or n >= width:
                break
            buf[0, n] = nxt
            n += 1
        full, head = tok.decode(buf[0, :n].tolist()), tok.decode(ids)
        out.append({"prompt": text, "top_next": first, "greedy": full[len(head):]})
    return out


def _piece(p: str) -> str:
    return p.replace("\n", "\\n").replace("\t", "\\t").replace("`", "'")


def _pct(x):
    return f"{100 * x:.1f}%"


def render(stats: dict, preds: list[dict], conf: dict, model) -> str:
    cfg = model.cfg
    L, E, k = cfg.num_layers, cfg.num_experts, cfg.top_k
    lo = stats["loss"]
    fb, ob = stats["consecutive_baselines"]["first_repeat"], stats["consecutive_baselines"]["topk_overlap"]
    tr = conf.get("train", {})
    secs = conf.get("train_seconds", float("nan"))
    lines = [
        "# grokviz tiny: a small trained Grok-1-architecture model",
        "",
        "Shipped with the package so that the workbench has real routing to explore offline: "
        "`gv.load(\"tiny\")` (or `grokviz.tiny.load_tiny()`) returns it with its tokenizer attached. "
        "All numbers below are measured on the corpus's held-out `validation` split and are produced by "
        "`python -m grokviz.tiny_card` (raw values in `card_stats.json`).",
        "",
        "## Model",
        "",
        f"Same code path as Grok-1 (`grokviz.model.transformer.forward`): {L} layers, d_model {cfg.d_model}, "
        f"{cfg.num_q_heads} query / {cfg.num_kv_heads} KV heads of {cfg.head_dim} (grouped-query attention), "
        f"{E} experts top-{k} (GELU-gated, expert hidden size {cfg.ffn_size}, gates not renormalised), "
        f"attention logits soft-capped at {cfg.attn_softcap:g}, RMSNorm sandwich norms, RoPE, tied "
        f"embeddings, vocabulary {cfg.vocab_size}, context {cfg.sequence_len}. "
        f"{conf.get('num_params', 0):,} parameters, float32 `model.safetensors`. As Grok-1 scales embeddings by "
        f"sqrt(d_model) and attention logits by 1/sqrt(head_dim), the tiny model uses sqrt({cfg.d_model}) = "
        f"{cfg.embedding_multiplier:.4f} and 1/sqrt({cfg.head_dim}) = {cfg.attn_logit_multiplier:.4f}; the "
        f"output multiplier is Grok-1's {cfg.output_multiplier:.4f}. Full config: `config.json`.",
        "",
        "## Data",
        "",
        "`grokviz/corpus/corpus.jsonl.xz` (see `grokviz/corpus/PROVENANCE.md`): CPython 3.11 standard-library "
        "source (`code`), the Python reference topics, licence and docstrings (`prose`), and synthetic "
        "arithmetic, sequences and tables (`numbers`); PSF licence and CC0. Tokenizer: SentencePiece BPE, "
        "4,096 pieces, trained on the training split (pad 0, BOS 1, EOS 2, UNK 3).",
        "",
        "## Training",
        "",
        f"`grokviz train --preset tiny` (AdamW b1 {tr.get('b1')}, b2 {tr.get('b2')}, peak lr {tr.get('lr')}, "
        f"{tr.get('warmup')} warm-up steps then cosine decay to {tr.get('min_lr_ratio')}x, weight decay "
        f"{tr.get('weight_decay')} on matrices, global-norm clipping {tr.get('clip')}, load-balancing "
        f"coefficient {tr.get('aux_coef')}, router z-loss coefficient {tr.get('z_coef')}); "
        f"{tr.get('steps')} steps of {tr.get('batch_size')} x {tr.get('seq_len')} tokens "
        f"({tr.get('steps', 0) * tr.get('batch_size', 0) * tr.get('seq_len', 0):,} tokens, seed "
        f"{tr.get('seed')}). Training time: **{secs / 60:.1f} minutes** of steps "
        f"({conf.get('wall_seconds', float('nan')) / 60:.1f} minutes wall clock including data encoding, "
        f"compilation, evaluation and checkpoints) on a 2-core CPU shared with other jobs (throughput varied "
        f"between about 1,000 and 7,000 tokens/s). Batches depend only on seed and step and resume is exact, so "
        f"re-running the command with the same code on the same machine gives the same weights bit for bit; the "
        f"shipped weights were trained with the sort-based sparse experts of commit 720e9ad, and another expert "
        f"implementation or CPU changes only the last bits of floating point (then the run matches to float "
        f"tolerance, not bitwise).",
        "",
        "## Validation loss",
        "",
        f"{lo['all']['tokens']:,} predicted tokens ({stats['validation_windows']} non-overlapping windows of "
        f"{stats['seq_len']}). Unigram baseline: training-split token frequencies, add-one smoothed. "
        "Bits/byte divide the total loss in bits by the UTF-8 bytes of the predicted tokens.",
        "",
        "| split | tokens | model nats/token | unigram nats/token | model bits/byte | unigram bits/byte |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("all",) + DOMAINS:
        r = lo[name]
        lines.append(f"| {name} | {r['tokens']:,} | {r['nats_per_token']:.3f} | {r['unigram_nats_per_token']:.3f} "
                     f"| {r['bits_per_byte']:.3f} | {r['unigram_bits_per_byte']:.3f} |")
    c = stats["consecutive"]
    lines += [
        "",
        "## Routing",
        "",
        f"Expert load = share of the {k} routing slots per token that each expert receives, over all validation "
        f"tokens. Coefficient of variation (std/mean over the {E} experts) of perfectly uniform routing is 0; "
        f"sampling noise of uniformly random routing on this many tokens would give {stats['load_cv_random']:.4f}.",
        "",
        "| layer | load CV | expert shares (e0 ... e7) |",
        "|---:|---:|---|",
    ]
    for l in range(L):
        sh = " ".join(f"{100 * s:.1f}" for s in stats["expert_share"][l])
        lines.append(f"| {l} | {stats['load_cv'][l]:.3f} | {sh} |")
    lines += [
        "",
        f"Consecutive-token statistics (Mixtral paper, section 5): over {c['pairs']:,} pairs of adjacent tokens "
        f"per layer, the share whose first-choice expert repeats, and whose top-{k} sets overlap (share at least "
        f"one expert); random routing gives {_pct(fb)} and {_pct(ob)}.",
        "",
        f"| layer | first choice repeats | random | top-{k} sets overlap | random |",
        "|---:|---:|---:|---:|---:|",
    ]
    for l in range(L):
        lines.append(f"| {l} | {_pct(c['first_repeat'][l])} | {_pct(fb)} | {_pct(c['topk_overlap'][l])} | "
                     f"{_pct(ob)} |")
    fr, ov = np.asarray(c["first_repeat"]), np.asarray(c["topk_overlap"])
    verdict = ("Routing has real structure: " if fr.max() > fb + 0.05 else "Routing shows little structure: ")
    lines += ["", verdict + f"first-choice repeats are {fr.min() / fb:.1f}x to {fr.max() / fb:.1f}x the random "
              f"rate (highest in layer {int(fr.argmax())}), top-{k} overlaps {_pct(ov.min())} to {_pct(ov.max())} "
              f"against {_pct(ob)}, while the load stays balanced by the auxiliary loss."]
    lines += ["", "By domain (pairs of adjacent tokens inside one domain):", "",
              "| layer | " + " | ".join(f"{d} repeat | {d} overlap" for d in DOMAINS) + " |",
              "|---:|" + "---:|" * (2 * len(DOMAINS))]
    for l in range(L):
        cells = []
        for d in DOMAINS:
            pd_ = c["per_domain"][d]
            cells += [_pct(pd_["first_repeat"][l]), _pct(pd_["topk_overlap"][l])]
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    lines += ["", "Preferred first-choice expert per domain (its share of that domain's tokens; uniform = "
              f"{_pct(1 / E)}):", "", "| layer | " + " | ".join(DOMAINS) + " |", "|---:|" + "---|" * len(DOMAINS)]
    for l in range(L):
        cells = []
        for d in DOMAINS:
            row = stats["first_choice_share_by_domain"][d][l]
            e = int(np.argmax(row))
            cells.append(f"expert {e} ({_pct(row[e])})")
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    lines += ["", "## Example next-token predictions", "",
              "Top-5 next tokens (probability) and a 24-token greedy continuation; `▁` is a space.", ""]
    for p in preds:
        top = ", ".join(f"`{_piece(t)}` {pr:.2f}" for t, pr in p["top_next"])
        lines += [f"* `{p['prompt']!r}` → {top}", f"  greedy: `{p['greedy']!r}`"]
    lines += ["", "## Limitations", "",
              "A toy: a few million parameters trained for minutes on a few million tokens of Python and its "
              "documentation. It knows Python's surface syntax, common standard-library idioms and the look of "
              "the arithmetic in the corpus, not arithmetic itself; it is for studying routing, not for use.",
              ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="measure the tiny model and write its model card")
    ap.add_argument("--dir", default=str(TINY_DIR))
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args(argv)
    from .train import load_data

    d = Path(args.dir)
    model = load_tiny(d)
    conf = json.loads((d / "config.json").read_text())
    data = load_data(str(d / "tokenizer.model"))
    stats = measure(model, data)
    preds = predictions(model)
    (d / "card_stats.json").write_text(json.dumps({"stats": stats, "predictions": preds}, indent=1) + "\n")
    card = render(stats, preds, conf, model)
    (d / "MODEL_CARD.md").write_text(card)
    if args.print:
        print(card)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())

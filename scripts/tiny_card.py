"""Measure the shipped tiny model on the held-out split and write its model card.

``python scripts/tiny_card.py [--dir grokviz/assets/tiny] [--print]`` computes, on the corpus's ``validation``
split only (non-overlapping windows of ``seq_len + 1`` tokens; position t predicts t + 1):

* validation loss in nats/token and bits/byte, overall and per domain, against a unigram baseline (token
  frequencies of the *training* split, add-one smoothed): the per-token log-probabilities come from the model's
  own forward pass and :func:`grokviz.analysis.common.next_token_logprobs`;
* per-layer expert load, its coefficient of variation and the random-routing CV
  (``grokviz.analysis``: ``load_share``, ``load_cv``, ``load_baseline_cv``);
* the consecutive-token statistics per layer, overall and per domain, with their random baselines
  (``consecutive_rates``, ``consecutive_baselines``);
* per-domain first-choice expert shares (``expert_load`` of the first-choice slot over each domain's tokens);
* next-token predictions and greedy continuations for a few prompts,

and writes ``card_stats.json`` and ``MODEL_CARD.md`` in the model folder. Every number in the card's text comes
from those statistics, the folder's ``config.json`` and ``training.json``, or the corpus.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import grokviz as gv
from grokviz import analysis
from grokviz.analysis.common import next_token_logprobs
from grokviz.config import is_real
from grokviz.model.transformer import forward
from grokviz.tiny import TINY_DIR

DOMAINS = ("code", "prose", "numbers")
PROMPTS = ["def forward(self, x):", "import os\nimport", "class Parser:\n    def __init__(self", "12 + 7 = ",
           "1, 2, 3, 4, 5, ", "The Python interpreter", "for i in range(", "Return the number of"]


def _routing_fn(name):
    """A routing statistic from the ``grokviz.analysis`` namespace (or the submodule that defines it)."""
    for mod in (analysis, getattr(analysis, "routing", None), getattr(analysis, "specialisation", None)):
        if mod is not None and hasattr(mod, name):
            return getattr(mod, name)
    raise ImportError(f"grokviz.analysis has no {name}")


def piece_bytes(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for ('▁' is a space, byte-fallback pieces one byte, controls 0)."""
    sp = tok.sp
    out = np.zeros(sp.get_piece_size(), np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return out


def windows(data, seq_len: int):
    """(tokens [n, seq_len + 1], domain of each token [n, seq_len + 1]) of the validation stream."""
    stream, dom = data.validation, data.domains["validation"]
    n = (len(stream) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
    return stream[idx].astype(np.int32), dom[idx]


def forward_all(model, wins, batch: int):
    """(next-token log-probs [n, seq_len], top-k experts [L, n, seq_len, k]) of every window, in batches of
    ``batch`` (the last batch is filled up with copies of the first window, then cut off)."""
    cfg = model.cfg

    @jax.jit
    def fwd(params, x):
        out = forward(params, x, cfg, capture=frozenset({"blocks.moe.top_k_experts"}))
        return next_token_logprobs(out.logits.astype(jnp.float32), x), out.cache["blocks.moe.top_k_experts"]

    n = len(wins)
    fill = (-n) % batch
    padded = np.concatenate([wins, np.repeat(wins[:1], fill, 0)]) if fill else wins
    logp, experts = [], []
    for s in range(0, len(padded), batch):
        lp, ex = fwd(model.params, jnp.asarray(padded[s:s + batch]))
        take = min(batch, n - s)
        logp.append(np.asarray(lp)[:take])
        experts.append(np.asarray(ex)[:, :take, :-1])   # routing of the inputs (the last token predicts nothing)
    return np.concatenate(logp), np.concatenate(experts, axis=1)


def measure(model, data, *, seq_len: int = 128, batch: int = 32) -> dict:
    cfg, tok = model.cfg, model.tokenizer
    E, k = cfg.num_experts, cfg.top_k
    wins, wdom = windows(data, seq_len)
    inputs, targets, in_dom, tgt_dom = wins[:, :-1], wins[:, 1:], wdom[:, :-1], wdom[:, 1:]
    logp, experts = forward_all(model, wins, batch)
    real = is_real(inputs, cfg.pad_token)
    pred = real & is_real(targets, cfg.pad_token)

    counts = np.bincount(data.train, minlength=cfg.vocab_size).astype(np.float64) + 1.0
    uni_logp = np.log(counts / counts.sum())
    nll, uni, nbytes = -logp, -uni_logp[targets], piece_bytes(tok)[targets]

    def lossrow(mask):
        mask = mask & pred
        n, b = int(mask.sum()), int(nbytes[mask].sum())
        return {"tokens": n, "bytes": b,
                "nats_per_token": float(nll[mask].mean()), "unigram_nats_per_token": float(uni[mask].mean()),
                "bits_per_byte": float(nll[mask].sum() / math.log(2) / b),
                "unigram_bits_per_byte": float(uni[mask].sum() / math.log(2) / b)}

    loss = {"all": lossrow(np.ones_like(pred))}
    for i, d in enumerate(DOMAINS):
        loss[d] = lossrow(tgt_dom == i)

    share = analysis.load_share(experts, real, E)
    rates = analysis.consecutive_rates(experts, real)
    consec = {"first_repeat": rates["first_repeat"].tolist(), "topk_overlap": rates["topk_overlap"].tolist(),
              "pairs": int(rates["n_pairs"].iloc[0]), "per_domain": {}}
    first_choice = {}
    for i, d in enumerate(DOMAINS):
        in_d = real & (in_dom == i)          # a pair counts for a domain when both of its tokens belong to it
        r = analysis.consecutive_rates(experts, in_d)
        consec["per_domain"][d] = {"first_repeat": r["first_repeat"].tolist(),
                                   "topk_overlap": r["topk_overlap"].tolist()}
        first = analysis.expert_load(experts[..., :1], in_d, E) / max(int(in_d.sum()), 1)
        first_choice[d] = first.round(4).tolist()
    base = analysis.consecutive_baselines(E, k)
    return {"loss": loss, "expert_share": share.round(4).tolist(),
            "load_cv": analysis.load_cv(experts, real, E).tolist(),
            "load_cv_random": _routing_fn("load_baseline_cv")(int(real.sum()), E, k), "consecutive": consec,
            "consecutive_baselines": {"first_repeat": base["first_repeat"], "topk_overlap": base["topk_overlap"]},
            "first_choice_share_by_domain": first_choice, "validation_windows": int(len(wins)), "seq_len": seq_len,
            "train_tokens": int(len(data.train))}


def predictions(model, prompts=PROMPTS, top: int = 5, gen: int = 24, width: int = 96) -> list[dict]:
    """Top next tokens and a greedy continuation for each prompt (right padding keeps one compiled shape)."""
    tok, cfg = model.tokenizer, model.cfg
    logits_at = jax.jit(lambda params, x: forward(params, x, cfg).logits)
    out = []
    for text in prompts:
        ids = tok.encode(text)
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(ids)] = ids
        first, n = None, len(ids)
        for _ in range(gen):
            lg = np.asarray(logits_at(model.params, jnp.asarray(buf)))[0, n - 1]
            if first is None:
                pr = np.exp(lg - lg.max())
                pr /= pr.sum()
                first = [(tok.id_to_piece(int(i)), float(pr[i])) for i in np.argsort(-pr)[:top]]
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


def render(stats: dict, preds: list[dict], conf: dict, cfg, vocab_size: int) -> str:
    """The card's Markdown from the measured ``stats`` / ``preds`` and the folder's ``training.json`` (``conf``)."""
    L, E, k = cfg.num_layers, cfg.num_experts, cfg.top_k
    lo = stats["loss"]
    fb, ob = stats["consecutive_baselines"]["first_repeat"], stats["consecutive_baselines"]["topk_overlap"]
    tr = conf["train"]
    secs, wall = conf["train_seconds"], conf["wall_seconds"]
    seen = tr["steps"] * tr["batch_size"] * tr["seq_len"]
    lines = [
        "# grokviz tiny: a small trained Grok-1-architecture model",
        "",
        "Shipped with the package so that the workbench has real routing to explore offline: "
        "`gv.load(\"tiny\")` returns it with its tokenizer attached. The folder is an ordinary converted grokviz "
        "checkpoint (safetensors shard, `model.safetensors.index.json`, `config.json`, `tokenizer.model`; "
        "training settings in `training.json`). All numbers below are measured on the corpus's held-out "
        "`validation` split and are produced by `python scripts/tiny_card.py` (raw values in `card_stats.json`).",
        "",
        "## Model",
        "",
        f"Same code path as Grok-1 (`grokviz.model.transformer.forward`): {L} layers, d_model {cfg.d_model}, "
        f"{cfg.num_q_heads} query / {cfg.num_kv_heads} KV heads of {cfg.head_dim} (grouped-query attention), "
        f"{E} experts top-{k} (GELU-gated, expert hidden size {cfg.ffn_size}, gates not renormalised), "
        f"attention logits soft-capped at {cfg.attn_softcap:g}, RMSNorm sandwich norms, RoPE, tied "
        f"embeddings, vocabulary {cfg.vocab_size}, context {cfg.sequence_len}. "
        f"{conf['num_params']:,} parameters, float32. As Grok-1 scales embeddings by sqrt(d_model) and attention "
        f"logits by 1/sqrt(head_dim), the tiny model uses sqrt({cfg.d_model}) = {cfg.embedding_multiplier:.4f} and "
        f"1/sqrt({cfg.head_dim}) = {cfg.attn_logit_multiplier:.4f}; the output multiplier is Grok-1's "
        f"{cfg.output_multiplier:.4f}. Full config: `config.json`.",
        "",
        "## Data",
        "",
        "`grokviz/corpus/corpus.jsonl.xz` (see `grokviz/corpus/PROVENANCE.md`): Python standard-library source "
        "(`code`), the Python reference topics, licence and docstrings (`prose`), and synthetic arithmetic, "
        f"sequences and tables (`numbers`); PSF licence and CC0. {stats['train_tokens']:,} training tokens. "
        f"Tokenizer: SentencePiece BPE, {vocab_size:,} pieces, trained on the training split (pad "
        f"{cfg.pad_token}, EOS {cfg.eos_token}).",
        "",
        "## Training",
        "",
        f"`grokviz train --preset tiny` (AdamW b1 {tr['b1']}, b2 {tr['b2']}, peak lr {tr['lr']}, "
        f"{tr['warmup']} warm-up steps then cosine decay to {tr['min_lr_ratio']}x, weight decay "
        f"{tr['weight_decay']} on matrices, global-norm clipping {tr['clip']}, load-balancing "
        f"coefficient {tr['aux_coef']}, router z-loss coefficient {tr['z_coef']}); "
        f"{tr['steps']} steps of {tr['batch_size']} x {tr['seq_len']} tokens ({seen:,} tokens, seed "
        f"{tr['seed']}). Training time: **{secs / 60:.1f} minutes** of steps ({wall / 60:.1f} minutes wall clock "
        f"including data encoding, compilation, evaluation and checkpoints) on {conf['machine']}, "
        f"{seen / secs:,.0f} tokens/s on average. Batches depend only on seed and step and resume is exact, so "
        f"re-running the command with the same code on the same machine gives the same weights bit for bit; the "
        f"shipped weights were trained with {conf['code']}, and another expert implementation or CPU changes only "
        f"the last bits of floating point (then the run matches to float tolerance, not bitwise).",
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
    cv = np.asarray(stats["load_cv"])
    lines += [
        "", "## Routing", "",
        f"Expert load = share of the {k} routing slots per token that each expert receives, over all validation "
        f"tokens. Coefficient of variation (std/mean over the {E} experts) of perfectly uniform routing is 0; "
        f"sampling noise of uniformly random routing on this many tokens would give {stats['load_cv_random']:.4f}.",
        "",
        f"| layer | load CV | expert shares (e0 ... e{E - 1}) |",
        "|---:|---:|---|",
    ]
    for l in range(L):
        sh = " ".join(f"{100 * s:.1f}" for s in stats["expert_share"][l])
        lines.append(f"| {l} | {cv[l]:.3f} | {sh} |")
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
    verdict = "Routing has real structure: " if fr.max() > fb + 0.05 else "Routing shows little structure: "
    lines += ["", verdict + f"first-choice repeats are {fr.min() / fb:.1f}x to {fr.max() / fb:.1f}x the random "
              f"rate (highest in layer {int(fr.argmax())}), top-{k} overlaps {_pct(ov.min())} to {_pct(ov.max())} "
              f"against {_pct(ob)}, while the load CV stays between {cv.min():.3f} and {cv.max():.3f} (load-balancing "
              f"coefficient {tr['aux_coef']})."]
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
              f"Top-{len(preds[0]['top_next'])} next tokens (probability) and a greedy continuation; `▁` is a "
              "space.", ""]
    for p in preds:
        top = ", ".join(f"`{_piece(t)}` {pr:.2f}" for t, pr in p["top_next"])
        lines += [f"* `{p['prompt']!r}` → {top}", f"  greedy: `{p['greedy']!r}`"]
    lines += ["", "## Limitations", "",
              f"A toy: {conf['num_params'] / 1e6:.1f} million parameters trained for {secs / 60:.0f} minutes on "
              f"{stats['train_tokens'] / 1e6:.1f} million tokens of Python and its documentation. It knows Python's "
              "surface syntax, common standard-library idioms and the look of the arithmetic in the corpus, not "
              "arithmetic itself; it is for studying routing, not for use.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from grokviz.train import load_data

    ap = argparse.ArgumentParser(description="measure the tiny model and write its model card")
    ap.add_argument("--dir", default=str(TINY_DIR))
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    model = gv.load(d, progress=False)
    conf = json.loads((d / "training.json").read_text())
    data = load_data(str(d / "tokenizer.model"))
    stats = measure(model, data)
    preds = predictions(model)
    (d / "card_stats.json").write_text(json.dumps({"stats": stats, "predictions": preds}, indent=1) + "\n")
    card = render(stats, preds, conf, model.cfg, model.tokenizer.vocab_size)
    (d / "MODEL_CARD.md").write_text(card)
    if args.print:
        print(card)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""``grokviz generate MODEL "prompt" --max-new-tokens N --temperature T [--top-p P --top-k K --seed S --routing]``.

MODEL is a checkpoint folder (any format :func:`grokviz.load` reads) or ``tiny``. Prints the continuation; with
``--routing`` also one line per generated token with its id, piece, log-probability and its first- and
second-choice experts at every MoE layer."""

from __future__ import annotations

import argparse

import numpy as np


def add_parser(sub) -> None:
    s = sub.add_parser("generate", help="sample a continuation of a prompt (KV cache; --routing: experts per token)")
    s.add_argument("model", help="checkpoint folder, or 'tiny' for the bundled model")
    s.add_argument("prompt", help="the prompt text (the model's tokenizer encodes it)")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rng", choices=["default", "grok1"], default="default",
                   help="grok1: the Grok-1 runner's key chain, reproduced bit for bit")
    s.add_argument("--no-stop", action="store_true", help="do not stop at the model's EOS token")
    s.add_argument("--routing", action="store_true", help="print each generated token's experts per MoE layer")
    s.set_defaults(fn=cmd_generate)


def routing_lines(res) -> list[str]:
    """One line per generated token: step, id, piece, log-probability, then ``L<layer>:<e1>,<e2>`` per MoE layer."""
    top = res.step("blocks.moe.top_k_experts")  # [steps, moe layers, batch, k]
    layers = res.step_layers("blocks.moe.top_k_experts")
    tok = res.model.tokenizer
    lines = []
    for t in range(int(res.lengths[0])):
        i = int(res.tokens[0, t])
        piece = tok.id_to_piece(i) if tok is not None else str(i)
        experts = " ".join(f"L{layer}:{','.join(str(int(e)) for e in top[t, j, 0])}" for j, layer in enumerate(layers))
        lines.append(f"{t:4d} {i:6d} {piece!r:>14} logp {float(res.logprobs[0, t]):8.3f}  {experts}")
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    from ..loading import load

    model = load(args.model, progress=False)
    if model.tokenizer is None:
        raise ValueError(f"{args.model}: the checkpoint has no tokenizer, so a text prompt cannot be encoded")
    res = model.generate(args.prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, seed=args.seed, rng=args.rng, stop=() if args.no_stop else None,
                         capture="routing" if args.routing else None)
    print(res.text)
    if args.routing:
        print(f"# step    id          piece  log-prob  first,second expert per MoE layer "
              f"({np.sum(res.lengths)} tokens)")
        print("\n".join(routing_lines(res)))
    return 0

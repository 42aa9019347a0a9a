"""``grokviz train``: train a preset on the shipped corpus and write a model that ``gv.load(out)`` opens."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .config import PRESETS, resolve


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="grokviz train", description="Train a Grok-architecture model on the "
                                 "shipped offline corpus; the output folder is a converted grokviz checkpoint "
                                 "(gv.load(OUT)) with the resume checkpoint and the training history next to it.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", default=None, help="output folder (default: ./grokviz-<preset>)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--aux-coef", type=float, default=None)
    ap.add_argument("--z-coef", type=float, default=None)
    ap.add_argument("--ckpt-every", type=int, default=None, metavar="N",
                    help="write the resume checkpoint every N steps (default: the preset's, "
                         + ", ".join(f"{k} {tc.ckpt_every}" for k, (_, tc) in sorted(PRESETS.items()))
                         + "; 0: only at the end)")
    ap.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def cli_main(argv: list[str]) -> int:
    """``grokviz train --preset tiny|quick [--out DIR] [--steps N] [--ckpt-every N]`` (argv excludes ``train``).

    Returns 0, or 1 after printing the error (a checkpoint of another run, a foreign --out folder, bad values)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError) as e:
        print(f"grokviz train: error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    import jax

    from ..params import count_params, init_params
    from .checkpointing import check_run, read_info
    from .data import load_data
    from .export import CHECKPOINT, check_out_dir, save_model
    from .loop import train
    from .step import evaluate

    cfg, tc = PRESETS[args.preset]
    tc = resolve(tc, steps=args.steps, aux_coef=args.aux_coef, z_coef=args.z_coef, ckpt_every=args.ckpt_every)
    out = check_out_dir(args.out or f"grokviz-{args.preset}")
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not args.no_resume:  # refuse another run's checkpoint before encoding the corpus
        check_run(ckpt, read_info(ckpt), cfg.replace(sequence_len=max(cfg.sequence_len, tc.seq_len)), tc)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = load_data()
    n_params = count_params(init_params(cfg, jax.random.key(0)))
    print(f"{cfg.describe()}  params={n_params:,}  train tokens={len(data.train):,} validation tokens="
          f"{len(data.validation):,}", flush=True)
    params, hist = train(cfg, data, tc=tc, checkpoint=ckpt, resume=not args.no_resume,
                         progress=not args.no_progress)
    final = evaluate(params, cfg, tc, data, n_batches=tc.eval_batches)
    wall = time.time() - t0
    save_model(out, cfg, params, history=hist,
               extra={"num_params": n_params, "train": dataclasses.asdict(tc), "final_eval": final,
                      "train_seconds": hist["train_seconds"], "wall_seconds": wall})
    print(f"done: {hist['steps_done']} steps, {hist['train_seconds']:.0f}s training ({wall:.0f}s wall), "
          f"val_loss {final['val_loss']:.4f} nats/token -> {out} (open it with grokviz.load({str(out)!r}))")
    return 0

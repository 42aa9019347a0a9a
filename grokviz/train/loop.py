"""The training loop: :func:`train` (progress bar, logging, evaluation, periodic checkpoints, exact resume)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GrokConfig
from ..params import init_params
from .checkpointing import check_run, load_checkpoint, read_info, run_meta, save_checkpoint
from .config import TrainConfig, resolve
from .data import TokenData, load_data
from .step import compiled, evaluate


def train(cfg: GrokConfig, data: TokenData | None = None, *, steps: int | None = None,
          aux_coef: float | None = None, z_coef: float | None = None, tc: TrainConfig | None = None,
          params=None, checkpoint: str | os.PathLike | None = None, resume: bool = True,
          callback: Callable[[int, dict], Any] | None = None, progress: bool = True,
          stop_after: int | None = None, **overrides):
    """Train ``cfg`` on ``data`` (default: the shipped corpus). Returns ``(params, history)``.

    ``history``: ``step``, ``loss`` (total), ``ce``, ``aux``, ``z``, ``grad_norm``, ``tokens_per_s`` per logged
    step; ``expert_load``: per logged step a ``[layer][expert]`` list of routing-slot *shares* (the teaching
    notebook plots these: collapse without the aux loss, balance with it); ``eval``: list of
    ``{step, val_loss, val_aux}``; ``train_seconds``: wall time of the steps (not compilation); ``steps_done``.
    ``callback(step, metrics)`` is called at every logged step (return ``False`` to stop early).
    ``checkpoint``: file path; saved every ``tc.ckpt_every`` steps and at the end; resumed from if it exists
    and ``resume`` (after checking it belongs to this run: see :mod:`grokviz.train.checkpointing`).
    ``stop_after``: stop (after checkpointing) once this many steps are done — simulates an interruption.
    Other keyword arguments override :class:`TrainConfig` fields.

    The batch of step ``s`` depends only on ``(seed, s)``, so a run resumed from its checkpoint ends with
    bit-identical parameters to an uninterrupted one.
    """
    tc = resolve(tc, steps=steps, aux_coef=aux_coef, z_coef=z_coef, **overrides)
    if tc.seq_len > cfg.sequence_len:
        cfg = cfg.replace(sequence_len=tc.seq_len)
    data = data if data is not None else load_data()
    if int(data.train.max()) >= cfg.vocab_size:
        raise ValueError(f"data has token id {int(data.train.max())} but cfg.vocab_size is {cfg.vocab_size}")

    resuming = checkpoint is not None and resume and Path(checkpoint).exists()
    if resuming:  # refuse another run's checkpoint before anything is traced or compiled
        check_run(checkpoint, read_info(checkpoint), cfg, tc)
    opt, step_fn, ev = compiled(cfg, tc)
    if params is None:
        params = init_params(cfg, jax.random.key(tc.seed))
    with jax.numpy_dtype_promotion("standard"):
        opt_state = opt.init(params)
    start, history = 0, new_history()
    if resuming:
        params, opt_state, start, history, _ = load_checkpoint(checkpoint, params, opt_state, cfg=cfg, tc=tc)

    aux_c, z_c = jnp.float32(tc.aux_coef), jnp.float32(tc.z_coef)
    meta = run_meta(cfg, tc)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    tokens_per_step = tc.batch_size * tc.seq_len

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), 0
    first = start  # the first step of this process includes compilation; exclude it from timings
    s = start
    try:
        while s < end:
            batch = jnp.asarray(data.batch(s, tc.batch_size, tc.seq_len, tc.seed))
            with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict promotion
                params, opt_state, m = step_fn(params, opt_state, batch, aux_c, z_c)
            s += 1
            n_last += 1
            if s == first + 1:
                jax.block_until_ready(params)
                t_last, n_last = time.perf_counter(), 0
            if s % tc.log_every == 0 or s == end:
                m = jax.device_get(m)
                now = time.perf_counter()
                tps = tokens_per_step * n_last / (now - t_last) if n_last else float("nan")
                if n_last:
                    history["train_seconds"] += now - t_last
                t_last, n_last = now, 0
                share = _log(history, s, m, tps)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(m['ce']):.3f}", aux=f"{float(m['aux']):.3f}", tok_s=f"{tps:,.0f}")
                if callback is not None and callback(s, {**{k: float(m[k]) for k in ("loss", "ce", "aux", "z")},
                                                         "expert_load": share}) is False:
                    end = s
            if bar is not None:
                bar.update(1)
            if tc.eval_every and (s % tc.eval_every == 0 or s == tc.steps):
                r = evaluate(params, cfg, tc, data, ev=ev)
                history["eval"].append({"step": s, **r})
                if bar is not None:
                    bar.write(f"step {s}: val_loss {r['val_loss']:.4f} nats/token")
                t_last, n_last = time.perf_counter(), 0
            if checkpoint is not None and tc.ckpt_every and s % tc.ckpt_every == 0 and s < end:
                save_checkpoint(checkpoint, params, opt_state, s, history, meta)
                t_last, n_last = time.perf_counter(), 0
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:
        save_checkpoint(checkpoint, params, opt_state, s, history, meta)
    history["steps_done"] = s
    return params, history


def _log(history: dict, s: int, m: dict, tps: float):
    load = np.asarray(m["load"], np.float64)
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    history["step"].append(s)
    for k in ("loss", "ce", "aux", "z", "grad_norm"):
        history[k].append(float(m[k]))
    history["tokens_per_s"].append(float(tps))
    history["expert_load"].append(share.round(5).tolist())
    return share


def new_history():
    return {"step": [], "loss": [], "ce": [], "aux": [], "z": [], "grad_norm": [], "tokens_per_s": [],
            "expert_load": [], "eval": [], "train_seconds": 0.0}

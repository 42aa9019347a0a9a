"""Training any Grok-architecture config with optax AdamW, on the same forward pass the workbench runs.

* loss = next-token cross-entropy + ``aux_coef`` x Switch-Transformer load-balancing loss
  + ``z_coef`` x router z-loss (both averaged over layers; either coefficient may be zero);
* global-norm gradient clipping, linear warm-up then cosine decay, decoupled weight decay on matrices only;
* evaluation on the corpus's held-out ``validation`` split;
* a ``tqdm.auto`` progress bar with loss and tokens/s;
* periodic **atomic** checkpoints (write a temp file, then ``os.replace``) and **exact** resume: the batch of
  step ``s`` depends only on ``(seed, s)``, so an interrupted run resumed from its checkpoint ends with
  bit-identical parameters to an uninterrupted one.

Python use (the teaching notebook)::

    from grokviz.train import train, PRESETS, load_data
    cfg, tc = PRESETS["quick"]          # 2 layers, d_model 64, 8 experts top-2; 400 steps of 16 x 64 tokens
    params, hist = train(cfg, load_data(), tc=tc, aux_coef=0.0)   # hist["expert_load"]: [step][layer][expert]
    params, hist = train(cfg, load_data(), tc=tc, aux_coef=0.1)   # same compiled step, balanced routing

On a shared 2-core CPU each run takes about 30-45 s (the first includes compilation). Measured: without the
aux loss the per-layer load CV grows from about 0.5 to 0.8/0.7 (one expert takes ~37% of the slots, vs 12.5%
balanced); with ``aux_coef=0.1`` it falls to about 0.12/0.16 at the same cross-entropy.

Expert implementation: training needs reverse-mode differentiation through the experts; if the configured
``expert_impl`` cannot be differentiated, :func:`differentiable_impl` falls back to ``"dense"`` with a warning.

Command line: ``grokviz train --preset tiny|quick [--out DIR] [--steps N]`` (see :func:`cli_main`).

Definitions. For one layer with router probabilities ``p[t, e]`` over N tokens and top-k selections:
``f_e`` = share of the N*k routing slots sent to expert e; ``P_e`` = mean_t p[t, e];
``aux = E * sum_e f_e * P_e`` (1 when perfectly balanced; Switch Transformer eq. 4, generalised to k slots);
``z = mean_t logsumexp_e(router_logits[t])^2`` (ST-MoE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .config import GrokConfig
from .model.transformer import forward
from .params import count_params, init_params

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"
TOKENIZER_PATH = ASSETS / "tokenizer.model"
CAPTURE = frozenset({"blocks.moe.router_logits", "blocks.moe.top_k_experts"})


# --------------------------------------------------------------------------------------------------------
# configuration and presets
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    aux_coef: float = 0.01
    z_coef: float = 1e-3
    eval_every: int = 250
    eval_batches: int = 8
    ckpt_every: int = 250
    log_every: int = 10
    seed: int = 0
    expert_impl: str = "sparse"


def tiny_config() -> GrokConfig:
    """The shipped model: Grok-1 architecture at toy size (multipliers rescaled to this width)."""
    d, hd = 128, 32
    return GrokConfig(name="grok1-tiny-trained", vocab_size=4096, d_model=d, num_layers=4, num_q_heads=4,
                      num_kv_heads=2, head_dim=hd, widening_factor=2, num_experts=8, top_k=2,
                      embedding_multiplier=math.sqrt(d), attn_logit_multiplier=1 / math.sqrt(hd),
                      sequence_len=128)


def quick_config() -> GrokConfig:
    d, hd = 64, 16
    return GrokConfig(name="grok1-quick", vocab_size=4096, d_model=d, num_layers=2, num_q_heads=4,
                      num_kv_heads=2, head_dim=hd, widening_factor=2, num_experts=8, top_k=2,
                      embedding_multiplier=math.sqrt(d), attn_logit_multiplier=1 / math.sqrt(hd),
                      sequence_len=64)


PRESETS: dict[str, tuple[GrokConfig, TrainConfig]] = {
    "tiny": (tiny_config(), TrainConfig(steps=1200, batch_size=16, seq_len=128, lr=3e-3, warmup=100,
                                        eval_every=400, ckpt_every=200, aux_coef=0.01, z_coef=1e-3)),
    "quick": (quick_config(), TrainConfig(steps=400, batch_size=16, seq_len=64, lr=5e-3, warmup=30,
                                          eval_every=0, eval_batches=4, ckpt_every=0, aux_coef=0.01,
                                          z_coef=1e-3, log_every=5)),
}


# --------------------------------------------------------------------------------------------------------
# data
@dataclasses.dataclass
class TokenData:
    """Token streams (documents joined with the EOS id) for the train and validation splits."""

    train: np.ndarray
    validation: np.ndarray
    domains: dict = dataclasses.field(default_factory=dict)  # split -> int8 array of domain ids per token
    domain_names: tuple = ("code", "prose", "numbers")

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0, split: str = "train"):
        """Random windows of ``seq_len + 1`` tokens; depends only on (seed, step, split): resumable."""
        stream = getattr(self, split)
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
        return np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)

    def eval_batches(self, n: int, batch_size: int, seq_len: int):
        """Fixed, non-overlapping windows spread evenly over the validation stream."""
        stream = self.validation
        total = n * batch_size
        stride = max(seq_len + 1, (len(stream) - seq_len - 1) // total)
        starts = [(i * stride) % (len(stream) - seq_len - 1) for i in range(total)]
        rows = np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)
        return rows.reshape(n, batch_size, seq_len + 1)


@lru_cache(maxsize=4)
def load_data(tokenizer_path: str = str(TOKENIZER_PATH), max_chars: int | None = None) -> TokenData:
    """Encode the shipped corpus with the shipped tokenizer (cached per process). ``max_chars`` caps each split
    per domain (for quick experiments); documents keep their corpus order."""
    from .corpus.build import load
    from .tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    docs = load()
    names = ("code", "prose", "numbers")
    out, doms = {}, {}
    for split in ("train", "validation"):
        ids, dom, used = [], [], {n: 0 for n in names}
        for d in docs:
            if d["split"] != split:
                continue
            if max_chars is not None and used[d["domain"]] >= max_chars:
                continue
            used[d["domain"]] += len(d["text"])
            t = tok.encode(d["text"]) + [tok.eos_id]
            ids.extend(t)
            dom.extend([names.index(d["domain"])] * len(t))
        out[split] = np.asarray(ids, np.int32)
        doms[split] = np.asarray(dom, np.int8)
    return TokenData(out["train"], out["validation"], doms)


# --------------------------------------------------------------------------------------------------------
# losses
def router_losses(router_logits, experts, real, num_experts: int):
    """(load-balancing aux, z-loss), each averaged over layers. router_logits [L,B,T,E]; experts [L,B,T,k]."""
    w = real.astype(jnp.float32)[None, :, :, None]              # [1,B,T,1]
    n = jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0)
    probs = jax.nn.softmax(router_logits, axis=-1)
    P = jnp.sum(probs * w, axis=(1, 2)) / n                      # [L,E]
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [L,B,T,k,E]
    f = jnp.sum(onehot * w[..., None], axis=(1, 2, 3)) / (n * experts.shape[-1])  # [L,E]
    aux = num_experts * jnp.sum(jax.lax.stop_gradient(f) * P, axis=-1)           # [L]
    z = jnp.sum(jax.nn.logsumexp(router_logits, axis=-1) ** 2 * w[..., 0], axis=(1, 2)) / n
    return jnp.mean(aux), jnp.mean(z)


def expert_counts(experts, num_experts: int):
    """[L,B,T,k] -> [L,E] number of routing slots per expert."""
    return jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.int32), axis=(1, 2, 3))


def loss_fn(params, batch, cfg: GrokConfig, aux_coef, z_coef, expert_impl: str = "sparse"):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = forward(params, inputs, cfg, capture=CAPTURE, expert_impl=expert_impl)
    logits = out.logits.astype(jnp.float32)
    real = ((targets != cfg.pad_token) & (inputs != cfg.pad_token)).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    ce = jnp.sum(nll * real) / jnp.maximum(jnp.sum(real), 1.0)
    aux, z = router_losses(out.cache["blocks.moe.router_logits"], out.cache["blocks.moe.top_k_experts"],
                           inputs != cfg.pad_token, cfg.num_experts)
    total = ce + aux_coef * aux + z_coef * z
    return total, dict(ce=ce, aux=aux, z=z, load=expert_counts(out.cache["blocks.moe.top_k_experts"],
                                                                cfg.num_experts))


def make_optimizer(tc: TrainConfig, steps: int | None = None):
    steps = steps or tc.steps
    warmup = min(tc.warmup, max(steps - 1, 1))
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(steps, warmup + 1), tc.lr * tc.min_lr_ratio)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(tc.clip),
                       optax.adamw(sched, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def make_step(cfg: GrokConfig, tc: TrainConfig, opt):
    @jax.jit
    def step(params, opt_state, batch, aux_coef, z_coef):
        return _step(params, opt_state, batch, aux_coef, z_coef)

    def _step(params, opt_state, batch, aux_coef, z_coef):
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, cfg, aux_coef, z_coef,
                                                                     tc.expert_impl)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        m = dict(m, loss=loss, grad_norm=_global_norm(grads))
        return params, opt_state, m

    return step


def make_eval(cfg: GrokConfig, tc: TrainConfig):
    @jax.jit
    def ev(params, batch):
        _, m = loss_fn(params, batch, cfg, 0.0, 0.0, tc.expert_impl)
        return m["ce"], m["aux"]

    return ev


@lru_cache(maxsize=8)
def differentiable_impl(cfg: GrokConfig, tc: TrainConfig) -> str:
    """``tc.expert_impl`` if reverse-mode differentiation traces through it, else ``"dense"`` (with a warning).

    Checked by tracing ``jax.grad`` of the loss with ``jax.eval_shape`` (nothing is compiled or run)."""
    if tc.expert_impl == "dense":
        return "dense"
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    batch = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1), jnp.int32)
    try:
        with jax.numpy_dtype_promotion("standard"):
            jax.eval_shape(jax.grad(lambda p, b: loss_fn(p, b, cfg, 0.01, 0.001, tc.expert_impl)[0]),
                           params, batch)
        return tc.expert_impl
    except (ValueError, TypeError, NotImplementedError) as e:
        import warnings
        warnings.warn(f"expert_impl={tc.expert_impl!r} cannot be differentiated ({str(e).splitlines()[0]}); "
                      f"training with expert_impl='dense' (same function, all experts computed)", stacklevel=3)
        return "dense"


@lru_cache(maxsize=8)
def _compiled_key(cfg: GrokConfig, tc: TrainConfig):
    tc = dataclasses.replace(tc, expert_impl=differentiable_impl(cfg, tc))
    opt = make_optimizer(tc)
    return opt, make_step(cfg, tc, opt), make_eval(cfg, tc)


def _compiled(cfg: GrokConfig, tc: TrainConfig):
    """(optimizer, jitted step, jitted eval), shared by runs that differ only in the loss coefficients, the
    logging/checkpoint cadence or the seed (all passed as values), so a notebook comparing aux_coef=0 with
    aux_coef=0.01 compiles once."""
    key = dataclasses.replace(tc, aux_coef=0.0, z_coef=0.0, eval_every=0, ckpt_every=0, log_every=1, seed=0)
    return _compiled_key(cfg, key)


def evaluate(params, cfg, tc, data: TokenData, n_batches: int | None = None, ev=None) -> dict:
    ev = ev or _compiled(cfg, tc)[2]
    n_batches = n_batches or tc.eval_batches
    ces, auxs = [], []
    for b in data.eval_batches(n_batches, tc.batch_size, tc.seq_len):
        with jax.numpy_dtype_promotion("standard"):
            ce, aux = ev(params, jnp.asarray(b))
        ces.append(float(ce))
        auxs.append(float(aux))
    return {"val_loss": float(np.mean(ces)), "val_aux": float(np.mean(auxs))}


# --------------------------------------------------------------------------------------------------------
# checkpoints
def save_checkpoint(path, params, opt_state, step: int, history: dict, meta: dict | None = None) -> None:
    """Atomic: written to a temp file in the same folder, then ``os.replace``d over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_leaves((params, opt_state))
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    info = json.dumps({"step": step, "history": _jsonable(history), "meta": meta or {}})
    arrays["info"] = np.frombuffer(info.encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, params_like, opt_state_like):
    """-> (params, opt_state, step, history, meta); the pytree structure comes from the ``*_like`` templates."""
    with np.load(path) as z:
        info = json.loads(bytes(z["info"]).decode())
        treedef = jax.tree_util.tree_structure((params_like, opt_state_like))
        n = treedef.num_leaves
        leaves = [jnp.asarray(z[f"leaf_{i:05d}"]) for i in range(n)]
    params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
    hist = info["history"]
    return params, opt_state, info["step"], hist, info["meta"]


def _jsonable(h):
    if isinstance(h, dict):
        return {k: _jsonable(v) for k, v in h.items()}
    if isinstance(h, (list, tuple)):
        return [_jsonable(v) for v in h]
    if isinstance(h, np.ndarray):
        return h.tolist()
    if isinstance(h, (np.floating, np.integer)):
        return h.item()
    return h


# --------------------------------------------------------------------------------------------------------
# the loop
def train(cfg: GrokConfig, data: TokenData | None = None, *, steps: int | None = None,
          aux_coef: float | None = None, z_coef: float | None = None, tc: TrainConfig | None = None,
          params=None, checkpoint: str | os.PathLike | None = None, resume: bool = True,
          callback: Callable[[int, dict], Any] | None = None, progress: bool = True,
          stop_after: int | None = None, **overrides):
    """Train ``cfg`` on ``data`` (default: the shipped corpus). Returns ``(params, history)``.

    ``history``: ``step``, ``loss`` (total), ``ce``, ``aux``, ``z``, ``grad_norm``, ``tokens_per_s`` per logged
    step; ``expert_load``: per logged step a ``[layer][expert]`` list of routing-slot *shares* (the teaching
    notebook plots these: collapse without the aux loss, balance with it); ``eval``: list of
    ``{step, val_loss, val_aux}``; ``train_seconds``: wall time of the steps (not compilation).
    ``callback(step, metrics)`` is called at every logged step (return ``False`` to stop early).
    ``checkpoint``: file path; saved every ``tc.ckpt_every`` steps and at the end; resumed from if it exists
    and ``resume``. ``stop_after``: stop (after checkpointing) once this many steps are done — used to
    simulate an interruption. Other keyword arguments override :class:`TrainConfig` fields.
    """
    tc = tc or TrainConfig()
    changes = dict(overrides)
    if steps is not None:
        changes["steps"] = steps
    if aux_coef is not None:
        changes["aux_coef"] = aux_coef
    if z_coef is not None:
        changes["z_coef"] = z_coef
    tc = dataclasses.replace(tc, **changes)
    if tc.seq_len > cfg.sequence_len:
        cfg = cfg.replace(sequence_len=tc.seq_len)
    data = data if data is not None else load_data()
    if int(data.train.max()) >= cfg.vocab_size:
        raise ValueError(f"data has token id {int(data.train.max())} but cfg.vocab_size is {cfg.vocab_size}")

    opt, _, _ = _compiled(cfg, tc)
    if params is None:
        params = init_params(cfg, jax.random.key(tc.seed))
    with jax.numpy_dtype_promotion("standard"):
        opt_state = opt.init(params)
    start, history = 0, _new_history()
    if checkpoint is not None and resume and Path(checkpoint).exists():
        params, opt_state, start, history, _ = load_checkpoint(checkpoint, params, opt_state)

    opt, step_fn, ev = _compiled(cfg, tc)
    aux_c, z_c = jnp.float32(tc.aux_coef), jnp.float32(tc.z_coef)
    meta = {"cfg": dataclasses.asdict(cfg), "tc": dataclasses.asdict(tc)}
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    tokens_per_step = tc.batch_size * tc.seq_len

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), 0
    compiled = start  # the first step of this process includes compilation; exclude it from timings
    s = start
    try:
        while s < end:
            batch = jnp.asarray(data.batch(s, tc.batch_size, tc.seq_len, tc.seed))
            with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict promotion
                params, opt_state, m = step_fn(params, opt_state, batch, aux_c, z_c)
            s += 1
            n_last += 1
            if s == compiled + 1:
                jax.block_until_ready(params)
                t_last, n_last = time.perf_counter(), 0
            if s % tc.log_every == 0 or s == end:
                m = jax.device_get(m)
                now = time.perf_counter()
                tps = tokens_per_step * n_last / (now - t_last) if n_last else float("nan")
                if n_last:
                    history["train_seconds"] += now - t_last
                t_last, n_last = now, 0
                load = np.asarray(m["load"], np.float64)
                share = load / np.maximum(load.sum(-1, keepdims=True), 1)
                history["step"].append(s)
                for k in ("loss", "ce", "aux", "z", "grad_norm"):
                    history[k].append(float(m[k]))
                history["tokens_per_s"].append(float(tps))
                history["expert_load"].append(share.round(5).tolist())
                if bar is not None:
                    bar.set_postfix(loss=f"{float(m['ce']):.3f}", aux=f"{float(m['aux']):.3f}",
                                    tok_s=f"{tps:,.0f}")
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
            if checkpoint is not None and tc.ckpt_every and (s % tc.ckpt_every == 0) and s < end:
                save_checkpoint(checkpoint, params, opt_state, s, history, meta)
                t_last, n_last = time.perf_counter(), 0
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:
        save_checkpoint(checkpoint, params, opt_state, s, history, meta)
    history["steps_done"] = s
    return params, history


def _new_history():
    return {"step": [], "loss": [], "ce": [], "aux": [], "z": [], "grad_norm": [], "tokens_per_s": [],
            "expert_load": [], "eval": [], "train_seconds": 0.0}


# --------------------------------------------------------------------------------------------------------
# export
def save_model(out_dir, cfg: GrokConfig, params, *, tokenizer_path=TOKENIZER_PATH, extra: dict | None = None):
    """Write ``model.safetensors`` (flat names like ``blocks.w_q``), ``config.json`` and the tokenizer."""
    from safetensors.numpy import save_file
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = flatten_params(params)
    save_file(flat, str(out / "model.safetensors"), metadata={"format": "grokviz", "config": cfg.name})
    conf = {"grokviz_config": dataclasses.asdict(cfg), "num_params": count_params(params), **(extra or {})}
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    tp = Path(tokenizer_path)
    if tp.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tp, out / "tokenizer.model")
    return out


def flatten_params(params) -> dict:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[".".join(p.key for p in path)] = np.ascontiguousarray(np.asarray(leaf, np.float32))
    return flat


def unflatten_params(flat: dict) -> dict:
    out: dict = {}
    for name, arr in flat.items():
        node = out
        parts = name.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(arr)
    return out


# --------------------------------------------------------------------------------------------------------
# command line
def cli_main(argv: list[str]) -> int:
    """``grokviz train --preset tiny|quick [--out DIR] [--steps N]`` (argv excludes the ``train`` word)."""
    ap = argparse.ArgumentParser(prog="grokviz train", description="Train a Grok-architecture model on the "
                                 "shipped offline corpus.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", default=None, help="output folder (default: ./grokviz-<preset>)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--aux-coef", type=float, default=None)
    ap.add_argument("--z-coef", type=float, default=None)
    ap.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg, tc = PRESETS[args.preset]
    out = Path(args.out or f"grokviz-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = load_data()
    print(f"{cfg.describe()}  params={count_params(init_params(cfg, jax.random.key(0))):,}  "
          f"train tokens={len(data.train):,} validation tokens={len(data.validation):,}", flush=True)
    params, hist = train(cfg, data, steps=args.steps, aux_coef=args.aux_coef, z_coef=args.z_coef, tc=tc,
                         checkpoint=out / "checkpoint.npz", resume=not args.no_resume,
                         progress=not args.no_progress)
    tc_used = dataclasses.replace(tc, **{k: v for k, v in dict(steps=args.steps, aux_coef=args.aux_coef,
                                                               z_coef=args.z_coef).items() if v is not None})
    final = evaluate(params, cfg, tc_used, data, n_batches=tc_used.eval_batches)
    wall = time.time() - t0
    save_model(out, cfg, params, extra={"train": dataclasses.asdict(tc_used), "final_eval": final,
                                        "train_seconds": hist["train_seconds"], "wall_seconds": wall})
    (out / "history.json").write_text(json.dumps(_jsonable(hist)) + "\n")
    print(f"done: {hist['steps_done']} steps, {hist['train_seconds']:.0f}s training ({wall:.0f}s wall), "
          f"val_loss {final['val_loss']:.4f} nats/token -> {out}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(cli_main(sys.argv[1:]))

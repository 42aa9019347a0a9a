"""The objective and the compiled update: losses, optimiser, one jitted train step and one jitted eval step.

* loss = next-token cross-entropy + ``aux_coef`` x Switch-Transformer load-balancing loss
  + ``z_coef`` x router z-loss (both averaged over layers; either coefficient may be zero);
* global-norm gradient clipping, linear warm-up then cosine decay, decoupled weight decay on matrices only.

Definitions. For one layer with router probabilities ``p[t, e]`` over N real tokens and top-k selections:
``f_e`` = share of the N*k routing slots sent to expert e; ``P_e`` = mean_t p[t, e];
``aux = E * sum_e f_e * P_e`` (1 when perfectly balanced; the Switch Transformer loss generalised to k slots);
``z = mean_t logsumexp_e(router_logits[t])^2`` (the ST-MoE router z-loss). Padding (``config.is_real``) is
excluded from every mean.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..config import GrokConfig, is_real
from ..model.transformer import forward
from ..params import init_params
from .config import TrainConfig

CAPTURE = frozenset({"blocks.moe.router_logits", "blocks.moe.top_k_experts"})


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
    """(total loss, metrics) of a ``[B, T+1]`` batch: position t of ``batch[:, :-1]`` predicts ``batch[:, t+1]``."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = forward(params, inputs, cfg, capture=CAPTURE, expert_impl=expert_impl)
    logits = out.logits.astype(jnp.float32)
    real_in = is_real(inputs, cfg.pad_token)
    real = (is_real(targets, cfg.pad_token) & real_in).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    ce = jnp.sum(nll * real) / jnp.maximum(jnp.sum(real), 1.0)
    experts = out.cache["blocks.moe.top_k_experts"]
    aux, z = router_losses(out.cache["blocks.moe.router_logits"], experts, real_in, cfg.num_experts)
    total = ce + aux_coef * aux + z_coef * z
    return total, dict(ce=ce, aux=aux, z=z, load=expert_counts(experts, cfg.num_experts))


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
        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, cfg, aux_coef, z_coef,
                                                                     tc.expert_impl)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, dict(m, loss=loss, grad_norm=_global_norm(grads))

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
        warnings.warn(f"expert_impl={tc.expert_impl!r} cannot be differentiated ({str(e).splitlines()[0]}); "
                      f"training with expert_impl='dense' (same function, all experts computed)", stacklevel=3)
        return "dense"


@lru_cache(maxsize=8)
def _compiled_key(cfg: GrokConfig, tc: TrainConfig):
    tc = dataclasses.replace(tc, expert_impl=differentiable_impl(cfg, tc))
    opt = make_optimizer(tc)
    return opt, make_step(cfg, tc, opt), make_eval(cfg, tc)


def compiled(cfg: GrokConfig, tc: TrainConfig):
    """(optimizer, jitted step, jitted eval), shared by runs that differ only in the loss coefficients, the
    logging/checkpoint cadence or the seed (all passed as values), so a notebook comparing aux_coef=0 with
    aux_coef=0.01 compiles once."""
    key = dataclasses.replace(tc, aux_coef=0.0, z_coef=0.0, eval_every=0, ckpt_every=0, log_every=1, seed=0)
    return _compiled_key(cfg, key)


def evaluate(params, cfg, tc, data, n_batches: int | None = None, ev=None) -> dict:
    """Mean cross-entropy and aux loss over ``n_batches`` (default ``tc.eval_batches``) fixed validation batches."""
    ev = ev or compiled(cfg, tc)[2]
    n_batches = n_batches or tc.eval_batches
    ces, auxs = [], []
    for b in data.eval_batches(n_batches, tc.batch_size, tc.seq_len):
        with jax.numpy_dtype_promotion("standard"):
            ce, aux = ev(params, jnp.asarray(b))
        ces.append(float(ce))
        auxs.append(float(aux))
    return {"val_loss": float(np.mean(ces)), "val_aux": float(np.mean(auxs))}

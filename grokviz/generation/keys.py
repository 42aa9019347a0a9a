"""Random keys for sampling: the Grok-1 runner's key chain, and the default.

Both modes use the same chain per row: ``c[-1]`` is the row's start key, and for every generated token ``t``
``(c[t], k[t]) = split(c[t-1])``; token ``t`` is drawn with ``k[t]``. This is what the runner does (its prefill
splits the request key once and samples token 0 with the second half; each later step splits the carry
again).

* ``rng="grok1"`` (reproduction mode): the start key is the legacy raw key ``jax.random.PRNGKey(seed)``
  (``uint32[2] = [0, seed]``), and every key operation (the splits and the categorical draw) runs with
  ``jax_threefry_partitionable=False``, the setting of the jax version the runner shipped with. With it,
  jax 0.10 reproduces the runner's keys and tokens bit for bit. The setting is changed only around these
  operations (:func:`key_context`, a ``jax.threefry_partitionable`` context while tracing); the process's
  JAX configuration is never touched.
* ``rng="default"``: typed keys with the process's own threefry setting (jax 0.10: partitionable). Row ``r``
  starts from ``fold_in(key(seed[r]), r)`` (an int seed is every row's seed), so rows of one seed differ and a
  row's tokens do not depend on the batch size.

In reproduction mode an int seed gives every row ``PRNGKey(seed)``, as separate runner requests with that
seed would.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

RNG_MODES = ("default", "grok1")
SEED_MAX = 2**32 - 1


def key_context(rng: str):
    """The context the key operations of mode ``rng`` run in (see the module docstring)."""
    return jax.threefry_partitionable(False) if rng == "grok1" else contextlib.nullcontext()


def check_rng(rng) -> str:
    if rng not in RNG_MODES:
        raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}")
    return rng


def seeds_array(seed, batch: int) -> np.ndarray:
    """uint32 [batch]: an int seed (one for all rows) or a sequence of ``batch`` seeds, each in ``[0, 2**32)``."""
    per_row = not isinstance(seed, (int, np.integer))
    if isinstance(seed, bool):
        raise ValueError(f"seed must be an int in [0, {SEED_MAX}] or one per row, got {seed!r}")
    arr = np.asarray(seed)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"seed must be an int in [0, {SEED_MAX}] or one per row, got {seed!r}")
    if per_row and arr.shape != (batch,):
        raise ValueError(f"seed: give one int or one per row ({batch}), got shape {arr.shape}")
    if np.any(arr < 0) or np.any(arr > SEED_MAX):
        bad = arr[(arr < 0) | (arr > SEED_MAX)].ravel()[0]
        raise ValueError(f"seed {int(bad)} is outside [0, {SEED_MAX}]")
    return np.broadcast_to(arr, (batch,)).astype(np.uint32)


def start_keys(seeds, rng: str):
    """The chain's start keys c[-1] for every row (traced ``seeds`` uint32 [batch]). Call inside
    :func:`key_context`."""
    if rng == "grok1":
        return jax.vmap(jax.random.PRNGKey)(seeds)
    rows = jnp.arange(seeds.shape[0], dtype=jnp.uint32)
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(seeds, rows)


def next_keys(carry):
    """One link of the chain for every row: carry [batch] keys -> (new carry, sampling keys).
    Call inside :func:`key_context`."""
    pairs = jax.vmap(jax.random.split)(carry)  # [batch, 2, ...]
    return pairs[:, 0], pairs[:, 1]


def key_chain(seed: int, n: int, rng: str = "grok1"):
    """(carries, sampling keys) of ``n`` tokens for one row, on the host, for inspection and tests: raw
    uint32 [n, 2] in reproduction mode, key data [n, 2] in the default mode."""
    check_rng(rng)
    seeds = seeds_array(seed, 1)
    with key_context(rng):
        c = start_keys(jnp.asarray(seeds), rng)
        carries, samples = [], []
        for _ in range(n):
            c, k = next_keys(c)
            carries.append(c[0])
            samples.append(k[0])
    data = (lambda k: k) if rng == "grok1" else jax.random.key_data
    return np.stack([np.asarray(data(c)) for c in carries]), np.stack([np.asarray(data(k)) for k in samples])

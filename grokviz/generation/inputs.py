"""Host-side preparation of a generation request: prompts, settings and step patches checked and laid out as the
compiled loop takes them (every check a ``ValueError`` naming the argument and its bound)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..config import bucket_length
from ..hooks import REGISTRY, select, unknown_hook_error

#: captured by ``capture="routing"``: everything about the router's choices per generated step
ROUTING_CAPTURE = ("blocks.moe.router_logits", "blocks.moe.router_probs", "blocks.moe.top_k_experts",
                   "blocks.moe.top_k_weights", "blocks.moe.expert_load")


@dataclasses.dataclass(frozen=True)
class Prompts:
    rows: tuple            # per row: int32 [n_r] token ids
    buffer: np.ndarray     # int32 [batch, P]: the rows left-padded with the pad token to the prompt bucket P
    lengths: np.ndarray    # int32 [batch]
    single: bool           # given as one prompt (not a list)


def _ids_row(row, cfg, r) -> np.ndarray:
    arr = np.asarray(row)
    if arr.dtype == bool or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"prompt {r}: token ids must be integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    if arr.size == 0:
        raise ValueError(f"prompt {r} is empty; give at least one token")
    bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
    if bad.size:
        raise ValueError(f"prompt {r}: token id {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size})")
    return arr.astype(np.int32)


def prompt_rows(model, prompt) -> tuple[list[np.ndarray], bool]:
    """Text, a list of texts, ids [seq], ids [batch, seq] (trailing pad tokens of each row dropped, as
    :meth:`grokviz.Model.encode` right-pads) or a list of id lists of different lengths."""
    cfg = model.cfg
    if isinstance(prompt, str):
        prompt, single = [prompt], True
    else:
        single = False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer: give token ids, or attach a tokenizer")
        return [_ids_row(model.tokenizer.encode(p), cfg, r) for r, p in enumerate(prompt)], single
    if isinstance(prompt, (list, tuple)) and prompt and all(np.ndim(p) == 1 for p in prompt) and \
            not all(np.ndim(p) == 0 for p in prompt):
        return [_ids_row(p, cfg, r) for r, p in enumerate(prompt)], False
    arr = np.asarray(prompt)
    if arr.ndim == 1:
        return [_ids_row(arr, cfg, 0)], True
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"prompt must be text, a list of texts, ids [seq] or [batch, seq], or a list of id lists; "
                         f"got shape {arr.shape}")
    rows = []
    for r, row in enumerate(arr):
        row = _ids_row(row, cfg, r)
        if cfg.pad_token >= 0:
            real = np.flatnonzero(row != cfg.pad_token)
            row = row[:real[-1] + 1] if real.size else row[:0]
        if row.size == 0:
            raise ValueError(f"prompt {r} holds only pad tokens ({cfg.pad_token}); give at least one real token")
        rows.append(row)
    return rows, False


def sizes(cfg, longest: int, max_new_tokens, bucket: bool) -> tuple[int, int, int]:
    """(n, prompt bucket P, new-token bucket N) with ``longest + n <= sequence_len`` and ``P + N <= sequence_len``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    n = int(max_new_tokens)
    if n <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {n}")
    if longest + n > cfg.sequence_len:
        raise ValueError(f"the prompt ({longest} tokens) plus max_new_tokens ({n}) exceeds the model's context "
                         f"of {cfg.sequence_len} tokens (sequence_len); at most {cfg.sequence_len - longest} new "
                         f"tokens fit")
    if not bucket:
        return n, longest, n
    new_bucket = min(bucket_length(n, cfg.sequence_len), cfg.sequence_len - longest)
    return n, min(bucket_length(longest, cfg.sequence_len), cfg.sequence_len - new_bucket), new_bucket


def layout_prompts(cfg, rows, single, width: int) -> Prompts:
    """Left-pad every row to ``width`` with the pad token (the last prompt token of every row at slot width-1)."""
    lengths = np.array([len(r) for r in rows], np.int32)
    if cfg.pad_token < 0 and np.any(lengths != width):
        raise ValueError(f"this model has no pad token (pad_token={cfg.pad_token}), so prompts cannot be padded: "
                         f"give prompts of one length and bucket=False (lengths {sorted(set(lengths.tolist()))})")
    buffer = np.full((len(rows), width), max(cfg.pad_token, 0), np.int32)
    for i, r in enumerate(rows):
        buffer[i, width - len(r):] = r
    return Prompts(tuple(rows), buffer, lengths, single)


def per_row(name, value, batch, dtype, check) -> np.ndarray:
    """A scalar or one value per row, checked by ``check(v) -> error text or None``."""
    arr = np.asarray(value)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{name} must be a number or one per row, got {value!r}")
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != batch):
        raise ValueError(f"{name}: give one value or one per row ({batch}), got shape {arr.shape}")
    for v in np.atleast_1d(arr):
        err = check(v)
        if err:
            raise ValueError(f"{name} {err}")
    return np.broadcast_to(arr, (batch,)).astype(dtype)


def settings(cfg, batch, temperature, top_p, top_k) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def check_t(v):
        return None if np.isfinite(v) and v >= 0 else f"must be finite and >= 0 (0 = greedy), got {v}"

    def check_p(v):
        return None if np.isfinite(v) and 0 < v <= 1 else f"must be in (0, 1], got {v}"

    def check_k(v):
        if not float(v).is_integer():
            return f"must be an integer, got {v}"
        return None if 0 <= v <= cfg.vocab_size else f"must be in [0, {cfg.vocab_size}] (0 = off), got {int(v)}"

    return (per_row("temperature", temperature, batch, np.float32, check_t),
            per_row("top_p", top_p, batch, np.float32, check_p),
            per_row("top_k", top_k, batch, np.int32, check_k))


def stop_array(cfg, stop, batch: int) -> np.ndarray:
    """int32 [batch, S] stop ids, -1 = unused. ``stop``: None (the model's EOS, when it has one), () (never
    stop), an int, a list of ints (every row) or one list per row. S is a power of two >= 4 (few programs)."""
    if stop is None:
        stop = () if cfg.eos_token < 0 else (cfg.eos_token,)
    if isinstance(stop, (int, np.integer)) and not isinstance(stop, bool):
        stop = (stop,)
    stop = list(stop)
    rows = stop if stop and all(isinstance(s, (list, tuple, np.ndarray)) for s in stop) else [stop] * batch
    if len(rows) != batch:
        raise ValueError(f"stop: give one list of stop tokens for all rows or one per row ({batch}), got {len(rows)}")
    width = 4
    while width < max(len(r) for r in rows):
        width *= 2
    out = np.full((batch, width), -1, np.int32)
    for i, r in enumerate(rows):
        for j, s in enumerate(r):
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
                raise ValueError(f"stop token {s!r} (row {i}) must be an int token id")
            if not 0 <= s < cfg.vocab_size:
                raise ValueError(f"stop token {int(s)} (row {i}) is outside the vocabulary [0, {cfg.vocab_size})")
            out[i, j] = s
    return out


def capture_set(capture) -> frozenset:
    """Hook names or globs (:func:`grokviz.hooks.select`), with ``"routing"`` for :data:`ROUTING_CAPTURE`."""
    if capture is None:
        return frozenset()
    names = [capture] if isinstance(capture, str) else list(capture)
    extra = set()
    if "routing" in names:
        names.remove("routing")
        extra = set(ROUTING_CAPTURE)
    return select(names) | extra


def step_patchable(name: str) -> bool:
    """A hook a step patch can replace: inside the blocks, with axes (layer, batch, seq, ...) and no key axis."""
    axes = REGISTRY[name].axes
    return name.startswith("blocks.") and axes[:3] == ("layer", "batch", "seq") and "kv_seq" not in axes


def step_patches(cfg, patches, n_bucket: int, n: int, batch: int) -> dict:
    """Check ``{hook: (value [n, layer, batch, *rest], mask [n, layer, batch] bool)}`` and pad the step axis to
    the bucket (padded steps unmasked). ``rest``: the hook's axes after seq (e.g. ``k`` for top_k_experts)."""
    from ..interventions import _hook_shape

    out = {}
    for name, pair in (patches or {}).items():
        if name not in REGISTRY:
            raise unknown_hook_error(name)
        if not step_patchable(name):
            raise ValueError(f"step patch {name}: only blocks.* hooks with axes (layer, batch, seq, ...) and no "
                             f"key axis can be patched per generated step, not {' '.join(REGISTRY[name].axes)}")
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"step patch {name}: give a (value, mask) pair")
        value, mask = np.asarray(pair[0]), np.asarray(pair[1])
        full = _hook_shape(name, cfg, (batch, 1))
        want = (n,) + full[:2] + full[3:]
        if value.shape != want:
            raise ValueError(f"step patch {name}: value has shape {value.shape}, but it must be [step, layer, batch"
                             f"{''.join(', ' + a for a in REGISTRY[name].axes[3:])}] = {want}")
        if mask.shape != want[:3] or mask.dtype != bool:
            raise ValueError(f"step patch {name}: mask must be bool [step, layer, batch] = {want[:3]}, got "
                             f"{mask.dtype}{list(mask.shape)}")
        if name == "blocks.moe.top_k_experts":
            if not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"step patch {name}: expert ids must be integers, got dtype {value.dtype}")
            bad = value[(value < 0) | (value >= cfg.num_experts)]
            if bad.size:
                raise ValueError(f"step patch {name}: expert id {int(bad[0])} is outside the {cfg.num_experts} "
                                 f"experts [0, {cfg.num_experts})")
            value = value.astype(np.int32)
        else:
            value = value.astype(np.float32)
            if not np.all(np.isfinite(value)):
                raise ValueError(f"step patch {name}: the value contains non-finite entries")
        pad = [(0, n_bucket - n)] + [(0, 0)] * (value.ndim - 1)
        out[name] = (np.pad(value, pad), np.pad(mask, pad[:3]))
    return out


def force_routing_steps(cfg, experts, steps, *, max_new_tokens: int, batch: int = 1, layers=None) -> dict:
    """A step patch that forces routing: ``experts`` [layer, batch, k] (or [k]: every layer and row) expert ids
    used at each generated step in ``steps`` (ints in ``[0, max_new_tokens)``), at ``layers`` (default all).
    Returns ``{"blocks.moe.top_k_experts": (value, mask)}`` for ``generate(step_patches=...)``."""
    L, k = cfg.num_layers, cfg.top_k
    e = np.asarray(experts)
    e = np.broadcast_to(e, (L, batch, k)) if e.shape in ((k,), (batch, k)) else e
    if e.shape != (L, batch, k):
        raise ValueError(f"force_routing_steps: experts must be [layer, batch, k] = {(L, batch, k)} or [k], "
                         f"got {e.shape}")
    steps = np.atleast_1d(np.asarray(steps))
    if steps.size == 0 or not np.issubdtype(steps.dtype, np.integer) or np.any((steps < 0) | (steps >= max_new_tokens)):
        raise ValueError(f"force_routing_steps: steps must be ints in [0, {max_new_tokens}), got {steps.tolist()}")
    layer_mask = np.zeros(L, bool)
    if layers is not None:
        lay = np.atleast_1d(np.asarray(layers))
        if not np.issubdtype(lay.dtype, np.integer) or np.any((lay < -L) | (lay >= L)):
            raise ValueError(f"force_routing_steps: layers must be ints in [-{L}, {L}), got {lay.tolist()}")
    layer_mask[slice(None) if layers is None else lay] = True
    mask = np.zeros((max_new_tokens, L, batch), bool)
    mask[steps] = layer_mask[:, None]
    value = np.broadcast_to(e, (max_new_tokens, L, batch, k)).copy()
    return {"blocks.moe.top_k_experts": (value, mask)}

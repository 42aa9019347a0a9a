"""Routing traces from serving engines: read the expert ids vLLM and SGLang return for a request, replay them as
forced routing, and report where the engine's routing and grokviz's differ. See docs/analysis.md#traces.

Formats (what the engines document; both give ids per *token*, then MoE layer, then top-k slot):

* **vLLM** (``--enable-return-routed-experts``; docs "Routed Experts Replay", docs.vllm.ai, v0.21): the response
  carries ``prompt_routed_experts`` ``[prompt_len, num_moe_layers, top_k]`` (response level) and, per choice,
  ``routed_experts`` ``[gen_len, num_moe_layers, top_k]``, int16 ids in ``[0, num_experts)``; the OpenAI server
  sends them as nested JSON lists. Later servers send ``routed_experts`` as a base64-encoded ``.npy`` of shape
  ``[num_tokens - 1, layers, top_k]`` over the whole sequence (vllm-project/router PR 184): the last token is
  never fed through the model, so it has no routing.
* **SGLang** (``--enable-return-routed-experts`` + ``return_routed_experts=True``; sgl-project/sglang PRs 12162
  and 17434, docs.sglang.io "Returning Routed Experts"): ``meta_info["routed_experts"]`` (``/generate``) or
  ``sgl_ext["routed_experts"]`` (OpenAI endpoints): base64 of a flat int32 array with logical shape
  ``[num_tokens, num_layers, top_k]`` covering positions ``[routed_experts_start_len, seqlen - 1)``. SGL-JAX
  writes ``-1`` at layers without routed experts (its docs/features/return_routed_experts.md).

No on-disk format is specified by either engine, so the readers accept what the APIs return: the response dict
(or its JSON file), a base64 string, a numpy array, nested lists, or an ``.npy`` / ``.json`` path. The layer axis
may list the MoE layers only (vLLM) or every layer with ``-1`` rows at dense layers (SGL-JAX). A trace covers
``n`` or ``n - 1`` tokens of an ``n``-token sequence from ``start``.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..interventions import Interventions

__all__ = ["ReplayReport", "check_trace", "read_sglang", "read_vllm", "replay", "trace_from_generation",
           "trace_from_run", "write_sglang", "write_vllm"]

EXPERTS = "blocks.moe.top_k_experts"


# ------------------------------------------------------------------------------------------------ reading
def _load_path(source):
    p = Path(source)
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if p.suffix == ".json":
        return json.loads(p.read_text())
    raise ValueError(f"{p}: a trace file must be .npy or .json")


def _is_path(source) -> bool:
    return isinstance(source, Path) or (isinstance(source, str) and source.endswith((".npy", ".json"))
                                        and len(source) < 4096)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"routed experts string is not valid base64 ({e})") from None


def _as_ids(value, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError as e:      # ragged nested lists
        raise ValueError(f"{what}: the nested lists are ragged ({e}); expected [tokens, layers, top_k]") from None
    if arr.dtype == object:
        raise ValueError(f"{what}: the nested lists are ragged; expected [tokens, layers, top_k]")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{what}: expert ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def read_vllm(source, *, choice: int = 0) -> np.ndarray:
    """int64 [tokens, layers, top_k] from what vLLM returns: a response dict (``prompt_routed_experts``, then
    ``choices[choice]["routed_experts"]`` appended), its ``.json`` file, a ``.npy`` file, a base64 ``.npy``
    string, an array or nested lists."""
    if _is_path(source):
        source = _load_path(source)
    if isinstance(source, dict):
        parts = []
        if source.get("prompt_routed_experts") is not None:
            parts.append(read_vllm(source["prompt_routed_experts"]))
        choices = source.get("choices") or []
        if choices:
            if not -len(choices) <= choice < len(choices):
                raise ValueError(f"choice {choice} is outside the response's {len(choices)} choices")
            gen = choices[choice].get("routed_experts")
            if gen is not None:
                parts.append(read_vllm(gen))
        elif source.get("routed_experts") is not None:
            parts.append(read_vllm(source["routed_experts"]))
        if not parts:
            raise ValueError("no 'prompt_routed_experts' or 'routed_experts' in this vLLM response")
        parts = [p for p in parts if p.size] or parts
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if isinstance(source, (bytes, str)):
        raw = _b64(source) if isinstance(source, str) else source
        if not raw.startswith(b"\x93NUMPY"):
            raise ValueError("a vLLM routed_experts string must be a base64-encoded .npy array")
        return _as_ids(np.load(io.BytesIO(raw), allow_pickle=False), "vLLM routed_experts")
    return _as_ids(source, "vLLM routed_experts")


def read_sglang(source, *, num_layers: int | None = None, top_k: int | None = None) -> np.ndarray:
    """int64 [tokens, layers, top_k] from what SGLang returns: a response dict (``meta_info`` or ``sgl_ext``
    holding ``routed_experts``, or a list of them), its ``.json`` file, the base64 string of flat int32 ids
    (``num_layers`` and ``top_k`` give its shape), a ``.npy`` file, an array (flat or 3-D) or nested lists."""
    if _is_path(source):
        source = _load_path(source)
    if isinstance(source, dict):
        for key in ("meta_info", "sgl_ext"):
            if isinstance(source.get(key), dict) and "routed_experts" in source[key]:
                return read_sglang(source[key]["routed_experts"], num_layers=num_layers, top_k=top_k)
        if "routed_experts" in source:
            return read_sglang(source["routed_experts"], num_layers=num_layers, top_k=top_k)
        raise ValueError("no 'routed_experts' in this SGLang response (looked in meta_info and sgl_ext)")
    if isinstance(source, str):
        raw = _b64(source)
        if len(raw) % 4:
            raise ValueError(f"SGLang routed_experts holds {len(raw)} bytes, not a whole number of int32 ids")
        source = np.frombuffer(raw, dtype="<i4")
    arr = _as_ids(source, "SGLang routed_experts")
    if arr.ndim == 1:
        if num_layers is None or top_k is None:
            raise ValueError("flat SGLang routed_experts need num_layers and top_k to be reshaped to "
                             "[tokens, num_layers, top_k]")
        if arr.size % (num_layers * top_k):
            raise ValueError(f"{arr.size} flat expert ids do not fill [tokens, {num_layers}, {top_k}]")
        arr = arr.reshape(-1, num_layers, top_k)
    return arr


# ------------------------------------------------------------------------------------------------ writing
def write_vllm(prompt_experts, generated_experts=None, path=None) -> dict:
    """A vLLM-style response dict (nested int lists: ``prompt_routed_experts`` and one choice's
    ``routed_experts``) from [tokens, moe layers, top_k] arrays; written to ``path`` as ``.json`` (the dict) or
    ``.npy`` (int16, prompt and generated rows concatenated) when given."""
    prompt = np.asarray(prompt_experts).astype(np.int16)
    gen = np.zeros((0,) + prompt.shape[1:], np.int16) if generated_experts is None else \
        np.asarray(generated_experts).astype(np.int16)
    out = {"prompt_routed_experts": prompt.tolist(), "choices": [{"index": 0, "routed_experts": gen.tolist()}]}
    if path is not None:
        path = Path(path)
        if path.suffix == ".npy":
            np.save(path, np.concatenate([prompt, gen], axis=0))
        elif path.suffix == ".json":
            path.write_text(json.dumps(out))
        else:
            raise ValueError(f"{path}: write a .json or .npy trace")
    return out


def write_sglang(experts, path=None) -> dict:
    """An SGLang-style ``/generate`` response dict: ``meta_info.routed_experts`` = base64 of the flat int32 ids
    of [tokens, layers, top_k]; written to ``path`` (``.json``) when given."""
    arr = np.ascontiguousarray(np.asarray(experts), dtype="<i4")
    out = {"meta_info": {"routed_experts": base64.b64encode(arr.tobytes()).decode("ascii")}}
    if path is not None:
        if Path(path).suffix != ".json":
            raise ValueError(f"{path}: write a .json trace")
        Path(path).write_text(json.dumps(out))
    return out


def trace_from_run(run, row: int = 0) -> np.ndarray:
    """int32 [real tokens, moe layers, top_k]: the routing of row ``row`` of a Run (``blocks.moe.top_k_experts``
    captured), in an engine's layout."""
    ex = np.asarray(run.cache[EXPERTS])[:, row]           # [moe layer, seq, k]
    return np.ascontiguousarray(np.moveaxis(ex[:, run.positions(row)], 0, 1)).astype(np.int32)


def trace_from_generation(result, row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt [prompt tokens, moe layers, k], generated [tokens made, moe layers, k]) from a GenerationResult
    that captured ``blocks.moe.top_k_experts``: vLLM's ``prompt_routed_experts`` / ``routed_experts``."""
    P, n_p, n_g = result.prompt_width, int(result.prompt_lengths[row]), int(result.lengths[row])
    pre = np.asarray(result.prefill[EXPERTS])[:, row, P - n_p:]               # [layer, prompt, k]
    gen = np.asarray(result.step(EXPERTS))[:n_g, :, row]                      # [step, layer, k]
    return np.moveaxis(pre, 0, 1).astype(np.int32), gen.astype(np.int32)


# ------------------------------------------------------------------------------------------------ checking
def check_trace(experts, cfg, n_tokens: int, start: int = 0) -> np.ndarray:
    """The trace as int32 [T, moe layers, top_k], checked against the model and an ``n_tokens``-token sequence:
    3-D, ``top_k`` slots, a layer axis of the MoE layers (or of every layer, dense rows ignored), ids in
    ``[0, num_experts)`` and distinct per token and layer, and ``T`` = ``n_tokens - start`` or one fewer.
    ValueError naming the problem otherwise."""
    arr = _as_ids(experts, "trace")
    moe = list(cfg.moe_layer_ids)
    if arr.ndim != 3:
        raise ValueError(f"a routing trace must be [tokens, layers, top_k], got shape {arr.shape}")
    T, L, k = arr.shape
    if L == cfg.num_layers and L != len(moe):
        arr = arr[:, moe]                      # every layer given: keep the MoE layers' rows
    elif L != len(moe):
        raise ValueError(f"the trace has {L} layers; the model has {len(moe)} MoE layers"
                         f"{f' of {cfg.num_layers}' if len(moe) != cfg.num_layers else ''}")
    if k != cfg.top_k:
        raise ValueError(f"the trace has {k} experts per token; the model routes top_k={cfg.top_k}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start < n_tokens:
        raise ValueError(f"start must be an int in [0, {n_tokens}), got {start!r}")
    if T not in (n_tokens - start, n_tokens - start - 1) or T == 0:
        raise ValueError(f"the trace has {T} token rows, but the sequence has {n_tokens} tokens from position "
                         f"{start}: expected {n_tokens - start} (every token) or {n_tokens - start - 1} "
                         f"(the last token never routed)")
    E = cfg.num_experts
    bad = np.argwhere((arr < 0) | (arr >= E))
    if bad.size:
        t, l, s = bad[0]
        raise ValueError(f"expert id {int(arr[t, l, s])} at token {int(t)}, layer {moe[l]} is outside the {E} "
                         f"experts [0, {E})")
    srt = np.sort(arr, axis=-1)
    dup = np.argwhere((srt[..., 1:] == srt[..., :-1]).any(-1))
    if dup.size:
        t, l = dup[0]
        raise ValueError(f"token {int(t)} at layer {moe[l]} names expert(s) {arr[t, l].tolist()}: each token's "
                         f"top-k experts must be distinct")
    return arr.astype(np.int32)


# ------------------------------------------------------------------------------------------------ replay
@dataclasses.dataclass
class ReplayReport:
    """``layers``: per MoE layer, how the engine's routing agrees with grokviz's own (agreement = mean share of a
    token's k experts grokviz also selects; exact = share of tokens with the same set; disagreements = tokens
    whose sets differ); ``tokens``: per replayed position, the token, how many layers' sets differ and the
    Δlogprob (replayed minus own) of the actual next token; the two runs."""

    layers: pd.DataFrame
    tokens: pd.DataFrame
    own: object
    replayed: object

    @property
    def agreement(self) -> float:
        return float(np.average(self.layers.agreement, weights=self.layers.n_tokens))

    @property
    def disagreements(self) -> int:
        return int(self.layers.disagreements.sum())

    def summary(self) -> dict:
        d = self.tokens.delta_logprob.dropna()
        return dict(agreement=self.agreement, disagreements=self.disagreements,
                    mean_delta_logprob=float(d.mean()) if len(d) else 0.0,
                    max_abs_delta_logprob=float(d.abs().max()) if len(d) else 0.0)


def _logprobs(logits, tokens):
    x = np.asarray(logits[0, :-1], np.float64)
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return lp[np.arange(len(x)), tokens[1:]]


def replay(model, tokens, trace, *, start: int = 0, engine: str = "vllm",
           num_layers: int | None = None) -> ReplayReport:
    """Run ``tokens`` (one sequence: ids or text) twice with one compiled program: with grokviz's own routing,
    and with the trace's experts forced at every MoE layer of positions ``start .. start + T - 1``
    (:meth:`~grokviz.interventions.Interventions.force_routing`; gates by the family's rule). ``trace``: an array
    or anything :func:`read_vllm` (``engine="vllm"``) / :func:`read_sglang` (``engine="sglang"``) reads."""
    cfg = model.cfg
    toks = model.to_tokens(tokens)
    if toks.shape[0] != 1:
        raise ValueError(f"replay takes one sequence, got a batch of {toks.shape[0]}")
    if engine not in ("vllm", "sglang"):
        raise ValueError(f"engine must be 'vllm' or 'sglang', got {engine!r}")
    if not isinstance(trace, np.ndarray):
        trace = read_vllm(trace) if engine == "vllm" else \
            read_sglang(trace, num_layers=num_layers or len(cfg.moe_layer_ids), top_k=cfg.top_k)
    n = toks.shape[1]
    ex = check_trace(trace, cfg, n, start)
    T = len(ex)
    moe = list(cfg.moe_layer_ids)
    value = np.zeros((cfg.num_layers, 1, n, cfg.top_k), np.int32)
    value[moe, 0, start:start + T] = np.moveaxis(ex, 0, 1)
    on = np.zeros((cfg.num_layers, 1, n), bool)
    on[moe, 0, start:start + T] = True
    none = Interventions.none(cfg)
    own = model.run(toks, capture=[EXPERTS], interventions=none.patch(EXPERTS, value, mask=np.zeros_like(on)))
    forced = model.run(toks, capture=[EXPERTS], interventions=none.patch(EXPERTS, value, mask=on))
    mine = np.moveaxis(np.asarray(own.cache[EXPERTS])[:, 0, start:start + T], 0, 1)   # [T, moe layer, k]
    shared = (ex[..., :, None] == mine[..., None, :]).any(-1).sum(-1)                 # [T, layer]
    same = shared == cfg.top_k
    layers = pd.DataFrame({"layer": moe, "agreement": (shared / cfg.top_k).mean(0), "exact": same.mean(0),
                           "disagreements": (~same).sum(0), "n_tokens": T})
    delta = _logprobs(forced.logits, toks[0]) - _logprobs(own.logits, toks[0])        # [n - 1]
    pos = np.arange(start, start + T)
    d = np.full(T, np.nan)
    has_next = pos < n - 1
    d[has_next] = delta[pos[has_next]]
    tok = model.tokenizer
    pieces = [tok.id_to_piece(int(i)) for i in toks[0, pos]] if tok is not None else [str(int(i)) for i in toks[0, pos]]
    per_token = pd.DataFrame({"position": pos, "token": pieces, "layers_differing": (~same).sum(1),
                              "delta_logprob": d})
    return ReplayReport(layers, per_token, own, forced)

"""Granite-MoE configurations for the family benchmark, and a writer of sharded Hugging Face safetensors folders
with random weights (numpy only: no torch, no jax; used to make the ~2 GB checkpoint whose loading is measured).

``GRANITE_1B`` is ibm-granite/granite-3.0-1b-a400m's ``config.json`` (the Hub file of the base and instruct
models, as recalled here: this session had no network, so check it against the Hub before quoting it as
exact). Field by field: ``hidden_size`` 1024, ``num_hidden_layers`` 24, ``num_attention_heads`` 16,
``num_key_value_heads`` 8 (head_dim = 1024 / 16 = 64), ``intermediate_size`` 512 (each expert's hidden size),
``num_local_experts`` 32, ``num_experts_per_tok`` 8, ``vocab_size`` 49155, ``max_position_embeddings`` 4096,
``rms_norm_eps`` 1e-6, ``rope_theta`` 10000, ``attention_multiplier`` 0.015625 (= 1/64, not 1/sqrt(64)),
``embedding_multiplier`` 12.0, ``residual_multiplier`` 0.22, ``logits_scaling`` 6.0, ``tie_word_embeddings``
true, ``attention_bias`` false, ``hidden_act`` silu, pad/bos/eos token 0.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

GRANITE_1B = dict(
    model_type="granitemoe", architectures=["GraniteMoeForCausalLM"], hidden_size=1024, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=8, intermediate_size=512, num_local_experts=32,
    num_experts_per_tok=8, vocab_size=49155, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
    attention_multiplier=0.015625, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0,
    tie_word_embeddings=True, attention_bias=False, hidden_act="silu", pad_token_id=0, bos_token_id=0,
    eos_token_id=0)

#: --quick: the same family and multipliers at toy sizes (seconds, not minutes)
GRANITE_QUICK = dict(GRANITE_1B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, vocab_size=512,
                     attention_multiplier=1 / 16)

#: the load benchmark's checkpoint: granite-1b's widths with 18 layers, 1.01 G parameters = 2.03 GB in bf16
GRANITE_LOAD = dict(GRANITE_1B, num_hidden_layers=18)

_ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def _st_dtype(dt: np.dtype) -> str:
    if dt in _ST:
        return _ST[dt]
    if dt.name == "bfloat16":
        return "BF16"
    raise ValueError(f"no safetensors name for {dt}")


def granite_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a GraniteMoeForCausalLM checkpoint, in the order save_pretrained writes
    them (per layer: norms, attention, the MoE block). Linear weights are [out, in]."""
    D, F, E, V = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["vocab_size"]
    hd = D // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
                (p + "self_attn.q_proj.weight", (q, D)), (p + "self_attn.k_proj.weight", (kv, D)),
                (p + "self_attn.v_proj.weight", (kv, D)), (p + "self_attn.o_proj.weight", (D, q)),
                (p + "block_sparse_moe.router.layer.weight", (E, D)),
                (p + "block_sparse_moe.input_linear.weight", (E, 2 * F, D)),
                (p + "block_sparse_moe.output_linear.weight", (E, D, F))]
    out.append(("model.norm.weight", (D,)))
    if not c.get("tie_word_embeddings", True):
        out.append(("lm_head.weight", (V, D)))
    return out


def _random(rng, name: str, shape, dtype) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(dtype)


def write_hf_folder(folder, config: dict, *, dtype="bfloat16", shards: int = 5, seed: int = 0) -> dict:
    """A save_pretrained-style folder: config.json, ``model-0000N-of-0000M.safetensors`` (tensors split in order
    into ``shards`` files of about equal size) and ``model.safetensors.index.json``. Random N(0, 0.02) weights,
    norms 1. Written one tensor at a time (memory: the largest tensor). Returns {"bytes", "tensors", "files"}."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dt = np.dtype(dtype)
    tensors = granite_tensors(config)
    sizes = [int(np.prod(s)) * dt.itemsize for _, s in tensors]
    total = sum(sizes)
    groups, cur, acc = [], [], 0
    for (name, shape), n in zip(tensors, sizes):
        cur.append((name, shape, n))
        acc += n
        if acc >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    groups.append(cur) if cur else None
    rng = np.random.default_rng(seed)
    weight_map, files = {}, []
    for g, group in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        entries, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, n in group:
            entries[name] = {"dtype": _st_dtype(dt), "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        hdr = json.dumps(entries, separators=(",", ":")).encode()
        hdr += b" " * (-len(hdr) % 8)
        tmp = folder / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hdr)) + hdr)
            for name, shape, _ in group:
                f.write(memoryview(_random(rng, name, shape, dt).reshape(-1).view(np.uint8)))
        os.replace(tmp, folder / fname)
        files.append(fname)
    cfg = dict(config, torch_dtype=dt.name)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"bytes": total, "tensors": len(tensors), "files": files}

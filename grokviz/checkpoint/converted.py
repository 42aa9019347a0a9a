"""grokviz's own checkpoint format: safetensors shards + an index JSON (SHA-256 per file) + a config JSON.

Layout of a converted directory::

    config.json                       GrokConfig fields (grokviz names), enough to load with no config argument
    model.safetensors.index.json      {"format": "grokviz-safetensors", "version": 1,
                                       "weight_map": {tensor: shard}, "files": {file: {"sha256", "bytes"}}}
    model-00001-of-0000N.safetensors  tensors ``embed``, ``final_norm``, ``layers.{i}.{leaf}`` (plain) or
                                      ``layers.{i}.{leaf}.weight`` (int8) + ``layers.{i}.{leaf}.scales``
    tokenizer.model                   (if the source had one next to it: SentencePiece, the Grok-1 tokenizer)
    tokenizer.json                    (instead, for a Hugging Face tokenizer; with its tokenizer_config.json when
                                       there is one next to it, which names the pad and end-of-sequence tokens)

Per-layer tensors are named by their model layer number: the MoE leaves (router, experts, shared expert) exist
only at MoE layers and the dense MLP leaves only at dense layers, so ``layers.{i}`` holds the leaves that layer
``i`` has (see :func:`grokviz.params.shapes_dict`).

Writes are atomic (:mod:`.fsutil`): everything goes to a hidden temporary sibling that is put in place only when
complete; an existing destination is kept until the new one replaces it, and what a killed run leaves behind is
cleaned up (or, for an interrupted overwrite, restored) by the next write of the same destination. The folder
gets the permissions the umask allows.

Reading trusts nothing in the files: the index's file names must stay inside the folder, every safetensors
header is validated against its byte ranges, and every tensor's shape is checked against the config when it is
assembled. Reading memory-maps each shard (``np.memmap``, read-only); nothing is copied until a tensor is placed
on a device. :func:`verify` additionally checks every file's SHA-256 and that the index covers every file of
the format present in the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..config import GrokConfig
from ..params import Int8Weight, validate_params
from . import fsutil
from .config_io import FORMAT, config_to_json, resolve_release_config
from .converted_read import (  # noqa: F401  (re-exported: the format's one public module)
    CONFIG,
    DEFAULT_SHARD_BYTES,
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    INDEX,
    TOKENIZER,
    TOP_LEAVES,
    VERSION,
    _check_shard_contents,
    _count,
    find_sibling_tokenizer,
    format_files,
    inspect,
    is_converted,
    iter_converted,
    leaf_layers,
    parse_tensor_name,
    read_config,
    read_index,
    tensor_items,
    verify,
)
from .safetensors_io import ConvertedCheckpointError, _ShardWriter, sha256_file

__all__ = ["ConvertedCheckpointError", "convert", "inspect", "is_converted", "iter_converted", "read_config",
           "read_index", "save", "verify", "write_checkpoint"]


# --- writing -----------------------------------------------------------------------------------------------

def write_checkpoint(dst, cfg: GrokConfig, tensors: Iterable[tuple[str, int | None, object]], *,
                     tokenizer: str | os.PathLike | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     overwrite: bool = False, header_reserve: int = 64 << 10) -> Path:
    """Write ``(name, layer, value)`` tensors (consumed one at a time) as a converted checkpoint at ``dst``.

    Atomic (see the module docstring): a crash at any point leaves ``dst`` as it was (absent, or the previous
    checkpoint), and the next call for the same ``dst`` removes the crashed run's hidden temporary folder.
    """
    dst = Path(dst).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fsutil.recover(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    tmp = fsutil.new_temp_dir(dst)
    cur = None
    try:
        shards: list[tuple[str, _ShardWriter]] = []
        weight_map: dict[str, int] = {}
        for name, layer, value in tensors:
            for key, arr in tensor_items(name, layer, value):
                if key in weight_map:
                    raise ValueError(f"{dst}: tensor {key} was given twice")
                if cur is None or (cur.offset and cur.offset + arr.nbytes > max_shard_bytes) or not cur.fits(key, arr):
                    if cur is not None:
                        cur.close()
                    fname = f"shard-{len(shards):05d}.safetensors"
                    cur = _ShardWriter(tmp / fname, header_reserve)
                    shards.append((fname, cur))
                cur.add(key, arr)
                weight_map[key] = len(shards) - 1
        if cur is not None:
            cur.close()
        n = len(shards)
        names = {}
        for i, (fname, _) in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / fname, tmp / final)
            names[i] = final
        _write_json(tmp / CONFIG, config_to_json(cfg))
        files = [names[i] for i in range(n)] + [CONFIG]
        if tokenizer is not None:
            files += _copy_tokenizer(Path(tokenizer), tmp)
        index = {"format": FORMAT, "version": VERSION, "config": CONFIG,
                 "weight_map": {k: names[i] for k, i in weight_map.items()},
                 "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}}
        _write_json(tmp / INDEX, index)
        fsutil.publish_dir(tmp, dst, overwrite=overwrite)
    except BaseException:
        if cur is not None:
            cur.f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _copy_tokenizer(src: Path, tmp: Path) -> list[str]:
    """Copy a tokenizer file into the folder being written; returns the names written. ``*.json`` is a Hugging
    Face ``tokenizer.json`` (kept under that name, with the ``tokenizer_config.json`` next to it if any);
    anything else a SentencePiece model (written as ``tokenizer.model``)."""
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer file {src} does not exist (pass tokenizer=None to write none)")
    if src.suffix != ".json":
        shutil.copyfile(src, tmp / TOKENIZER)
        return [TOKENIZER]
    shutil.copyfile(src, tmp / HF_TOKENIZER)
    names = [HF_TOKENIZER]
    if (src.parent / HF_TOKENIZER_CONFIG).is_file():
        shutil.copyfile(src.parent / HF_TOKENIZER_CONFIG, tmp / HF_TOKENIZER_CONFIG)
        names.append(HF_TOKENIZER_CONFIG)
    return names


def _write_json(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def params_tensors(params, cfg: GrokConfig) -> Iterator[tuple[str, int | None, object]]:
    """(name, layer, value) of an in-memory grokviz param pytree (checked against ``cfg`` first), one layer
    slice at a time, ``layer`` being the model layer number (a MoE or dense-MLP leaf's slice ``j`` is layer
    ``leaf_layers(name, cfg)[j]``); :class:`Int8Weight` leaves (top-level or stacked) stay int8 + scales."""
    validate_params(params, cfg)
    for name in TOP_LEAVES:
        if name not in params:  # unembed: untied models only (validate_params checked presence against cfg)
            continue
        leaf = params[name]
        yield name, None, (Int8Weight(np.asarray(leaf.weight), np.asarray(leaf.scales))
                           if isinstance(leaf, Int8Weight) else np.asarray(leaf))
    slots = {name: {layer: j for j, layer in enumerate(leaf_layers(name, cfg))} for name in params["blocks"]}
    for layer in range(cfg.num_layers):
        for name, leaf in params["blocks"].items():
            j = slots[name].get(layer)
            if j is None:
                continue
            if isinstance(leaf, Int8Weight):
                yield name, layer, Int8Weight(np.asarray(leaf.weight[j]), np.asarray(leaf.scales[j]))
            else:
                yield name, layer, np.asarray(leaf[j])


def save(model_or_params, dst, cfg: GrokConfig | None = None, **kw) -> Path:
    """Write a :class:`grokviz.Model` (or a param pytree + its ``cfg``) in the converted format; ``kw`` as for
    :func:`write_checkpoint` (the model's tokenizer file travels with it unless ``tokenizer=`` says otherwise)."""
    if cfg is None:
        if isinstance(model_or_params, dict) or not hasattr(model_or_params, "params"):
            raise TypeError(f"save({type(model_or_params).__name__}, ...): a param pytree needs its config: "
                            f"save(params, dst, cfg=...)")
        cfg, params = model_or_params.cfg, model_or_params.params
        tok = model_or_params.tokenizer  # a SentencePiece Tokenizer (.path) or an HFTokenizer (.json_path)
        kw.setdefault("tokenizer", getattr(tok, "json_path", None) or getattr(tok, "path", None))
    else:
        params = getattr(model_or_params, "params", model_or_params)
    return write_checkpoint(dst, cfg, params_tensors(params, cfg), **kw)


def convert(src, dst, *, config: GrokConfig | None = None, progress: bool = True, **kw) -> Path:
    """Release checkpoint ``src`` (``…/ckpt-0`` or its parent) -> converted checkpoint ``dst``, one tensor at a time.

    Tensors are copied bit-exactly (int8 weights and bf16 scales stay as they are).
    """
    from .release import iter_release, release_dir

    cfg = resolve_release_config(src, config)
    tok = find_sibling_tokenizer(release_dir(src))
    stream = ((e.name, e.layer, v) for e, v in iter_release(src, cfg, progress=progress))
    kw.setdefault("tokenizer", tok)
    return write_checkpoint(dst, cfg, stream, **kw)

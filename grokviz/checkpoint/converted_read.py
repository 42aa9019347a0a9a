"""Reading grokviz's converted checkpoint format (:mod:`.converted` describes it): the index and config, the
shards' tensors (memory-mapped), verification against the recorded hashes, and ``inspect``; plus the names both
sides share (files, tensor naming, per-layer leaves). :mod:`.converted` re-exports everything here, and writes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..config import GrokConfig
from ..params import DENSE_LEAVES, MOE_LEAVES, Int8Weight, shapes_dict
from . import fsutil
from .config_io import FORMAT, config_from_json
from .safetensors_io import ConvertedCheckpointError, memmap_tensor, read_safetensors_header, sha256_file

VERSION = 1
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
TOP_LEAVES = ("embed", "final_norm", "unembed")
DEFAULT_SHARD_BYTES = 4 << 30


# --- tensor naming -----------------------------------------------------------------------------------------

def tensor_items(name: str, layer: int | None, value) -> list[tuple[str, np.ndarray]]:
    base = name if layer is None else f"layers.{layer}.{name}"
    if isinstance(value, Int8Weight):
        return [(base + ".weight", np.asarray(value.weight)), (base + ".scales", np.asarray(value.scales))]
    return [(base, np.asarray(value))]


def parse_tensor_name(key: str) -> tuple[str, int | None, str | None]:
    """``layers.3.w_q.weight`` -> ("w_q", 3, "weight"); ``embed`` -> ("embed", None, None)."""
    parts = key.split(".")
    if parts[0] == "layers" and len(parts) in (3, 4) and parts[1].isdigit():
        return parts[2], int(parts[1]), (parts[3] if len(parts) == 4 else None)
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) == 2 and parts[1] in ("weight", "scales"):
        return parts[0], None, parts[1]
    raise ConvertedCheckpointError(f"unrecognised tensor name {key!r}")


def leaf_layers(name: str, cfg: GrokConfig) -> tuple[int, ...]:
    """The model layers that per-layer leaf ``name`` has a slice for, in the order of its leading axis."""
    if name in MOE_LEAVES:
        return cfg.moe_layer_ids
    if name in DENSE_LEAVES:
        return cfg.dense_layer_ids
    return tuple(range(cfg.num_layers))



def find_sibling_tokenizer(d: Path) -> Path | None:
    for cand in (d / TOKENIZER, d.parent / TOKENIZER):
        if cand.is_file():
            return cand
    return None


# --- reading -----------------------------------------------------------------------------------------------

def is_converted(path) -> bool:
    return (Path(path) / INDEX).is_file()


def read_index(path) -> dict:
    """The validated index: format and version ours, ``weight_map`` {tensor: shard} and ``files``
    {file: {"sha256", "bytes"}} well-formed, every file name a relative path inside ``path``."""
    path = Path(path)
    where = path / INDEX
    try:
        index = json.loads(where.read_text())
    except FileNotFoundError:
        raise ConvertedCheckpointError(f"{path}: no {INDEX}; not a converted grokviz checkpoint") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertedCheckpointError(f"{where}: corrupt index JSON ({e})") from None
    if not isinstance(index, dict):
        raise ConvertedCheckpointError(f"{where}: the index is a JSON {type(index).__name__}, expected an object")
    if index.get("format") != FORMAT:
        raise ConvertedCheckpointError(f"{where}: format {index.get('format')!r}, expected {FORMAT!r}")
    if index.get("version") != VERSION:
        raise ConvertedCheckpointError(f"{where}: version {index.get('version')!r}; this grokviz reads version "
                                       f"{VERSION}")
    wm, files = index.get("weight_map"), index.get("files")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ConvertedCheckpointError(f"{where}: weight_map must map tensor names to shard file names")
    if not isinstance(files, dict):
        raise ConvertedCheckpointError(f"{where}: files must map file names to {{sha256, bytes}}")
    for fname, rec in files.items():
        ok = (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64
              and isinstance(rec.get("bytes"), int) and not isinstance(rec["bytes"], bool) and rec["bytes"] >= 0)
        if not ok:
            raise ConvertedCheckpointError(f"{where}: files[{fname!r}] must be {{\"sha256\": 64 hex digits, "
                                           f"\"bytes\": a non-negative int}}, got {rec!r}")
    for fname in {*wm.values(), *files}:
        fsutil.confined(path, fname, f"file named in {INDEX}", ConvertedCheckpointError)
    for key in wm:
        parse_tensor_name(key)
    return index


def read_config(path) -> GrokConfig:
    path = Path(path)
    try:
        return config_from_json(json.loads((path / CONFIG).read_text()))
    except FileNotFoundError:
        raise ConvertedCheckpointError(f"{path}: {CONFIG} is missing") from None
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ConvertedCheckpointError(f"{path / CONFIG}: invalid config ({e})") from None


def format_files(path) -> set[str]:
    """The files in ``path`` that belong to the format (shards, config, tokenizer), as index names."""
    path = Path(path)
    out = {p.relative_to(path).as_posix() for p in path.rglob("*.safetensors") if p.is_file() or p.is_symlink()}
    return out | {n for n in (CONFIG, TOKENIZER, HF_TOKENIZER, HF_TOKENIZER_CONFIG) if os.path.lexists(path / n)}


def verify(path) -> dict:
    """Check that the index covers the checkpoint and every covered file matches its SHA-256 and size.

    Coverage: the index lists at least the config and every shard its weight_map names, and every shard,
    config and tokenizer present in the folder is listed. Each shard's header must also be valid and hold
    exactly the tensors the weight_map assigns to it. Raises :class:`ConvertedCheckpointError` naming every bad
    file; returns {file: sha256} of the files matched.
    """
    path = Path(path)
    index = read_index(path)
    files, wm = index["files"], index["weight_map"]
    shards = sorted(set(wm.values()))
    bad = [f"{s}: shard named in the weight_map but not in files (nothing to check it against)"
           for s in shards if s not in files]
    if CONFIG not in files:
        bad.append(f"{CONFIG}: not in files (nothing to check it against)")
    bad += [f"{f}: present in the folder but not in the index's files" for f in sorted(format_files(path) - set(files))]
    out = {}
    for fname, rec in files.items():
        f = path / fname
        if not f.is_file():
            bad.append(f"{fname}: missing")
            continue
        if f.stat().st_size != rec["bytes"]:
            bad.append(f"{fname}: {f.stat().st_size:,} bytes, index records {rec['bytes']:,}")
            continue
        digest = sha256_file(f)
        if digest != rec["sha256"].lower():
            bad.append(f"{fname}: sha256 {digest} differs from the recorded {rec['sha256']}")
            continue
        out[fname] = digest
    for s in shards:
        if s in out:
            try:
                _check_shard_contents(path, s, read_safetensors_header(path / s)[0], wm)
            except ConvertedCheckpointError as e:
                bad.append(str(e))
    if bad:
        raise ConvertedCheckpointError(f"{path}: {len(bad)} problem(s) found by verification:\n  " + "\n  ".join(bad))
    return out


def _check_shard_contents(path: Path, shard: str, entries: dict, wm: dict):
    listed = {k for k, s in wm.items() if s == shard}
    if set(entries) != listed:
        missing, extra = sorted(listed - set(entries)), sorted(set(entries) - listed)
        raise ConvertedCheckpointError(f"{path / shard}: tensors listed in the index but not in the shard "
                                       f"{missing[:5]}, in the shard but not listed {extra[:5]}")


def iter_converted(path, *, progress: bool = True, with_source: bool = False
                   ) -> Iterator[tuple[str, int | None, object]]:
    """Yield (name, layer, value) with read-only memory-mapped numpy values, grouping int8 weight/scales pairs.

    ``with_source=True`` yields (name, layer, value, "shard: tensor") so that errors can name both. Every shard
    header is validated and matched against the index before the first tensor is yielded.
    """
    path = Path(path)
    index = read_index(path)
    wm = index["weight_map"]
    headers = {}
    for s in sorted(set(wm.values())):
        if not (path / s).is_file():
            raise ConvertedCheckpointError(f"{path / s}: shard listed in the index is missing")
        headers[s] = read_safetensors_header(path / s)
        _check_shard_contents(path, s, headers[s][0], wm)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(wm), unit="tensor", desc=f"loading {path.name}")
    pending: dict = {}
    try:
        for key, s in wm.items():
            entries, start = headers[s]
            arr = memmap_tensor(path / s, entries[key], start)
            name, layer, part = parse_tensor_name(key)
            if bar is not None:
                bar.update(1)
            src = (f"{path / s}: tensor {key}",) if with_source else ()
            if part is None:
                yield (name, layer, arr, *src)
                continue
            got = pending.setdefault((name, layer), {})
            got[part] = arr
            if len(got) == 2:
                del pending[(name, layer)]
                src = (f"{path / s}: tensor {key.rsplit('.', 1)[0]}.{{weight,scales}}",) if with_source else ()
                yield (name, layer, Int8Weight(weight=got["weight"], scales=got["scales"]), *src)
    finally:
        if bar is not None:
            bar.close()
    if pending:
        (name, layer), got = next(iter(pending.items()))
        raise ConvertedCheckpointError(f"{path}: int8 tensor {name} (layer {layer}) has {sorted(got)} but not both "
                                       f"weight and scales")


# --- inspection --------------------------------------------------------------------------------------------

def inspect(path) -> dict:
    """Format, config, parameter count, dtypes and bytes of a converted or release checkpoint."""
    from .release import config_from_release_shapes, infer_release_shapes, is_release, release_dir, tensor_files

    path = Path(path)
    if is_converted(path):
        index = read_index(path)
        cfg = read_config(path)
        dtypes: Counter = Counter()
        nbytes = 0
        for s in sorted(set(index["weight_map"].values())):
            entries, _ = read_safetensors_header(path / s)
            for e in entries.values():
                dtypes[e["dtype"]] += int(np.prod(e["shape"], dtype=np.int64))
                nbytes += e["data_offsets"][1] - e["data_offsets"][0]
        nparams = _count(cfg)
        return {"format": FORMAT, "path": str(path), "config": cfg, "num_params": nparams,
                "dtypes": dict(dtypes), "tensor_bytes": nbytes,
                "file_bytes": sum(r["bytes"] for r in index["files"].values()),
                "files": len(index["files"]), "tensors": len(index["weight_map"])}
    if is_release(path):
        d = release_dir(path)
        files = tensor_files(path)
        info = infer_release_shapes(path)
        cfg = config_from_release_shapes(info)
        return {"format": "grok-1 release (pickles)", "path": str(d), "config": cfg, "inferred": info,
                "num_params": _count(cfg) if cfg else None,
                "file_bytes": sum(f.stat().st_size for f in files.values()), "files": len(files)}
    raise ValueError(f"{path}: neither a converted grokviz checkpoint ({INDEX}) nor a release checkpoint "
                     f"(ckpt-0/tensor*_000)")


def _count(cfg: GrokConfig) -> int:
    """Number of scalar parameters ``cfg`` has (every leaf of :func:`grokviz.params.shapes_dict`)."""
    shapes = shapes_dict(cfg)
    leaves = [*(shapes[n] for n in TOP_LEAVES if n in shapes), *shapes["blocks"].values()]
    return int(sum(np.prod(s, dtype=np.int64) for s in leaves))

"""grokviz's own checkpoint format: safetensors shards + an index JSON (SHA-256 per file) + a config JSON.

Layout of a converted directory::

    config.json                       GrokConfig fields (grokviz names), enough to load with no config argument
    model.safetensors.index.json      {"format": "grokviz-safetensors", "version": 1,
                                       "weight_map": {tensor: shard}, "files": {file: {"sha256", "bytes"}}}
    model-00001-of-0000N.safetensors  tensors ``embed``, ``final_norm``, ``layers.{i}.{leaf}`` (plain) or
                                      ``layers.{i}.{leaf}.weight`` (int8) + ``layers.{i}.{leaf}.scales``
    tokenizer.model                   (if the source had one next to it)

Writes are atomic: everything goes to a temporary sibling directory that is renamed onto the destination only
when complete (``os.replace``), so an interrupted conversion leaves no partial output under the destination name.
Reading memory-maps each shard (``np.memmap``); nothing is copied until a tensor is placed on a device.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..config import GrokConfig
from ..params import Int8Weight
from .config_io import FORMAT, config_from_json, config_to_json, resolve_release_config
from .safetensors_io import SafetensorsError, _ShardWriter, memmap_tensor, read_safetensors_header, sha256_file

VERSION = 1
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
DEFAULT_SHARD_BYTES = 4 << 30


#: a converted checkpoint that is incomplete, inconsistent or fails its hashes (the message names the file)
ConvertedCheckpointError = SafetensorsError


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


# --- writing -----------------------------------------------------------------------------------------------

def write_checkpoint(dst, cfg: GrokConfig, tensors: Iterable[tuple[str, int | None, object]], *,
                     tokenizer: str | os.PathLike | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     overwrite: bool = False, header_reserve: int = 64 << 10) -> Path:
    """Write ``(name, layer, value)`` tensors (consumed one at a time) as a converted checkpoint at ``dst``.

    Atomic: written into a temporary sibling directory, hashed, then renamed onto ``dst``.
    """
    dst = Path(dst).resolve()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        shards: list[tuple[str, _ShardWriter]] = []
        weight_map: dict[str, int] = {}
        cur = None
        for name, layer, value in tensors:
            for key, arr in tensor_items(name, layer, value):
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
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
            files.append(TOKENIZER)
        index = {"format": FORMAT, "version": VERSION, "config": CONFIG,
                 "weight_map": {k: names[i] for k, i in weight_map.items()},
                 "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}}
        _write_json(tmp / INDEX, index)
        _fsync_dir(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_json(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def params_tensors(params, cfg: GrokConfig) -> Iterator[tuple[str, int | None, object]]:
    """(name, layer, value) of an in-memory grokviz param pytree, one layer slice at a time."""
    yield "embed", None, np.asarray(params["embed"])
    yield "final_norm", None, np.asarray(params["final_norm"])
    for layer in range(cfg.num_layers):
        for name, leaf in params["blocks"].items():
            if isinstance(leaf, Int8Weight):
                yield name, layer, Int8Weight(np.asarray(leaf.weight[layer]), np.asarray(leaf.scales[layer]))
            else:
                yield name, layer, np.asarray(leaf[layer])


def save(model_or_params, dst, cfg: GrokConfig | None = None, **kw) -> Path:
    """Write a :class:`grokviz.Model` (or params + cfg) in the converted format."""
    if cfg is None:
        cfg, params = model_or_params.cfg, model_or_params.params
        tok = getattr(model_or_params.tokenizer, "path", None)
        kw.setdefault("tokenizer", tok)
    else:
        params = model_or_params
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


def find_sibling_tokenizer(d: Path) -> Path | None:
    for cand in (d / TOKENIZER, d.parent / TOKENIZER):
        if cand.is_file():
            return cand
    return None


# --- reading -----------------------------------------------------------------------------------------------

def is_converted(path) -> bool:
    return (Path(path) / INDEX).is_file()


def read_index(path) -> dict:
    path = Path(path)
    try:
        index = json.loads((path / INDEX).read_text())
    except FileNotFoundError:
        raise ConvertedCheckpointError(f"{path}: no {INDEX}; not a converted grokviz checkpoint") from None
    except ValueError as e:
        raise ConvertedCheckpointError(f"{path / INDEX}: corrupt index JSON ({e})") from None
    if index.get("format") != FORMAT:
        raise ConvertedCheckpointError(f"{path / INDEX}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def read_config(path) -> GrokConfig:
    path = Path(path)
    try:
        return config_from_json(json.loads((path / CONFIG).read_text()))
    except FileNotFoundError:
        raise ConvertedCheckpointError(f"{path}: {CONFIG} is missing") from None
    except (ValueError, TypeError) as e:
        raise ConvertedCheckpointError(f"{path / CONFIG}: invalid config ({e})") from None


def verify(path) -> dict:
    """Check every file listed in the index against its SHA-256 and size. Raises naming every bad file.

    Returns {file: sha256} on success.
    """
    path = Path(path)
    index = read_index(path)
    bad, out = [], {}
    for fname, rec in index["files"].items():
        f = path / fname
        if not f.is_file():
            bad.append(f"{fname}: missing")
            continue
        if f.stat().st_size != rec["bytes"]:
            bad.append(f"{fname}: {f.stat().st_size:,} bytes, index records {rec['bytes']:,}")
            continue
        digest = sha256_file(f)
        if digest != rec["sha256"]:
            bad.append(f"{fname}: sha256 {digest} differs from the recorded {rec['sha256']}")
        out[fname] = digest
    if bad:
        raise ConvertedCheckpointError(f"{path}: {len(bad)} file(s) failed verification:\n  " + "\n  ".join(bad))
    return out


def iter_converted(path, *, progress: bool = True) -> Iterator[tuple[str, int | None, object]]:
    """Yield (name, layer, value) with memory-mapped numpy values, grouping int8 weight/scales pairs."""
    path = Path(path)
    index = read_index(path)
    shards = sorted(set(index["weight_map"].values()))
    headers = {}
    for s in shards:
        if not (path / s).is_file():
            raise ConvertedCheckpointError(f"{path / s}: shard listed in the index is missing")
        headers[s] = read_safetensors_header(path / s)
    for key, s in index["weight_map"].items():
        if key not in headers[s][0]:
            raise ConvertedCheckpointError(f"{path / s}: tensor {key} listed in the index is not in the shard")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(index["weight_map"]), unit="tensor", desc=f"loading {path.name}")
    pending: dict = {}
    try:
        for key, s in index["weight_map"].items():
            entries, start = headers[s]
            arr = memmap_tensor(path / s, entries[key], start)
            name, layer, part = parse_tensor_name(key)
            if bar is not None:
                bar.update(1)
            if part is None:
                yield name, layer, arr
                continue
            got = pending.setdefault((name, layer), {})
            got[part] = arr
            if len(got) == 2:
                del pending[(name, layer)]
                yield name, layer, Int8Weight(weight=got["weight"], scales=got["scales"])
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
    from .release import (config_from_release_shapes, infer_release_shapes, is_release, release_dir,
                          tensor_files)

    path = Path(path)
    if is_converted(path):
        index = read_index(path)
        cfg = read_config(path)
        dtypes: Counter = Counter()
        nbytes = 0
        for s in sorted(set(index["weight_map"].values())):
            entries, _ = read_safetensors_header(path / s)
            for key, e in entries.items():
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
    from ..params import shapes_dict

    leaves = [shapes_dict(cfg)["embed"], shapes_dict(cfg)["final_norm"], *shapes_dict(cfg)["blocks"].values()]
    return int(sum(np.prod(s, dtype=np.int64) for s in leaves))

"""Hugging Face checkpoint folders of six MoE families, read lazily into grokviz's stacked param pytree.

A folder as ``save_pretrained`` writes it: ``config.json`` (read by :mod:`.hf_config`) and either one
``model.safetensors`` or shards ``model-0000N-of-0000M.safetensors`` named by ``model.safetensors.index.json``
(``{"weight_map": {tensor: file}}``); ``tokenizer.json`` optionally. Every shard header is validated
(:func:`.safetensors_io.read_safetensors_header`) and the set of tensors and their stored shapes and dtypes are
checked against what the config implies (:func:`.hf_names.expected_tensors`) before any data is read: a missing,
misshapen or unexpected tensor is an error naming the file, the tensor and what was expected. Tensors are then
memory-mapped one at a time, transformed by the family's name table (transposes, the fused-expert splits, per-expert
stacking) and handed to the :class:`.assemble.ParamAssembler`, which stacks them (on the host, or straight onto a
mesh). Values keep the stored dtype unless a ``dtype`` is asked for (a folder with mixed float dtypes is read in
the widest of them).

gpt-oss's MXFP4 expert weights (``<name>_blocks`` uint8 ``[E, rows, groups, 16]``, two FP4 e2m1 codes per byte, the
low nibble first; ``<name>_scales`` uint8 ``[E, rows, groups]``, an e8m0 power of two ``2**(s - 127)`` per block of
32 values) are dequantised to ``[E, groups * 32, rows]`` exactly (every value is a short mantissa times a power of
two) and then split like the unquantised tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from ..config import GrokConfig
from . import fsutil
from .hf_config import is_mxfp4, read_hf_config
from .hf_names import OPS, Target, expected_tensors, known_patterns
from .release import CheckpointError
from .safetensors_io import memmap_tensor, read_safetensors_header

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"

#: FP4 e2m1 code -> value (codes 8-15 are the negatives of 0-7)
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


class HFCheckpointError(CheckpointError):
    """A Hugging Face checkpoint folder that is incomplete or does not fit its config (the message names the file)."""


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def is_hf(path) -> bool:
    """A Hugging Face folder: a ``config.json`` with a ``model_type`` (not grokviz's own format) and weights as
    ``model.safetensors`` or an index without grokviz's format marker."""
    path = Path(path)
    cfg = _json(path / CONFIG) if (path / CONFIG).is_file() else None
    if not isinstance(cfg, dict) or "model_type" not in cfg or "grokviz_config" in cfg:
        return False
    if (path / SINGLE).is_file():
        return True
    index = _json(path / INDEX) if (path / INDEX).is_file() else None
    return isinstance(index, dict) and "weight_map" in index and "format" not in index


def tensor_files(folder) -> dict[str, str]:
    """{tensor: file} of the folder (one ``model.safetensors``, else the index's validated weight_map)."""
    folder = Path(folder)
    if (folder / SINGLE).is_file():
        return {k: SINGLE for k in read_safetensors_header(folder / SINGLE)[0]}
    where = folder / INDEX
    if not where.is_file():
        raise HFCheckpointError(f"{folder}: neither {SINGLE} nor {INDEX}")
    index = _json(where)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise HFCheckpointError(f"{where}: expected {{\"weight_map\": {{tensor: file}}}}")
    for fname in set(wm.values()):
        fsutil.confined(folder, fname, f"file named in {INDEX}", HFCheckpointError)
    return wm


def read_headers(folder, files: dict[str, str]) -> dict[str, tuple[dict, int]]:
    """{file: (entries, data start)} of every shard, each header validated and matched against the index."""
    folder = Path(folder)
    headers = {}
    for fname in sorted(set(files.values())):
        if not (folder / fname).is_file():
            raise HFCheckpointError(f"{folder / fname}: shard named in {INDEX} is missing")
        headers[fname] = read_safetensors_header(folder / fname)
        listed = {k for k, f in files.items() if f == fname}
        held = set(headers[fname][0])
        if listed != held:
            raise HFCheckpointError(f"{folder / fname}: the index lists tensors this shard does not hold "
                                    f"{sorted(listed - held)[:5]}, and it holds tensors the index does not list "
                                    f"{sorted(held - listed)[:5]}")
    return headers


def _mxfp4_shapes(t: Target) -> tuple[tuple, tuple]:
    e, n_in, n_out = t.shape
    return (e, n_out, n_in // 32, 16), (e, n_out, n_in // 32)


def check_tensors(folder, cfg: GrokConfig, files: dict[str, str], headers: dict, mxfp4: bool) -> dict[str, Target]:
    """Every expected tensor present with its shape and a float (MXFP4: uint8) dtype; nothing unexpected."""
    folder = Path(folder)
    want = expected_tensors(cfg, mxfp4=mxfp4)
    missing = [n for n in want if n not in files]
    if missing:
        raise HFCheckpointError(f"{folder}: {len(missing)} tensor(s) that config.json ({cfg.family}, {cfg.num_layers} "
                                f"layers, {cfg.num_experts} experts) implies are missing from the checkpoint, e.g. "
                                f"{missing[:4]}")
    extra = sorted(set(files) - set(want))
    if extra:
        name = extra[0]
        known = any(p.fullmatch(name) for p in known_patterns(cfg.family))
        why = ("a tensor of this family that this config does not use (check tie_word_embeddings, the bias, "
               "qk-norm, expert-count and layer-count fields)" if known else
               f"not a tensor name of the {cfg.family} family")
        raise HFCheckpointError(f"{folder / files[name]}: unexpected tensor {name} ({why}); {len(extra)} unexpected "
                                f"in all: {extra[:4]}")
    for name, t in want.items():
        e = headers[files[name]][0][name]
        where = f"{folder / files[name]}: tensor {name}"
        if t.mxfp4:
            blocks, scales = _mxfp4_shapes(t)
            shape = blocks if name.endswith("_blocks") else scales
            if e["np_dtype"] != np.uint8:
                raise HFCheckpointError(f"{where}: dtype {e['dtype']}, MXFP4 {name.rsplit('_', 1)[1]} are U8")
        else:
            shape = t.shape
            if not (np.issubdtype(e["np_dtype"], np.floating) or e["np_dtype"] == np.dtype(ml_dtypes.bfloat16)):
                raise HFCheckpointError(f"{where}: dtype {e['dtype']}, expected a float type (F32, BF16, F16)")
        if tuple(e["shape"]) != tuple(shape):
            raise HFCheckpointError(f"{where}: shape {list(e['shape'])}, but config.json implies {list(shape)}")
    return want


def stored_dtype(headers: dict, want: dict[str, Target], files: dict[str, str]) -> np.dtype:
    """The float dtype the (non-MXFP4) tensors are stored in; float32 (float64 if any) when they differ."""
    dts = {np.dtype(headers[files[n]][0][n]["np_dtype"]) for n, t in want.items() if not t.mxfp4}
    if len(dts) == 1:
        return dts.pop()
    return np.dtype(np.float64) if np.dtype(np.float64) in dts else np.dtype(np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, where: str = "") -> np.ndarray:
    """MXFP4 ``blocks`` uint8 ``[..., rows, groups, 16]`` and ``scales`` uint8 ``[..., rows, groups]`` -> float32
    ``[..., groups * 32, rows]`` (see the module docstring); a scale that overflows fp32 is an error."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise HFCheckpointError(f"{where}: MXFP4 blocks {blocks.shape} and scales {scales.shape} do not fit "
                                f"([..., rows, groups, 16] and [..., rows, groups])")
    vals = np.empty((*blocks.shape[:-1], 32), np.float32)
    vals[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    vals[..., 1::2] = FP4_VALUES[blocks >> 4]
    with np.errstate(over="ignore"):
        out = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
    if not np.isfinite(out).all():
        raise HFCheckpointError(f"{where}: MXFP4 scales up to {int(scales.max())} overflow float32 "
                                f"(2**(s - 127) * 6 must stay below 3.4e38)")
    out = out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)
    return np.swapaxes(out, -1, -2)


def iter_hf(folder, cfg: GrokConfig, files: dict[str, str], headers: dict, want: dict[str, Target], dtype, *,
            progress: bool = False) -> Iterator[tuple[str, int | None, np.ndarray, str]]:
    """(leaf, layer, value, "file: tensor") for every leaf slice, reading one tensor at a time in file order.
    Per-expert tensors are stacked into one ``[E, ...]`` buffer per (leaf, layer) before they are yielded."""
    folder = Path(folder)
    dtype = np.dtype(dtype)
    staged: dict[tuple, list] = {}   # (leaf, layer) -> [buffer, experts filled]
    pairs: dict[str, dict] = {}      # MXFP4 base name -> {"blocks"/"scales": array}
    order = sorted(want, key=lambda n: (files[n], headers[files[n]][0][n]["data_offsets"]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), unit="tensor", desc=f"loading {folder.name}")
    try:
        for name in order:
            t = want[name]
            entries, start = headers[files[name]]
            where = f"{folder / files[name]}: tensor {name}"
            arr = memmap_tensor(folder / files[name], entries[name], start)
            if bar is not None:
                bar.update(1)
            if t.mxfp4:
                got = pairs.setdefault(t.name, {})
                got[name.rsplit("_", 1)[1]] = arr
                if len(got) < 2:
                    continue
                del pairs[t.name]
                arr = dequantize_mxfp4(got["blocks"], got["scales"], f"{folder}: tensor {t.name}_{{blocks,scales}}")
            for leaf, op, shape in t.leaves:
                value = OPS[op][0](arr)
                if t.expert is None:
                    yield leaf, t.layer, value.astype(dtype, copy=False), where
                    continue
                slot = staged.setdefault((leaf, t.layer), [np.empty((cfg.num_experts, *shape), dtype), 0])
                slot[0][t.expert] = value
                slot[1] += 1
                if slot[1] == cfg.num_experts:
                    del staged[(leaf, t.layer)]
                    yield leaf, t.layer, slot[0], where.replace(f"experts.{t.expert}.", "experts.*.")
    finally:
        if bar is not None:
            bar.close()


class HFFolder:
    """A checked Hugging Face folder: ``cfg``, ``raw`` config dict, ``files`` {tensor: file}, ``headers``, ``want``
    {tensor: Target}, ``mxfp4``. Construction reads only JSON and headers."""

    def __init__(self, folder, config: GrokConfig | None = None):
        self.path = Path(folder)
        cfg, self.raw = read_hf_config(self.path)
        self.cfg = cfg if config is None else config
        self.mxfp4 = is_mxfp4(self.raw)
        self.files = tensor_files(self.path)
        self.headers = read_headers(self.path, self.files)
        self.want = check_tensors(self.path, self.cfg, self.files, self.headers, self.mxfp4)

    @property
    def dtype(self) -> np.dtype:
        return stored_dtype(self.headers, self.want, self.files)

    @property
    def tokenizer(self) -> Path | None:
        return self.path / TOKENIZER if (self.path / TOKENIZER).is_file() else None

    def tensors(self, dtype=None, *, progress: bool = False):
        """(leaf, layer, value, where) in ``dtype`` (default: the stored dtype)."""
        return iter_hf(self.path, self.cfg, self.files, self.headers, self.want,
                       self.dtype if dtype is None else dtype, progress=progress)

    def summary(self) -> dict:
        """What ``grokviz inspect`` prints: family, config, tensor count, dtypes, bytes."""
        dtypes: dict[str, int] = {}
        nbytes = 0
        for entries, _ in self.headers.values():
            for e in entries.values():
                dtypes[e["dtype"]] = dtypes.get(e["dtype"], 0) + int(np.prod(e["shape"], dtype=np.int64))
                nbytes += e["data_offsets"][1] - e["data_offsets"][0]
        return {"format": f"Hugging Face ({self.cfg.family}{', MXFP4 experts' if self.mxfp4 else ''})",
                "path": str(self.path), "family": self.cfg.family, "config": self.cfg, "dtypes": dtypes,
                "tensors": len(self.files), "tensor_bytes": nbytes, "files": len(self.headers),
                "file_bytes": sum((self.path / f).stat().st_size for f in self.headers)}


def load_hf(folder, *, config: GrokConfig | None = None, dtype=None, mesh=None, progress: bool = False):
    """(cfg, params, tokenizer path or None) of a Hugging Face folder (see the module docstring)."""
    import jax.numpy as jnp

    from .assemble import ParamAssembler

    hf = HFFolder(folder, config)
    dt = hf.dtype if dtype is None else np.dtype(jnp.dtype(dtype))
    asm = ParamAssembler(hf.cfg, dtype=dt, mesh=mesh)
    for leaf, layer, value, where in hf.tensors(dt, progress=progress):
        asm.put(leaf, layer, value, where=where)
    return hf.cfg, asm.finish(), hf.tokenizer

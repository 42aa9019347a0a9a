"""``gv.load``: one entry point for the release checkpoint, converted checkpoints and the bundled tiny model.

::

    model = gv.load("/data/grok-1/checkpoints")                         # release format, Grok-1 inferred
    model = gv.load("tests/data/grok1_tiny_ckpt", config=cfg)           # release format, any config
    model = gv.load("/data/grok-1-converted", verify=True)              # converted: config from config.json
    model = gv.load(path, mesh=gv.sharding.make_mesh((1, 8)))           # placed sharded as it is read
    model = gv.load("tiny")                                             # the small bundled model

``quantized=True`` (default) keeps the release's int8 weights as :class:`~grokviz.params.Int8Weight` (dequantised
inside each matmul); ``quantized=False`` dequantises them exactly (fp32) and casts to ``dtype``. Plain tensors
(embeddings, norms, router) are cast to ``dtype``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from .api import Model
from .config import GrokConfig


def resolve_release_config(path, config: GrokConfig | None) -> GrokConfig:
    """``config`` (a GrokConfig, a dict of reference or grokviz fields, or a JSON file path), else Grok-1 if the
    release's shapes are Grok-1's, else a clear error."""
    from .release import CheckpointError, config_from_release_shapes, infer_release_shapes

    if config is not None:
        return as_config(config)
    info = infer_release_shapes(path)
    cfg = config_from_release_shapes(info)
    if cfg is None:
        raise CheckpointError(f"{path}: not Grok-1 sized ({info}); the release format does not record the head "
                              f"split, so pass config=GrokConfig(...) (or --config JSON)")
    return cfg


def as_config(config) -> GrokConfig:
    import json

    from .convert import config_from_json

    if isinstance(config, GrokConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        text = Path(config).read_text() if Path(config).is_file() else str(config)
        config = json.loads(text)
    if isinstance(config, dict):
        import dataclasses

        ours = {f.name for f in dataclasses.fields(GrokConfig)}
        try:
            if "grokviz_config" in config:
                return config_from_json(config)
            if set(config) <= ours:
                return GrokConfig(**config)
            return GrokConfig.from_reference(ignore_generator_fields=True, **config)
        except TypeError as e:
            raise ValueError(f"incomplete model config {config}: {e}") from None
    raise TypeError(f"config must be a GrokConfig, dict or JSON path, got {type(config).__name__}")


def _tokenizer(tokenizer, found):
    from .tokenizer import Tokenizer

    if tokenizer is False:
        return None
    if tokenizer is None:
        return Tokenizer(found) if found is not None else None
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)


def load(path_or_name, *, config=None, mesh=None, verify: bool = False, dtype=jnp.float32, quantized: bool = True,
         progress: bool = True, tokenizer=None) -> Model:
    """Load a model (see the module docstring). ``tokenizer``: a path or Tokenizer; default: a ``tokenizer.model``
    found next to the checkpoint; ``False`` for none. ``verify``: check file hashes first (converted format:
    against the index; release format: against a ``MANIFEST.sha256`` in the directory, if present)."""
    if isinstance(path_or_name, str) and path_or_name == "tiny":
        from .tiny import load_tiny

        return load_tiny()
    from . import convert as cv
    from . import release as rl
    from .sharding import ParamAssembler

    path = Path(path_or_name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (give a release directory, a converted directory or "
                                f"'tiny')")
    if cv.is_converted(path):
        if verify:
            cv.verify(path)
        cfg = cv.read_config(path) if config is None else as_config(config)
        stream = cv.iter_converted(path, progress=progress)
        found = path / cv.TOKENIZER if (path / cv.TOKENIZER).is_file() else None
    elif rl.is_release(path):
        cfg = resolve_release_config(path, config)
        if verify:
            verify_release(path)
        stream = ((e.name, e.layer, v) for e, v in rl.iter_release(path, cfg, progress=progress))
        found = cv.find_sibling_tokenizer(rl.release_dir(path))
    else:
        raise ValueError(f"{path}: neither a converted grokviz checkpoint ({cv.INDEX}) nor a release checkpoint "
                         f"(ckpt-0/tensor00000_000 ...)")
    asm = ParamAssembler(cfg, dtype=dtype, quantized=quantized, mesh=mesh)
    for name, layer, value in stream:
        asm.put(name, layer, value, where=str(path))
    return Model(cfg, asm.finish(), _tokenizer(tokenizer, found))


MANIFEST_NAME = "MANIFEST.sha256"


def verify_release(path, manifest_file=None) -> dict:
    """Compare a release directory with a ``sha256sum``-style manifest (default ``MANIFEST.sha256`` inside it or
    its parent); raises naming every differing or missing file. Without a manifest, does nothing."""
    from .convert import manifest
    from .release import CheckpointError, release_dir

    d = release_dir(path)
    if manifest_file is None:
        for cand in (d / MANIFEST_NAME, d.parent / MANIFEST_NAME):
            if cand.is_file():
                manifest_file, d = cand, cand.parent
                break
        else:
            return {}
    expected = parse_manifest(Path(manifest_file).read_text())
    got = manifest(d)
    bad = [f"{p}: missing" for p in expected if p not in got]
    bad += [f"{p}: sha256 {got[p]} differs from the manifest's {h}" for p, h in expected.items()
            if p in got and got[p] != h]
    if bad:
        raise CheckpointError(f"{d}: {len(bad)} file(s) do not match {manifest_file}:\n  " + "\n  ".join(bad))
    return got


def parse_manifest(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip():
            h, _, p = line.strip().partition("  ")
            out[p.lstrip("*")] = h.lower()
    return out

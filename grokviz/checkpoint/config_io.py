"""Model configs on disk: one way from JSON (file, string or dict) to a :class:`~grokviz.config.GrokConfig`."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..config import GrokConfig

FORMAT = "grokviz-safetensors"


def config_to_json(cfg: GrokConfig) -> dict:
    return {"format": FORMAT, "grokviz_config": dataclasses.asdict(cfg), "reference_config": cfg.to_reference()}


def config_from_json(d: dict) -> GrokConfig:
    if "grokviz_config" in d:
        return GrokConfig(**d["grokviz_config"])
    return GrokConfig.from_reference(ignore_generator_fields=True, **d)



def as_config(config) -> GrokConfig:
    """A GrokConfig from a GrokConfig, a dict (grokviz or reference field names, or a saved ``config.json``),
    a JSON file path or a JSON string."""
    if isinstance(config, GrokConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        text = str(config)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(config).read_text()
            except OSError as e:
                raise ValueError(f"config {str(config)!r} is neither a JSON object nor a readable file ({e})") from None
        try:
            config = json.loads(text)
        except ValueError as e:
            raise ValueError(f"config {str(config)[:80]!r}: invalid JSON ({e})") from None
    if isinstance(config, dict):
        ours = {f.name for f in dataclasses.fields(GrokConfig)}
        try:
            if "grokviz_config" in config:
                return config_from_json(config)
            if set(config) <= ours:
                return GrokConfig(**config)
            return GrokConfig.from_reference(ignore_generator_fields=True, **config)
        except TypeError as e:
            raise ValueError(f"incomplete model config {config}: {e}") from None
    raise TypeError(f"config must be a GrokConfig, dict, JSON string or JSON path, got {type(config).__name__}")


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

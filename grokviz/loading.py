"""``gv.load``: one entry point for the release checkpoint, converted checkpoints and the bundled tiny model.

::

    model = gv.load("/data/grok-1/checkpoints")                         # release format, Grok-1 inferred
    model = gv.load("tests/data/grok1_golden_ckpt", config=cfg)           # release format, any config
    model = gv.load("/data/grok-1-converted", verify=True)              # converted: config from config.json
    model = gv.load(path, mesh=gv.sharding.make_mesh((1, 8)))           # placed sharded as it is read
    model = gv.load("tiny")                                             # the small bundled model
    model = gv.load("/data/OLMoE-1B-7B-0924")                           # a Hugging Face folder (six MoE families)

``quantized=True`` (default) keeps the release's int8 weights as :class:`~grokviz.params.Int8Weight` (dequantised
inside each matmul); ``quantized=False`` dequantises them exactly (fp32) and casts to ``dtype``. Plain tensors
(embeddings, norms, router) are cast to ``dtype`` (default float32). A Hugging Face folder keeps its stored dtype
(bf16 stays bf16) unless ``dtype`` is given; see :mod:`grokviz.checkpoint.hf`.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from .api import Model
from .checkpoint.config_io import as_config, resolve_release_config


def _tokenizer(tokenizer, found):
    from .hf_tokenizer import HFTokenizer
    from .tokenizer import Tokenizer

    if tokenizer is False:
        return None
    if tokenizer is None:
        tokenizer = found
        if tokenizer is None:
            return None
    if isinstance(tokenizer, (Tokenizer, HFTokenizer)):
        return tokenizer
    return HFTokenizer(tokenizer) if str(tokenizer).endswith(".json") else Tokenizer(tokenizer)


def load(path_or_name, *, config=None, mesh=None, verify: bool = False, dtype=None, quantized: bool = True,
         progress: bool = True, tokenizer=None) -> Model:
    """Load a model (see the module docstring). ``tokenizer``: a path (``*.json``: a Hugging Face tokenizer) or a
    tokenizer; default: a ``tokenizer.model`` (Hugging Face folder: ``tokenizer.json``) found next to the
    checkpoint; ``False`` for none. A Hugging Face folder is checked as :func:`grokviz.checkpoint.hf.check_tensors`
    says whether or not ``verify`` is set (it records no hashes). ``verify``: check file hashes first (converted format:
    against the index, which must cover every file; release format: against a ``MANIFEST.sha256`` next to
    ``ckpt-0/``, as ``grokviz manifest PATH --write`` records it; without one, verification fails).

    Every tensor is checked against the config's exact shape as it is read (never broadcast), and nothing in
    the files is executed (the release's pickles go through an allow-list unpickler; the converted format is
    JSON and raw bytes, memory-mapped read-only). Loading writes nothing to the checkpoint folder."""
    if isinstance(path_or_name, str) and path_or_name == "tiny":  # the bundled model; Path("tiny") is a folder
        from .tiny import TINY_DIR, check_config

        check_config(config)
        path_or_name, config = TINY_DIR, None
    from .checkpoint import converted as cv
    from .checkpoint import release as rl
    from .checkpoint.assemble import ParamAssembler
    from .checkpoint.manifest import verify_release

    path = Path(path_or_name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (give a release directory, a converted directory, a "
                                f"Hugging Face folder or 'tiny')")
    from .checkpoint import hf

    if hf.is_hf(path):  # before is_converted: a sharded HF folder has a model.safetensors.index.json too
        cfg, params, found = hf.load_hf(path, config=None if config is None else as_config(config), dtype=dtype,
                                        mesh=mesh, progress=progress)
        return Model(cfg, params, _tokenizer(tokenizer, found))
    dtype = jnp.float32 if dtype is None else dtype
    if cv.is_converted(path):
        if verify:
            cv.verify(path)
        cfg = cv.read_config(path) if config is None else as_config(config)
        stream = cv.iter_converted(path, progress=progress, with_source=True)
        found = next((path / t for t in (cv.TOKENIZER, hf.TOKENIZER) if (path / t).is_file()), None)
    elif rl.is_release(path):
        cfg = resolve_release_config(path, config)
        if verify:
            verify_release(path)
        stream = ((e.name, e.layer, v, str(e.file)) for e, v in rl.iter_release(path, cfg, progress=progress))
        found = cv.find_sibling_tokenizer(rl.release_dir(path))
    else:
        raise ValueError(f"{path}: neither a converted grokviz checkpoint ({cv.INDEX}), a Hugging Face folder "
                         f"(config.json with a model_type + model.safetensors or its index) nor a release "
                         f"checkpoint (ckpt-0/tensor00000_000 ...)")
    asm = ParamAssembler(cfg, dtype=dtype, quantized=quantized, mesh=mesh)
    for name, layer, value, where in stream:
        asm.put(name, layer, value, where=where)
    return Model(cfg, asm.finish(), _tokenizer(tokenizer, found))

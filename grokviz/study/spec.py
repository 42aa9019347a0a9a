"""Study specs: a small TOML or JSON file (or a dict) saying what to run over what.

::

    model = "tiny"                      # "tiny", or a checkpoint folder gv.load opens (relative to this file)
    output = "runs/validation.npz"      # results (one .npz); progress next to it: <output>.progress.npz
    batch_size = 8                      # rows per global batch (the unit of work)
    max_len = 128                       # window length (default: the model's sequence_len)
    batches_per_round = 8               # global batches between progress checkpoints
    collect = ["routing", "top_tokens"] # + "attention", "ablation"
    mesh = [2, 4]                       # optional (data, model) mesh over every process's devices: see below
    ablation = {kind = "expert", mode = "contribution"}   # for "ablation" (mode: contribution|route_around|swap;
                                                          # kind "head": attention heads; layers = [...]: some)
    [dataset]
    corpus = "validation"               # the bundled corpus's split ("train" / "validation"), or
    # files = ["a.txt", "b.jsonl", "ids.npy"]   # .txt: one document; .jsonl: {"text"|"tokens", "domain"} a line;
    #                                           # .npy: token ids, one row a document
    limit = 40                          # optional: first N documents (after offset)
    offset = 0

Every key but ``model`` has a default. ``routing``: expert load, co-activation, consecutive-token counts,
first-choice flow, token-class and domain counts, entropy / gate mass / z-loss / probability sums per layer
(:class:`grokviz.analysis.dataset.RoutingStats`); ``top_tokens``: the per-(layer, token, expert) counts behind
``RoutingStats.top_tokens``; ``attention``: per-head attention summaries
(:class:`grokviz.analysis.dataset.AttentionStats`); ``ablation``: an ablation sweep's loss sums per (layer,
expert | head), the table of :func:`grokviz.analysis.patching.ablation_sweep` (loss, base loss, Δloss, KL).

**Where the model lives.** Without ``mesh`` every process loads the whole model and the processes run different
batches (data-parallel). With ``mesh = [data, model]`` (``data * model`` = every device of every process, e.g.
``[2, 4]`` for ``grokviz launch -n 2 --devices-per-process 4``, or ``[1, 8]``) the model is placed on that mesh
by :func:`grokviz.distributed.sharded.load`, so each process reads only the bytes of its own devices' shards (the
way to study a model bigger than one host: release pickles, converted or Hugging Face checkpoints), and every
batch runs on the whole mesh, all processes together (process 0's statistics of it are kept). The counts are
those of a one-process run (tests/test_distributed.py: exactly, 2 processes, mesh ``[1, 8]``); float sums agree
to rounding (a sharded matmul adds in another order). The mesh is part of the study's fingerprint: a job resumes
only on the mesh it started on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

COLLECT = ("routing", "top_tokens", "attention", "ablation")
KEYS = {"model", "output", "progress", "batch_size", "max_len", "batches_per_round", "collect", "dataset",
        "expert_impl", "ablation", "mesh"}
ABLATION_MODES = ("contribution", "route_around", "swap")
DATASET_KEYS = {"corpus", "files", "limit", "offset", "domain"}


@dataclasses.dataclass(frozen=True)
class Spec:
    model: str
    output: Path
    progress: Path
    dataset: dict
    batch_size: int = 8
    max_len: int | None = None
    batches_per_round: int = 8
    collect: tuple = ("routing", "top_tokens")
    expert_impl: str = "sparse"
    ablation: tuple = (("kind", "expert"), ("layers", None), ("mode", "contribution"))
    base: Path = Path(".")
    mesh: tuple | None = None

    def model_path(self) -> str:
        return self.model if self.model == "tiny" else str(_resolve(self.base, self.model))

    def documents(self) -> list:
        """The dataset's documents (dicts with text/tokens and domain), in order, after offset/limit."""
        d = self.dataset
        if "corpus" in d:
            from ..corpus import load

            docs = load(split=d["corpus"], domain=d.get("domain"))
        else:
            docs = []
            for f in d["files"]:
                docs.extend(_read_file(_resolve(self.base, f)))
        lo = int(d.get("offset", 0))
        hi = None if d.get("limit") is None else lo + int(d["limit"])
        return docs[lo:hi]

    def key(self) -> dict:
        """What decides the results besides the model and the data (fingerprinted)."""
        return {"batch_size": self.batch_size, "max_len": self.max_len, "batches_per_round": self.batches_per_round,
                "collect": list(self.collect), "expert_impl": self.expert_impl,
                **({"ablation": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.ablation}}
                   if "ablation" in self.collect else {}), **({"mesh": list(self.mesh)} if self.mesh else {})}


def _resolve(base: Path, p) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else base / p


def _read_file(path: Path) -> list:
    import numpy as np

    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    if path.suffix == ".txt":
        return [{"text": path.read_text(encoding="utf-8"), "domain": None}]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from None
            if not isinstance(d, dict) or not ({"text", "tokens"} & set(d)):
                raise ValueError(f"{path}:{i + 1}: each line must be an object with 'text' or 'tokens'")
            out.append(d)
        return out
    if path.suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.ndim not in (1, 2) or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{path}: token files must hold a 1-D or 2-D integer array, got {a.dtype} {a.shape}")
        return [{"tokens": row} for row in (a[None] if a.ndim == 1 else a)]
    raise ValueError(f"dataset file {path}: unknown kind (use .txt, .jsonl or .npy)")


def _int(name, v, lo=1, optional=False):
    if optional and v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"study spec: {name} must be an integer >= {lo}, got {v!r}")
    return v


def load_spec(spec) -> Spec:
    """A :class:`Spec` from a path (``.toml`` / ``.json``), a dict or a Spec; every field checked."""
    if isinstance(spec, Spec):
        return spec
    base = Path(".")
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"study spec {path} does not exist")
        base = path.resolve().parent
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".toml":
                import tomllib

                raw = tomllib.loads(text)
            elif path.suffix == ".json":
                raw = json.loads(text)
            else:
                raise ValueError(f"study spec {path}: use a .toml or .json file")
        except (ValueError, TypeError) as e:
            raise ValueError(f"study spec {path}: cannot parse ({e})") from None
        stem = path.stem
    elif isinstance(spec, dict):
        raw, stem = dict(spec), "study"
        base = Path(raw.pop("base", ".")).resolve()
    else:
        raise ValueError(f"study spec must be a path, a dict or a Spec, got {type(spec).__name__}")
    unknown = set(raw) - KEYS
    if unknown:
        raise ValueError(f"study spec: unknown key(s) {sorted(unknown)}; known: {sorted(KEYS)}")
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        raise ValueError("study spec: 'model' (\"tiny\" or a checkpoint folder) is required")
    ds = raw.get("dataset", {"corpus": "validation"})
    if not isinstance(ds, dict) or set(ds) - DATASET_KEYS:
        raise ValueError(f"study spec: dataset must be a table with keys from {sorted(DATASET_KEYS)}, got {ds!r}")
    if ("corpus" in ds) == ("files" in ds):
        raise ValueError("study spec: dataset needs exactly one of 'corpus' (a bundled split) or 'files'")
    if "corpus" in ds and ds["corpus"] not in ("train", "validation"):
        raise ValueError(f"study spec: dataset.corpus must be 'train' or 'validation', got {ds['corpus']!r}")
    if "files" in ds and (not isinstance(ds["files"], list) or not ds["files"]):
        raise ValueError("study spec: dataset.files must be a non-empty list of paths")
    _int("dataset.limit", ds.get("limit"), 1, optional=True)
    _int("dataset.offset", ds.get("offset", 0), 0)
    collect = raw.get("collect", ["routing", "top_tokens"])
    if isinstance(collect, str):
        collect = [collect]
    bad = [c for c in collect if c not in COLLECT]
    if bad or not collect:
        raise ValueError(f"study spec: collect must be a non-empty list from {COLLECT}, got {collect!r}")
    if "top_tokens" in collect and "routing" not in collect:
        raise ValueError("study spec: 'top_tokens' needs 'routing' in collect")
    abl = raw.get("ablation", {})
    if not isinstance(abl, dict) or set(abl) - {"kind", "mode", "layers"}:
        raise ValueError(f"study spec: ablation must be a table with keys kind, mode, layers; got {abl!r}")
    layers = abl.get("layers")
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(x, int) for x in layers)):
        raise ValueError(f"study spec: ablation.layers must be a list of layer numbers, got {layers!r}")
    abl = {"kind": abl.get("kind", "expert"), "mode": abl.get("mode", "contribution"),
           "layers": None if layers is None else tuple(layers)}
    if abl["kind"] not in ("expert", "head") or abl["mode"] not in ABLATION_MODES:
        raise ValueError(f"study spec: ablation.kind must be 'expert' or 'head' and ablation.mode one of "
                         f"{ABLATION_MODES}, got {abl!r}")
    impl = raw.get("expert_impl", "sparse")
    if impl not in ("sparse", "dense"):
        raise ValueError(f"study spec: expert_impl must be 'sparse' or 'dense', got {impl!r}")
    mesh = raw.get("mesh")
    if mesh is not None and (not isinstance(mesh, list) or len(mesh) != 2
                             or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mesh)):
        raise ValueError(f"study spec: mesh must be [data, model], two integers >= 1, got {mesh!r}")
    output = _resolve(base, raw.get("output", f"{stem}.results.npz"))
    progress = _resolve(base, raw["progress"]) if "progress" in raw else output.with_name(output.name +
                                                                                         ".progress.npz")
    return Spec(model=raw["model"], output=output, progress=progress, dataset=dict(ds),
                batch_size=_int("batch_size", raw.get("batch_size", 8)),
                max_len=_int("max_len", raw.get("max_len"), optional=True),
                batches_per_round=_int("batches_per_round", raw.get("batches_per_round", 8)),
                collect=tuple(c for c in COLLECT if c in collect), expert_impl=impl,
                ablation=tuple(sorted(abl.items())), base=base, mesh=None if mesh is None else tuple(mesh))


def model_fingerprint(spec: Spec, cfg) -> str:
    """Config + every file's name and size + the content of its small (< 1 MB) files (config, index with hashes):
    cheap even for a 300 GB checkpoint, and different for any other model."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
    if spec.model == "tiny":
        from ..tiny import TINY_DIR

        root = TINY_DIR
    else:
        root = Path(spec.model_path())
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root) if root.is_dir() else p.name}:{size}\n".encode())
        if size < 1 << 20 and p.suffix in (".json", ".sha256", ".txt"):
            h.update(p.read_bytes())
    return h.hexdigest()

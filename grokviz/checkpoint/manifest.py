"""SHA-256 manifests: what a checkpoint folder held when it was recorded, so that later loads can verify it.

The release format cannot itself detect two same-shaped tensors swapped between files (each pickle carries
only its array); a manifest recorded on a trusted copy (``grokviz manifest PATH``) can.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import fsutil
from .release import FILE_RE, RELEASE_SUBDIR, CheckpointError, release_dir
from .safetensors_io import sha256_file

MANIFEST_NAME = "MANIFEST.sha256"
_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


class NoManifestError(CheckpointError):
    """There is no manifest to verify a release folder against."""


def manifest_root(path) -> Path:
    """The folder a release's manifest describes and lives in: the one holding ``ckpt-0/`` (else the folder
    holding the tensor files)."""
    d = release_dir(path)
    return d.parent if d.name == RELEASE_SUBDIR else d


def manifest(path, *, progress: bool = False) -> dict[str, str]:
    """{relative path: sha256} of every regular file under ``path`` (sorted), e.g. a release checkpoint; a
    ``MANIFEST.sha256`` directly in ``path`` is left out (it cannot list itself)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p != path / MANIFEST_NAME)
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, unit="file", desc="hashing")
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in it}


def format_manifest(m: dict[str, str]) -> str:
    """``sha256sum``-compatible lines."""
    return "".join(f"{h}  {p}\n" for p, h in m.items())


def write_manifest(path, *, progress: bool = False) -> Path:
    """Hash the release at ``path`` and record ``MANIFEST.sha256`` next to ``ckpt-0/`` atomically (temporary
    file, fsync, rename), so that ``gv.load(..., verify=True)`` and ``grokviz verify`` check against it."""
    root = manifest_root(path)
    m = manifest(root, progress=progress)
    if not m:
        raise CheckpointError(f"{root}: no files to record in a manifest")
    return fsutil.write_file_atomic(root / MANIFEST_NAME, format_manifest(m).encode())


def find_manifest(path) -> Path | None:
    d = release_dir(path)
    for cand in (d / MANIFEST_NAME, d.parent / MANIFEST_NAME):
        if cand.is_file():
            return cand
    return None


def verify_release(path, manifest_file=None) -> dict:
    """Compare a release folder with a ``sha256sum``-style manifest (default: ``MANIFEST.sha256`` in the tensor
    folder or next to ``ckpt-0/``, its entries relative to its own folder; a ``manifest_file`` given explicitly
    has entries relative to :func:`manifest_root`, e.g. ``ckpt-0/tensor00000_000``).

    The manifest must be non-empty, cover every tensor file of the release (and a ``tokenizer.model`` a load
    would pick up), and name only files inside its folder. Raises :class:`CheckpointError` naming every
    uncovered, missing or differing file, or :class:`NoManifestError` when there is no manifest. Returns
    {relative path: sha256} of the files matched. Like the manifest, this cannot tell whether the recorded copy
    itself had two same-shaped tensors swapped between files: record manifests on a trusted copy.
    """
    from .converted import TOKENIZER

    err = CheckpointError
    d = release_dir(path)
    root = manifest_root(path)
    if manifest_file is None:
        manifest_file = find_manifest(path)
        if manifest_file is None:
            raise NoManifestError(f"{d}: no {MANIFEST_NAME} in {d} or {d.parent}; nothing to verify the release "
                             f"against (record one on a trusted copy with `grokviz manifest PATH --write`, or "
                             f"pass --manifest FILE)")
        root = manifest_file.parent
    manifest_file = Path(manifest_file)
    try:
        expected = parse_manifest(manifest_file.read_text())
    except OSError as e:
        raise err(f"{manifest_file}: cannot read the manifest ({e})") from None
    except ValueError as e:
        raise err(f"{manifest_file}: {e}") from None
    if not expected:
        raise err(f"{manifest_file}: the manifest lists no files; nothing was verified")
    targets = {rel: fsutil.confined(root, rel, f"file named in {manifest_file.name}", err) for rel in expected}
    listed = {t.resolve() for t in targets.values()}
    must = [d / n for n in sorted(os.listdir(d)) if FILE_RE.match(n)]
    top = root.resolve()
    must += [t for t in (d / TOKENIZER, d.parent / TOKENIZER) if t.is_file() and top in t.resolve().parents]
    bad = [f"{p}: present but not in the manifest" for p in must if p.resolve() not in listed]
    got = {}
    for rel, h in expected.items():
        f = targets[rel]
        if not f.is_file():
            bad.append(f"{rel}: missing")
            continue
        digest = sha256_file(f)
        if digest != h:
            bad.append(f"{rel}: sha256 {digest} differs from the manifest's {h}")
            continue
        got[rel] = digest
    if bad:
        raise err(f"{d}: {len(bad)} problem(s) against {manifest_file}:\n  " + "\n  ".join(bad))
    return got


def parse_manifest(text: str) -> dict[str, str]:
    """{path: sha256} of ``sha256sum`` lines (``HASH  path`` or ``HASH *path``); ValueError naming a bad line."""
    out = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.rstrip("\r"))
        if not m:
            raise ValueError(f"line {i} is not '<64 hex digits>  <path>': {line[:100]!r}")
        h, p = m.group(1).lower(), m.group(2)
        if p in out and out[p] != h:
            raise ValueError(f"line {i}: {p} is listed twice with different hashes")
        out[p] = h
    return out

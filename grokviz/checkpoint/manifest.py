"""SHA-256 manifests: what a checkpoint folder held when it was recorded, so that later loads can verify it.

The release format cannot itself detect two same-shaped tensors swapped between files (each pickle carries
only its array); a manifest recorded on a trusted copy (``grokviz manifest PATH``) can.
"""

from __future__ import annotations

from pathlib import Path

from .safetensors_io import sha256_file

MANIFEST_NAME = "MANIFEST.sha256"


def manifest(path, *, progress: bool = False) -> dict[str, str]:
    """{relative path: sha256} of every regular file under ``path`` (sorted), e.g. a release checkpoint."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, unit="file", desc="hashing")
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in it}


def format_manifest(m: dict[str, str]) -> str:
    """``sha256sum``-compatible lines."""
    return "".join(f"{h}  {p}\n" for p, h in m.items())




def verify_release(path, manifest_file=None) -> dict:
    """Compare a release directory with a ``sha256sum``-style manifest (default ``MANIFEST.sha256`` inside it or
    its parent); raises naming every differing or missing file. Without a manifest, does nothing."""
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

"""Filesystem helpers for checkpoints: folders and files published atomically, crash leftovers cleaned up, and
paths named inside a checkpoint confined to its folder.

A folder ``dst`` is written as a hidden sibling ``.<dst name>.tmp-<pid>-<random>`` and then put in place. When
``dst`` already exists (overwrite), the two are swapped in one step where the filesystem can (Linux
``renameat2(RENAME_EXCHANGE)``); elsewhere the old folder is first renamed to ``.<dst name>.old-<pid>-<random>``,
the new one renamed onto ``dst``, and the old one renamed back if that fails. A process killed at any point
leaves only such hidden siblings; the next write of the same destination (:func:`recover`) restores an ``.old-``
folder when ``dst`` is missing and removes the leftovers whose writing process no longer exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path, PurePosixPath

_LEFTOVER = re.compile(r"^(tmp|old)-(\d+)-[A-Za-z0-9_]+$")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def leftovers(dst: Path) -> list[tuple[str, int, Path]]:
    """(kind "tmp"/"old", writer pid, path) of the hidden siblings earlier writes of exactly ``dst`` left."""
    dst = Path(dst)
    prefix = f".{dst.name}."
    try:
        names = os.listdir(dst.parent)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith(prefix) and (m := _LEFTOVER.match(n[len(prefix):])):
            out.append((m.group(1), int(m.group(2)), dst.parent / n))
    return out


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def recover(dst) -> list[str]:
    """Undo what a killed write of ``dst`` left behind; returns what was done (also issued as a warning).

    Only leftovers of processes that no longer exist are touched. If ``dst`` is missing and an ``.old-`` backup
    exists (a swap was interrupted), the newest backup is renamed back to ``dst``; the rest is removed.
    """
    dst = Path(dst)
    stale = [(kind, path) for kind, pid, path in leftovers(dst) if not pid_alive(pid)]
    done = []
    olds = sorted((p for k, p in stale if k == "old"), key=lambda p: p.lstat().st_mtime)
    if olds and not os.path.lexists(dst):
        os.rename(olds[-1], dst)
        done.append(f"restored {dst} from {olds[-1].name} (an earlier overwrite was interrupted)")
        stale = [(k, p) for k, p in stale if p != olds[-1]]
    for _, p in stale:
        _remove(p)
        done.append(f"removed {p.name} (left by an interrupted write of {dst.name})")
    if done:
        warnings.warn("; ".join(done), stacklevel=3)
    return done


def new_temp_dir(dst: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, dst: Path, *, overwrite: bool) -> Path:
    """Put the complete folder ``tmp`` in place at ``dst`` (permissions from the umask); ``dst`` never goes
    missing: an existing one is kept until the new one is in place."""
    os.chmod(tmp, 0o777 & ~current_umask())
    fsync_dir(tmp)
    if os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
        if _exchange(tmp, dst):
            garbage = tmp
        else:
            garbage = dst.parent / f"{tmp.name.replace('.tmp-', '.old-', 1)}"
            os.rename(dst, garbage)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(garbage, dst)
                raise
        fsync_dir(dst.parent)
        _remove(garbage)
    else:
        os.rename(tmp, dst)
    fsync_dir(dst.parent)
    return dst


@contextlib.contextmanager
def atomic_file(path: Path):
    """``with atomic_file(path) as f: ...`` writes a binary file that appears at ``path`` only complete: the
    data goes to a temporary sibling ``.<name>.tmp-<pid>-<random>``, is fsynced and renamed into place (mode
    from the umask); on any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        _remove(Path(tmp))
        raise
    fsync_dir(path.parent)


def write_file_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def fsync_dir(path: Path):
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


def confined(root: Path, name, what: str, error=ValueError) -> Path:
    """``root / name`` for a relative ``name`` that stays inside ``root`` (no absolute path, no ``..``, no
    symlink resolving outside); ``error`` naming ``what`` otherwise."""
    root = Path(root)
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise error(f"{root}: {what} {name!r} is not a relative file name")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise error(f"{root}: {what} {name!r} points outside the checkpoint folder (absolute or '..' paths "
                    f"are refused)")
    full = root.joinpath(*p.parts)
    real, top = full.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise error(f"{root}: {what} {name!r} resolves to {real}, outside the checkpoint folder (symlink)")
    return full

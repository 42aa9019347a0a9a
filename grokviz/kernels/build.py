"""Build, cache and load the fused CPU attention kernel (``attention.cc``), and register it with JAX's FFI.

Nothing happens at import: the first :func:`load` (through :func:`available`) compiles the source with the
system C++ compiler (``$CXX`` or ``g++``: ``-std=c++17 -O3 -march=native -fPIC -shared`` plus JAX's FFI headers)
into a per-user cache, ``$GROKVIZ_KERNEL_DIR`` or ``$XDG_CACHE_HOME/grokviz/kernels`` (default
``~/.cache/grokviz/kernels``), in a folder named by a hash of the source, the flags, the compiler, the jax and
jaxlib versions and the CPU's feature flags, so a changed source, JAX or CPU builds anew. The library is written
to a temporary file in that folder and moved into place with ``os.replace`` (processes building at once each
produce a whole file; the last rename wins), then loaded with ctypes and its FFI targets registered once per
process. ``GROKVIZ_KERNELS=0`` turns the kernel off. Any failure (no compiler, a compile error, a library that
does not load) leaves :func:`available` False with the reason in :func:`reason`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("attention.cc")
FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared")
LIB_NAME = "grokviz_attention.so"
#: FFI target name -> exported handler symbol in the library
TARGETS = {"grokviz_attention": "GrokvizAttention", "grokviz_attention_pattern": "GrokvizAttentionPattern",
           "grokviz_attention_into": "GrokvizAttentionInto", "grokviz_uninit": "GrokvizUninit"}
COMPILE_TIMEOUT_S = 600

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "path": str, "lib": ctypes.CDLL


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else ``g++`` or ``c++`` on the PATH (None if there is none)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    return shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_root() -> Path:
    """The folder holding the built kernels (``$GROKVIZ_KERNEL_DIR``, else the per-user cache)."""
    env = os.environ.get("GROKVIZ_KERNEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grokviz" / "kernels"


def build_key(cxx: str) -> str:
    """Hash of everything the built library depends on."""
    import jax
    import jaxlib

    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cxx.encode(), jax.__version__.encode(),
                 jaxlib.__version__.encode(), _cpu_flags().encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def library_path(cxx: str) -> Path:
    return cache_root() / build_key(cxx) / LIB_NAME


def compile_library(cxx: str, out: Path) -> None:
    """Compile the source to ``out`` atomically (temp file in the same folder, fsync, os.replace)."""
    import jax

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-12:]
            raise RuntimeError(f"{cxx} exited with {res.returncode}: " + " | ".join(tail))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _register(lib) -> None:
    import jax

    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def load(rebuild: bool = False) -> dict:
    """Build (if needed), load and register the kernel once per process; returns the state dict
    {"ok", "reason", "path"}. Never raises for a missing compiler or a failed build."""
    with _lock:
        if _state and not rebuild:
            return _state
        _state.clear()
        if os.environ.get("GROKVIZ_KERNELS", "1").strip().lower() in ("0", "off", "false", "no"):
            _state.update(ok=False, reason="disabled by GROKVIZ_KERNELS=0", path=None)
            return _state
        if platform.system() != "Linux" and platform.system() != "Darwin":
            _state.update(ok=False, reason=f"unsupported platform {platform.system()}", path=None)
            return _state
        cxx = compiler()
        if cxx is None:
            _state.update(ok=False, reason="no C++ compiler found ($CXX, g++ or c++)", path=None)
            return _state
        path = None
        try:
            path = library_path(cxx)
            if rebuild or not path.exists():
                compile_library(cxx, path)
            lib = ctypes.cdll.LoadLibrary(str(path))
            if "registered" not in _REGISTERED:
                _register(lib)
                _REGISTERED.add("registered")
            _state.update(ok=True, reason="built and loaded", path=str(path), lib=lib)
        except Exception as e:  # a failed build or load: the pure-JAX path stays
            _state.update(ok=False, reason=f"build or load failed: {type(e).__name__}: {e}",
                          path=None if path is None else str(path))
        return _state


_REGISTERED: set = set()  # FFI targets are registered at most once per process (a rebuild reuses them)

"""glibc malloc settings that XLA on CPU needs to run at its speed, and a report of what this process runs with.

**The problem.** XLA's CPU runtime takes its buffers from glibc ``malloc``. glibc serves every block above its
mmap threshold (at most 32 MiB) with a fresh ``mmap``, gives it back with ``munmap`` when it is freed, and
trims the heap top back to the OS; XLA's worker threads allocate in their own arenas, whose heaps shrink on
free. A forward pass that writes 32 MiB of logits, or a stacked attention map, therefore page-faults through
every 4 KiB page of that buffer on every call. Measured on the project machine (2-core AMD EPYC, jax 0.10.2,
bench configuration): the 4×256 unembedding matmul took 18.6 ms as is and 9.1 ms without the faults (the
rate of a 2048³ GEMM); a 1×1024 forward with every layer's attention pattern made 32,769 faults per call.

**The settings** (:data:`TUNABLES`, glibc's own tunables, read once when a process starts):
``glibc.malloc.mmap_max=0`` (big blocks come from the heap and are reused instead of being mapped and
faulted afresh), ``glibc.malloc.trim_threshold=2147483647`` and ``glibc.malloc.top_pad=268435456`` (freed
memory stays with the process for the next call: a 2 GiB trim threshold, a 256 MiB top pad), and
``glibc.malloc.hugetlb=1`` (glibc >= 2.35, kernel THP mode ``madvise`` or ``always``: what is still faulted,
e.g. the worker threads' arena heaps, is faulted in 2 MiB pages).

**Who sets them.** ``import grokviz`` changes nothing in the process. ``scripts/env.sh`` exports
``GLIBC_TUNABLES`` with them, added to any tunables already set (``scripts/lab.sh``, ``scripts/test.sh`` and the
benchmarks run through it), and ``scripts/setup-venv.sh`` puts them into the venv's ``python3`` Jupyter
kernelspec, so notebook kernels get them whoever starts the server. For a Python started without them,
:func:`tune_malloc` is the explicit opt-in: it applies the first three to the *running* process with
``mallopt`` (THP cannot be switched on after start). :func:`status` says what is active.

Bench configuration, one process per setting, same machine and hour (median [p25-p75] ms; "mallopt" was
:func:`tune_malloc` at import, which the tunables replace with the same values):

============================  =================  ===================  ======================
setting                       4×256 plain        1×1024 + patterns    64 layers 4×256 + patterns
============================  =================  ===================  ======================
glibc defaults                53.0 [53-54]       128.0 [128-130]      783 [707-785]
THP tunable only              52.6 [52-53]       82.6 [82-89]         630 [626-637]
mallopt only                  44.6 [45-45]       104.7 [104-105]      740 [721-753]
both                          44.3 [44-45]       84.4 [82-88]         620 [619-621]
============================  =================  ===================  ======================

Peak RSS of a 1×8192 forward with reduced attention summaries over 9 calls: 4.4 GiB with glibc's defaults,
4.6 GiB with both. One arena for all threads (``M_ARENA_MAX = 1``) also removed the thread faults but let the
heap fragment (11 GiB there), so it is not used. The price of the settings: resident memory does not shrink
after a large computation, in every process started with them.

This module uses the standard library only; ``python grokviz/runtime.py kernelspec PREFIX`` writes the
kernelspec (used by ``scripts/setup-venv.sh``; PREFIX is a venv or conda environment).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import sys
import tempfile

#: the glibc tunables grokviz's scripts start Python with (the mallopt equivalents are in :data:`_MALLOPT`)
TUNABLES = {
    "glibc.malloc.mmap_max": 0,
    "glibc.malloc.trim_threshold": 2**31 - 1,
    "glibc.malloc.top_pad": 256 << 20,
    "glibc.malloc.hugetlb": 1,
}
#: the GLIBC_TUNABLES value that scripts/env.sh and the kernelspec set (tests check they agree)
GLIBC_TUNABLES = ":".join(f"{k}={v}" for k, v in TUNABLES.items())

# tunable -> (mallopt parameter number from glibc's <malloc.h>, glibc's older environment variable)
_MALLOPT = {
    "glibc.malloc.mmap_max": (-4, "MALLOC_MMAP_MAX_"),  # M_MMAP_MAX
    "glibc.malloc.trim_threshold": (-1, "MALLOC_TRIM_THRESHOLD_"),  # M_TRIM_THRESHOLD
    "glibc.malloc.top_pad": (-2, "MALLOC_TOP_PAD_"),  # M_TOP_PAD
}
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"

#: what :func:`tune_malloc` did in this process: {tunable: value} applied with mallopt, or why nothing was
MALLOC_STATUS: dict | str = "not applied: grokviz.runtime.tune_malloc() was not called"


def parse_tunables(value: str) -> dict[str, str]:
    """``"a=1:b=2"`` -> ``{"a": "1", "b": "2"}`` (the GLIBC_TUNABLES syntax; items without ``=`` are dropped)."""
    out = {}
    for item in value.split(":"):
        name, eq, val = item.strip().partition("=")
        if eq and name:
            out[name] = val
    return out


def tunables_set(env=None) -> dict[str, str]:
    """The ``glibc.malloc.*`` tunables in ``env``'s GLIBC_TUNABLES (default: this process's environment)."""
    env = os.environ if env is None else env
    return {k: v for k, v in parse_tunables(env.get("GLIBC_TUNABLES", "")).items() if k.startswith("glibc.malloc.")}


def env_with_tunables(env=None) -> dict:
    """A copy of ``env`` (default: os.environ) whose GLIBC_TUNABLES has every one of :data:`TUNABLES` that it
    did not set already (the caller's own values win), as ``scripts/env.sh`` does. For starting subprocesses."""
    env = dict(os.environ if env is None else env)
    have = parse_tunables(env.get("GLIBC_TUNABLES", ""))
    extra = [f"{k}={v}" for k, v in TUNABLES.items() if k not in have]
    if extra:
        env["GLIBC_TUNABLES"] = ":".join(t for t in [env.get("GLIBC_TUNABLES", "")] + extra if t)
    return env


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where unknown.
    ``glibc.malloc.hugetlb=1`` has an effect under ``always`` and ``madvise`` only."""
    try:
        with open(_THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune_malloc(env=None) -> dict | str:
    """Opt-in, and it **changes the running process**: apply the mmap_max, trim_threshold and top_pad values
    of :data:`TUNABLES` with glibc's ``mallopt``, for a Python that was not started with them (a process
    started through ``scripts/env.sh`` or the kernelspec already has them). Call it before the first large
    computation; it cannot be undone and cannot switch on THP. A setting already chosen through
    GLIBC_TUNABLES or glibc's ``MALLOC_*_`` variables in ``env`` (default: os.environ) is left alone.
    Returns and records (:data:`MALLOC_STATUS`) the {tunable: value} applied, or why nothing was."""
    global MALLOC_STATUS
    env = os.environ if env is None else env
    if not _is_glibc():
        MALLOC_STATUS = "not applied: not glibc"
        return MALLOC_STATUS
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError) as e:  # pragma: no cover - glibc always has mallopt
        MALLOC_STATUS = f"not applied: mallopt unavailable ({e})"
        return MALLOC_STATUS
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    chosen = tunables_set(env)
    applied = {}
    for name, (param, old_var) in _MALLOPT.items():
        if name in chosen or old_var in env:
            continue
        if mallopt(param, TUNABLES[name]) == 1:
            applied[name] = TUNABLES[name]
    MALLOC_STATUS = applied
    return applied


def status() -> dict:
    """What this process runs with: ``glibc`` (version, or None elsewhere), ``tunables`` (the glibc.malloc.*
    items of GLIBC_TUNABLES in os.environ; glibc reads them when the process starts, so a value put there
    later shows here but has no effect), ``missing`` (those of :data:`TUNABLES` not among them), ``mallopt``
    (:data:`MALLOC_STATUS`: what :func:`tune_malloc` applied), ``thp`` (the kernel's THP mode). Changes
    nothing."""
    glibc = platform.libc_ver()[1] if _is_glibc() else None
    have = tunables_set()
    return {"glibc": glibc, "tunables": have, "missing": [k for k in TUNABLES if k not in have],
            "mallopt": MALLOC_STATUS, "thp": thp_mode()}


def write_kernelspec(prefix: str, name: str = "python3") -> str:
    """Write ``PREFIX/share/jupyter/kernels/NAME/kernel.json``: ipykernel's spec (kept where one is there)
    with ``env.GLIBC_TUNABLES`` = :data:`GLIBC_TUNABLES`, so kernels start with the settings whoever starts
    the server (the fixed value replaces any GLIBC_TUNABLES the server has). Atomic; unchanged files are not
    rewritten. Returns the path."""
    kdir = os.path.join(prefix, "share", "jupyter", "kernels", name)
    path = os.path.join(kdir, "kernel.json")
    spec = {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python", "metadata": {"debugger": True}}
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and isinstance(old.get("argv"), list):
        spec = dict(old)
    spec["env"] = dict(spec.get("env") or {}, GLIBC_TUNABLES=GLIBC_TUNABLES)
    if spec == old:
        return path
    os.makedirs(kdir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=kdir, prefix=".kernel.json.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


if __name__ == "__main__":  # python grokviz/runtime.py kernelspec PREFIX | tunables | status
    args = sys.argv[1:]
    if args[:1] == ["kernelspec"] and len(args) == 2:
        print(write_kernelspec(args[1]))
    elif args == ["tunables"]:
        print(GLIBC_TUNABLES)
    elif args == ["status"]:
        print(json.dumps(status(), indent=1))
    else:
        sys.exit("usage: python grokviz/runtime.py kernelspec PREFIX | tunables | status")

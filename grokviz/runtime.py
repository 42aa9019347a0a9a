"""Process-level tuning that XLA on CPU needs to run at its speed.

**The problem.** XLA's CPU runtime takes its buffers from glibc ``malloc``. glibc serves every block above its
mmap threshold (at most 32 MiB) with a fresh ``mmap``, gives it back with ``munmap`` when it is freed, and
trims the heap top back to the OS; XLA's worker threads allocate in their own arenas, whose heaps shrink on
free. A forward pass that writes 32 MiB of logits, or a stacked attention map, therefore page-faults through
every 4 KiB page of that buffer on every call. Measured on the project machine (2-core AMD EPYC, jax 0.10.2,
bench configuration): the 4×256 unembedding matmul took 18.6 ms as is and 9.1 ms without the faults (the
rate of a 2048³ GEMM); a 1×1024 forward with every layer's attention pattern made 32,769 faults per call.

**What grokviz does.** :func:`tune_malloc`, run when grokviz is imported, sets ``M_MMAP_MAX = 0`` (big
blocks come from the heap and are reused instead of being mapped and faulted afresh), a 2 GiB trim threshold
and a 256 MiB top pad (freed memory stays with the process for the next call). XLA's worker threads still
allocate in arenas of their own, whose heaps shrink and grow with 4 KiB faults; for those, start Python with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35, kernel THP mode ``madvise`` or ``always``): pages
are then 2 MiB. That tunable is read at process start only, so ``scripts/lab.sh`` (JupyterLab and its
kernels), ``scripts/test.sh`` and the benchmarks set it (``scripts/env.sh``).

Bench configuration, one process per setting, same machine and hour (median [p25-p75] ms):

============================  =================  ===================  ======================
setting                       4×256 plain        1×1024 + patterns    64 layers 4×256 + patterns
============================  =================  ===================  ======================
glibc defaults                53.0 [53-54]       128.0 [128-130]      783 [707-785]
THP tunable only              52.6 [52-53]       82.6 [82-89]         630 [626-637]
mallopt only (import)         44.6 [45-45]       104.7 [104-105]      740 [721-753]
both (scripts/lab.sh)         44.3 [44-45]       84.4 [82-88]         620 [619-621]
============================  =================  ===================  ======================

Peak RSS of a 1×8192 forward with reduced attention summaries over 9 calls: 4.4 GiB with glibc's defaults,
4.6 GiB with both. One arena for all threads (``M_ARENA_MAX = 1``) also removed the thread faults but let the
heap fragment (11 GiB there), so it is not used. The price of the settings: resident memory does not shrink
after a large computation. Set ``GROKVIZ_MALLOC_TUNING=0`` to leave malloc alone; settings made through
glibc's own ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` variables are kept. Other
platforms are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
SETTINGS = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 256 << 20}
_ENV_OF = {"M_MMAP_MAX": "MALLOC_MMAP_MAX_", "M_TRIM_THRESHOLD": "MALLOC_TRIM_THRESHOLD_",
           "M_TOP_PAD": "MALLOC_TOP_PAD_"}
_PARAM_OF = {"M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD}

#: what :func:`tune_malloc` did in this process: {setting: value} applied, or why it did nothing
MALLOC_STATUS: dict | str = "not run"


def hugetlb_active(env=None) -> bool:
    """Whether this process was started with glibc's transparent-huge-page malloc tunable."""
    env = os.environ if env is None else env
    tunables = env.get("GLIBC_TUNABLES", "")
    return any(t.strip().startswith("glibc.malloc.hugetlb=") and t.strip() != "glibc.malloc.hugetlb=0"
               for t in tunables.split(":"))


def env_with_hugetlb(env=None) -> dict:
    """A copy of ``env`` (default: os.environ) whose GLIBC_TUNABLES asks for THP-backed malloc."""
    env = dict(os.environ if env is None else env)
    if not hugetlb_active(env):
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), HUGETLB_TUNABLE) if t)
    return env


def tune_malloc(env=None) -> dict | str:
    """Apply :data:`SETTINGS` with ``mallopt`` (glibc only) unless the user said no. Returns and records what
    was applied (with ``"hugetlb": True`` when the THP tunable is active as well)."""
    global MALLOC_STATUS
    env = os.environ if env is None else env
    if env.get("GROKVIZ_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        MALLOC_STATUS = "disabled by GROKVIZ_MALLOC_TUNING"
        return MALLOC_STATUS
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        MALLOC_STATUS = "not glibc: left alone"
        return MALLOC_STATUS
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:  # pragma: no cover - glibc always has mallopt
        MALLOC_STATUS = f"mallopt unavailable: {e}"
        return MALLOC_STATUS
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = {}
    for name, value in SETTINGS.items():
        if _ENV_OF[name] in env:  # the user chose this one through glibc's variable
            continue
        if mallopt(_PARAM_OF[name], value) == 1:
            applied[name] = value
    if hugetlb_active(env):
        applied["hugetlb"] = True
    MALLOC_STATUS = applied
    return applied

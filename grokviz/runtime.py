"""Process-level tuning that XLA on CPU needs to run at its speed.

**glibc malloc.** XLA's CPU runtime takes its buffers from ``malloc``. glibc serves every block above its
mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when it is freed, and
it trims the heap top back to the OS. A forward pass that writes 32 MiB of logits, or a stacked attention map,
therefore page-faults through every 4 KiB page of that buffer on every call. Measured on the project machine
(2-core AMD EPYC, jax 0.10.2, bench configuration, 4×256 tokens): the unembedding matmul took 18.6 ms as is
and 9.1 ms with the settings below, which is the rate of a 2048³ GEMM; the whole forward went from 74 to 57 ms.

:func:`tune_malloc` (run when grokviz is imported) sets ``M_MMAP_MAX = 0`` (no mmap for big blocks: they come
from the heap and are reused), a 2 GiB trim threshold and a 256 MiB top pad (freed memory stays with the
process for the next call), and one arena for all threads (XLA's workers allocate the big buffers; with
their own arenas the 128 MiB stacked attention maps of a 1×1024 forward were page-faulted on every call:
32,769 faults and 120 ms per forward, 0 faults and 96 ms with one arena). Arenas that threads created before
grokviz was imported stay. The price: the resident size does not shrink after a large computation, it stays
at its peak. Set ``GROKVIZ_MALLOC_TUNING=0`` in the environment to leave malloc alone; settings already made
through glibc's own ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` variables are
kept. Other platforms are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 256 << 20, "M_ARENA_MAX": 1}
_ENV_OF = {"M_MMAP_MAX": "MALLOC_MMAP_MAX_", "M_TRIM_THRESHOLD": "MALLOC_TRIM_THRESHOLD_",
           "M_TOP_PAD": "MALLOC_TOP_PAD_", "M_ARENA_MAX": "MALLOC_ARENA_MAX"}
_PARAM_OF = {"M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD, "M_TOP_PAD": _M_TOP_PAD,
             "M_ARENA_MAX": _M_ARENA_MAX}

#: what :func:`tune_malloc` did in this process: {setting: value} applied, or a reason it did nothing
MALLOC_STATUS: dict | str = "not run"


def tune_malloc(env=None) -> dict | str:
    """Apply :data:`SETTINGS` with ``mallopt`` (glibc only). Returns and records what was applied."""
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
    MALLOC_STATUS = applied
    return applied

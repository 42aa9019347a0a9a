"""grokviz.runtime: glibc malloc tuning that keeps big XLA buffers from page-faulting on every call."""

import platform
import subprocess
import sys

import pytest

from grokviz import runtime

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = r"""
import ctypes, resource
import grokviz, grokviz.runtime as r
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
import threading
faults = []
def work():  # in a worker thread, as XLA's buffers are allocated
    for i in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = libc.malloc(48 << 20)  # above glibc's largest mmap threshold, below a thread heap's 64 MiB
        ctypes.memset(a, 1, 48 << 20)
        libc.free(a)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work); t.start(); t.join()
print(repr(r.MALLOC_STATUS)); print(min(faults[2:]))
"""


def _probe(env_extra):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    status, faults = out.stdout.strip().splitlines()[-2:]
    return status, int(faults)


@glibc
def test_big_buffers_are_reused_not_page_faulted():
    status, faults = _probe({})
    assert "M_MMAP_MAX" in status
    pages = (48 << 20) // 4096
    assert faults < pages // 20, faults  # reused heap memory: (almost) no fault per reallocation
    status_off, faults_off = _probe({"GROKVIZ_MALLOC_TUNING": "0"})
    assert status_off == repr("disabled by GROKVIZ_MALLOC_TUNING")
    assert faults_off > pages // 2, faults_off  # glibc's default: a fresh mmap, every page faults again


def _thp_available():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@glibc
@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are off in this kernel")
def test_hugetlb_tunable_cuts_the_faults():
    status, faults = _probe(runtime.env_with_hugetlb({"GROKVIZ_MALLOC_TUNING": "0"}))
    pages = (48 << 20) // 4096
    assert faults < pages // 2, faults  # 2 MiB pages (when the kernel has them free): far fewer faults
    status, faults = _probe(runtime.env_with_hugetlb({}))
    assert "'hugetlb': True" in status and "M_MMAP_MAX" in status and faults < pages // 20


def test_hugetlb_detection():
    assert runtime.hugetlb_active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"})
    assert not runtime.hugetlb_active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not runtime.hugetlb_active({})
    env = runtime.env_with_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert runtime.tune_malloc(env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})["hugetlb"] is True


@glibc
def test_user_settings_win():
    applied = runtime.tune_malloc(env={"MALLOC_MMAP_MAX_": "65536"})
    assert applied == {k: v for k, v in runtime.SETTINGS.items() if k != "M_MMAP_MAX"}
    assert "M_MMAP_MAX" not in applied and "M_TOP_PAD" in applied
    assert runtime.tune_malloc(env={"GROKVIZ_MALLOC_TUNING": "off"}) == "disabled by GROKVIZ_MALLOC_TUNING"
    runtime.tune_malloc()  # restore the import-time state for the rest of the session

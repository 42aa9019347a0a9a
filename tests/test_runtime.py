"""grokviz.runtime and scripts/env.sh: glibc malloc tunables that keep XLA's big buffers from page-faulting on
every call; `import grokviz` itself changes nothing in the process."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from grokviz import runtime

ROOT = Path(__file__).resolve().parent.parent
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# What the allocator does with a 512 MiB block in the main thread (mmap or heap, the free space left above it,
# what is kept after free) and with 48 MiB blocks in a worker thread, as XLA allocates (page faults).
PROBE = r"""
import ctypes, json, resource, threading
libc = ctypes.CDLL("libc.so.6")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
MiB = 1 << 20
def probe():
    before = libc.mallinfo2()
    p = libc.malloc(512 * MiB)  # never touched: address space only
    held = libc.mallinfo2()
    libc.free(p)
    after = libc.mallinfo2()
    faults = []
    def work():
        for i in range(4):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            b = libc.malloc(48 * MiB)  # above glibc's largest mmap threshold, below a thread heap's 64 MiB
            ctypes.memset(b, 1, 48 * MiB)
            libc.free(b)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    t = threading.Thread(target=work); t.start(); t.join()
    return {"mmapped": held.hblks - before.hblks, "top_free_mib": held.keepcost // MiB,
            "released_mib": (held.arena - after.arena) // MiB, "faults_first": faults[0],
            "faults_reuse": min(faults[1:])}
"""
PAGES = (48 << 20) // 4096


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(extra)
    return env


def _run(code, env):
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe(tunables: str):
    env = _clean_env(**({"GLIBC_TUNABLES": tunables} if tunables else {}))
    return _run(PROBE + "print(json.dumps(probe()))", env)


def _thp_available():
    return runtime.thp_mode() in ("always", "madvise")


@glibc
def test_each_tunable_takes_effect():
    t = runtime.TUNABLES
    mmap_max, trim, pad = (f"{k}={t[k]}" for k in ("glibc.malloc.mmap_max", "glibc.malloc.trim_threshold",
                                                   "glibc.malloc.top_pad"))
    default = _probe("")
    assert default["mmapped"] == 1 and default["top_free_mib"] < 64, default
    assert default["faults_reuse"] > PAGES // 2, default  # a fresh mmap per block: every page faults again
    only_mmap = _probe(mmap_max)
    assert only_mmap["mmapped"] == 0 and only_mmap["released_mib"] >= 500, only_mmap  # heap, trimmed on free
    with_pad = _probe(f"{mmap_max}:{pad}")
    assert with_pad["top_free_mib"] >= 200 and default["top_free_mib"] < 64, with_pad  # 256 MiB above the block
    with_trim = _probe(f"{mmap_max}:{trim}")
    assert with_trim["released_mib"] == 0 and with_trim["faults_reuse"] < PAGES // 20, with_trim  # kept, reused
    full = _probe(runtime.GLIBC_TUNABLES)
    assert full["mmapped"] == 0 and full["top_free_mib"] >= 200 and full["released_mib"] == 0, full
    assert full["faults_reuse"] < PAGES // 20, full


@glibc
@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are off in this kernel")
def test_hugetlb_tunable_cuts_the_faults():
    thp = _probe("glibc.malloc.hugetlb=1")
    assert _probe("")["faults_first"] > PAGES // 2
    assert thp["faults_first"] < PAGES // 2, thp  # 2 MiB pages (when the kernel has them free)


NO_SIDE_EFFECTS = PROBE + r"""
import os, sys
env0 = dict(os.environ)
import jax
flags0 = {k: repr(v) for k, v in jax.config.values.items()}
import grokviz, grokviz.runtime as rt
flags1 = {k: repr(v) for k, v in jax.config.values.items()}
out = {"env_changed": sorted(k for k in set(env0) | set(os.environ) if env0.get(k) != os.environ.get(k)),
       "flags_changed": sorted(k for k in set(flags0) | set(flags1) if flags0.get(k) != flags1.get(k)),
       "status": rt.status(), "after_import": probe()}
out["user"] = rt.tune_malloc(env={"MALLOC_MMAP_MAX_": "65536", "GLIBC_TUNABLES": "glibc.malloc.top_pad=0"})
out["tuned"] = rt.tune_malloc()
out["status_tuned"] = rt.status()["mallopt"]
out["after_tune"] = probe()
print(json.dumps(out))
"""


@glibc
def test_import_changes_nothing_and_tune_malloc_is_the_opt_in():
    out = _run(NO_SIDE_EFFECTS, _clean_env())
    assert out["env_changed"] == [] and out["flags_changed"] == []
    st = out["status"]
    assert st["mallopt"].startswith("not applied") and st["tunables"] == {}
    assert st["missing"] == list(runtime.TUNABLES) and st["glibc"] == platform.libc_ver()[1]
    assert out["after_import"]["mmapped"] == 1 and out["after_import"]["top_free_mib"] < 64  # glibc's defaults
    assert out["user"] == {"glibc.malloc.trim_threshold": 2**31 - 1}  # choices made in its env are left alone
    expected = {k: v for k, v in runtime.TUNABLES.items() if k != "glibc.malloc.hugetlb"}
    assert out["tuned"] == expected and out["status_tuned"] == expected
    tuned = out["after_tune"]
    assert tuned["mmapped"] == 0 and tuned["released_mib"] == 0 and tuned["top_free_mib"] >= 200, tuned


def test_tunable_helpers():
    assert runtime.parse_tunables("a=1::b=2:junk") == {"a": "1", "b": "2"}
    assert runtime.tunables_set({"GLIBC_TUNABLES": "glibc.rtld.x=1:glibc.malloc.hugetlb=1"}) == {
        "glibc.malloc.hugetlb": "1"}
    env = runtime.env_with_tunables({"GLIBC_TUNABLES": "glibc.malloc.top_pad=1", "A": "b"})
    assert env["A"] == "b" and env["GLIBC_TUNABLES"] == (
        "glibc.malloc.top_pad=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:"
        "glibc.malloc.hugetlb=1")
    assert runtime.env_with_tunables({})["GLIBC_TUNABLES"] == runtime.GLIBC_TUNABLES
    assert runtime.thp_mode() in (None, "always", "madvise", "never")


def _env_sh(tunables=None, cmd='printf %s "$GLIBC_TUNABLES"'):
    env = _clean_env(**({"GLIBC_TUNABLES": tunables} if tunables is not None else {}))
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source scripts/env.sh; source scripts/env.sh; {cmd}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout


def test_env_sh_exports_every_tunable():
    assert _env_sh() == runtime.GLIBC_TUNABLES  # sourced twice: nothing repeated
    mine = "glibc.malloc.arena_max=2:glibc.malloc.top_pad=4096"
    assert runtime.parse_tunables(_env_sh(mine)) == dict(runtime.parse_tunables(runtime.GLIBC_TUNABLES),
                                                          **runtime.parse_tunables(mine))  # the user's value wins
    assert _env_sh(cmd="bash -c 'printf %s \"$GLIBC_TUNABLES\"'") == runtime.GLIBC_TUNABLES  # exported
    show = "import os; print(os.environ['GLIBC_TUNABLES'])"
    ran = subprocess.run(["bash", "scripts/env.sh", sys.executable, "-c", show], cwd=ROOT, env=_clean_env(),
                         capture_output=True, text=True, check=True)
    assert ran.stdout.strip() == runtime.GLIBC_TUNABLES  # executed with a command: runs it with the settings


def test_write_kernelspec(tmp_path):
    kdir = tmp_path / "share" / "jupyter" / "kernels" / "python3"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({"argv": ["python", "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"], "display_name": "X",
                                                  "language": "python", "env": {"A": "1"}}))
    path = runtime.write_kernelspec(str(tmp_path))
    spec = json.loads(Path(path).read_text())
    assert spec["display_name"] == "X" and spec["env"] == {"A": "1", "GLIBC_TUNABLES": runtime.GLIBC_TUNABLES}
    mtime = os.stat(path).st_mtime_ns
    runtime.write_kernelspec(str(tmp_path))
    assert os.stat(path).st_mtime_ns == mtime and sorted(p.name for p in kdir.iterdir()) == ["kernel.json"]
    fresh = json.loads(Path(runtime.write_kernelspec(str(tmp_path / "new"))).read_text())
    assert fresh["argv"][:3] == ["python", "-m", "ipykernel_launcher"] and fresh["env"]["GLIBC_TUNABLES"]


@pytest.mark.skipif(not (Path(sys.prefix) / ".grokviz-installed").exists(),
                    reason="this environment was not made by scripts/setup-venv.sh")
def test_notebook_kernels_start_with_the_tunables():
    """The kernel nbclient and JupyterLab start for the notebooks (kernelspec "python3" of this venv) has the
    tunables even when the process that starts it does not."""
    from jupyter_client.manager import start_new_kernel

    assert runtime.GLIBC_TUNABLES in Path(sys.prefix, "share/jupyter/kernels/python3/kernel.json").read_text()
    km, kc = start_new_kernel(kernel_name="python3", env=_clean_env(), startup_timeout=120)
    try:
        seen = []
        kc.execute_interactive("import os; print(os.environ.get('GLIBC_TUNABLES'))", timeout=60,
                               output_hook=lambda m: seen.append(m["content"].get("text", "")))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert "".join(seen).strip() == runtime.GLIBC_TUNABLES

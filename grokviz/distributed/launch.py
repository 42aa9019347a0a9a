"""``grokviz launch -n N [--devices-per-process K] -- COMMAND ...``: N local processes of one JAX job, for trying
multi-process runs on one machine and for tests.

Each child gets ``GROKVIZ_COORDINATOR=127.0.0.1:<free port>``, ``GROKVIZ_NUM_PROCESSES``, ``GROKVIZ_PROCESS_ID``,
``GROKVIZ_STATUS_FILE`` (where :func:`grokviz.distributed.set_phase` records its phase), ``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=K``; :func:`grokviz.distributed.initialize` reads them (gloo
CPU collectives). A leading ``grokviz`` in COMMAND runs this interpreter's ``python -m grokviz.cli``, a leading
``python`` this interpreter. Output lines are forwarded prefixed ``[p<i>]`` (gloo's per-connection chatter is
dropped).

**Bounds** (never a silent hang): the launcher exits non-zero, naming the process, its exit status and its last
phase, when

* a child exits non-zero or is killed: the others get ``grace`` seconds (default 5) to stop, then SIGTERM, then
  SIGKILL 2 s later; so at most ``grace + 2`` seconds (+ 0.2 s polling) after the first failure;
* a child has not joined (called ``initialize``) ``join_timeout`` seconds (default 90) after the start;
* ``timeout`` (default none) passes for the whole job.

Children die with the launcher (``PR_SET_PDEATHSIG`` on Linux), so a killed launcher leaves no processes behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import ENV_COORDINATOR, ENV_HEARTBEAT, ENV_ID, ENV_NUM, ENV_STATUS

GLOO_CHATTER = re.compile(r"^\[Gloo\] Rank \d+ is connected to")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup(cpus=None):
    def setup():  # runs in the child between fork and exec
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def _cpus_of(i: int, per: int) -> set[int]:
    have = sorted(os.sched_getaffinity(0))
    return {have[(i * per + j) % len(have)] for j in range(per)}


def _xla_flags(existing: str, k: int) -> str:
    kept = [f for f in existing.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={k}"])


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _status(path: Path) -> str:
    return str(_read(path).get("phase", "starting (had not reached grokviz.distributed.initialize)"))


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _forward(stream, prefix, out):
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if not GLOO_CHATTER.match(line):
            out.write(f"{prefix}{line}\n")
            out.flush()
    stream.close()


def launch(command, n: int, *, devices_per_process: int = 1, grace: float = 5.0, join_timeout: float = 90.0,
           timeout: float | None = None, heartbeat: int | None = None, cpus_per_process: int | None = None,
           env: dict | None = None, out=None) -> int:
    """Run ``command`` (a list) as ``n`` processes of one job; 0 when all exit 0, else 1 with the message on
    stderr (see the module docstring for the bounds). ``cpus_per_process``: pin process ``i`` to its own
    ``cpus_per_process`` cores (Linux ``sched_setaffinity``; wraps around when there are fewer)."""
    if not command:
        raise ValueError("launch: no command given (put it after --)")
    if n < 1 or devices_per_process < 1:
        raise ValueError(f"launch: -n and --devices-per-process must be >= 1, got {n}, {devices_per_process}")
    out = out or sys.stdout
    command = list(command)
    if command[0] == "grokviz":
        command = [sys.executable, "-m", "grokviz.cli", *command[1:]]
    elif command[0] in ("python", "python3"):
        command = [sys.executable, *command[1:]]
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="grokviz-launch-"))
    base = dict(os.environ if env is None else env)
    base.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM: str(n), "JAX_PLATFORMS": "cpu",
                 "XLA_FLAGS": _xla_flags(base.get("XLA_FLAGS", ""), devices_per_process), "PYTHONUNBUFFERED": "1"})
    if heartbeat:
        base[ENV_HEARTBEAT] = str(int(heartbeat))
    procs, threads, status = [], [], []
    t0 = time.monotonic()
    try:
        for i in range(n):
            status.append(tmp / f"p{i}.json")
            cenv = dict(base, **{ENV_ID: str(i), ENV_STATUS: str(status[i])})
            p = subprocess.Popen(command, env=cenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 preexec_fn=_child_setup(cpus_per_process and _cpus_of(i, cpus_per_process))
                                 if sys.platform.startswith("linux") else None)
            procs.append(p)
            th = threading.Thread(target=_forward, args=(p.stdout, f"[p{i}] ", out), daemon=True)
            th.start()
            threads.append(th)
        failure = _watch(procs, status, t0, grace=grace, join_timeout=join_timeout, timeout=timeout)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        _stop(procs)
        for th in threads:
            th.join(timeout=2)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    if failure:
        print(f"grokviz launch: job failed: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0


def _watch(procs, status, t0, *, grace, join_timeout, timeout):
    joined = [False] * len(procs)
    while True:
        time.sleep(0.2)
        now = time.monotonic()
        codes = [p.poll() for p in procs]
        for i in range(len(procs)):
            if not joined[i] and (codes[i] is not None or _read(status[i]).get("joined")):
                joined[i] = True
        bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            i = bad[0]
            msg = (f"process {i} (pid {procs[i].pid}) {_describe_exit(codes[i])} while "
                   f"{_status(status[i])!r}")
            t_fail = time.monotonic()
            msg += _wind_down(procs, status, grace, exclude=i)
            return msg + f" (job stopped {time.monotonic() - t_fail:.1f} s after the failure was seen)"
        if all(c == 0 for c in codes):
            return None
        if now - t0 > join_timeout and not all(joined):
            late = [i for i in range(len(procs)) if not joined[i]]
            return (f"process(es) {late} did not join the job within {join_timeout:g} s (last phase: "
                    + "; ".join(f"p{i}: {_status(status[i])!r}" for i in late) + ")"
                    + _wind_down(procs, status, 0, exclude=None))
        if timeout and now - t0 > timeout:
            return f"timed out after {timeout:g} s" + _wind_down(procs, status, 0, exclude=None)


def _wind_down(procs, status, grace, exclude):
    """Give the others ``grace`` s to stop by themselves; return what became of them."""
    end = time.monotonic() + grace
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    notes = []
    for i, p in enumerate(procs):
        if i == exclude:
            continue
        rc = p.poll()
        if rc is None:
            notes.append(f"process {i} stopped by the launcher while {_status(status[i])!r}")
        elif rc != 0:
            notes.append(f"process {i} {_describe_exit(rc)}")
    return ("; " + "; ".join(notes)) if notes else ""


def _stop(procs):
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    end = time.monotonic() + 2.0
    for p in live:
        try:
            p.wait(timeout=max(end - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

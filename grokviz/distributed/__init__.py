"""Multi-process runs on JAX's own multi-controller runtime (``jax.distributed``): no RPC, scheduler or collective
of our own.

::

    import grokviz as gv
    from grokviz import distributed as dist

    info = dist.initialize()          # launcher / SLURM / Open MPI / Kubernetes env detected; else one process
    mesh = dist.global_mesh((2, 4))   # ("data", "model") over every process's devices, data across processes
    total = dist.sum_exact(counts)    # int64 sum over processes, exact (a gather of the bits, summed on the host)

Every process runs the same program (SPMD). ``initialize`` must come before anything touches a JAX device.
Without arguments it takes, in order: the ``GROKVIZ_COORDINATOR`` / ``GROKVIZ_NUM_PROCESSES`` /
``GROKVIZ_PROCESS_ID`` variables that ``grokviz launch`` sets, then whatever cluster ``jax.distributed`` detects
(SLURM, Open MPI, TPU pods, Kubernetes); with neither it is a single-process run and does nothing.

**Faults** (docs: the README's "Multi-host runs"): ``heartbeat_timeout_s`` (default 10 s, env
``GROKVIZ_HEARTBEAT_S``) is handed to JAX's coordination service, which terminates every process of the job
(SIGABRT) at most about that long after one stops sending heartbeats, so no process hangs in a collective. In
practice a survivor's next collective fails at once (gloo: "Connection closed by peer"), ``grokviz study``
reports the round and exits 1, and the coordination service aborts it at shutdown (measured on CPU: 6 s after the
peer's death with the default heartbeat); ``init_timeout_s`` (default 60 s, ``GROKVIZ_INIT_TIMEOUT_S``) bounds
the wait for every process to join. :func:`set_phase` records what this process is doing (in the status file
``grokviz launch`` reads, ``GROKVIZ_STATUS_FILE``), so a failure names the process and its phase.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

__all__ = ["Info", "initialize", "info", "global_mesh", "set_phase", "phase", "allgather_exact", "sum_exact",
           "broadcast_json", "barrier"]

ENV_COORDINATOR = "GROKVIZ_COORDINATOR"
ENV_NUM = "GROKVIZ_NUM_PROCESSES"
ENV_ID = "GROKVIZ_PROCESS_ID"
ENV_STATUS = "GROKVIZ_STATUS_FILE"
ENV_HEARTBEAT = "GROKVIZ_HEARTBEAT_S"
ENV_INIT_TIMEOUT = "GROKVIZ_INIT_TIMEOUT_S"
CLUSTER_VARS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES")
DEFAULT_HEARTBEAT_S = 10
DEFAULT_INIT_TIMEOUT_S = 60

_phase = "starting"
_joined = False


@dataclasses.dataclass(frozen=True)
class Info:
    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int
    coordinator: str | None      # None: single process, jax.distributed not started

    def __str__(self):
        where = f"coordinator {self.coordinator}" if self.coordinator else "single process"
        return (f"process {self.process_id} of {self.num_processes} ({self.local_devices} local / "
                f"{self.global_devices} global devices; {where})")


def _env_int(name, default):
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {v!r}") from None


def info() -> Info:
    """This process's place in the job (after :func:`initialize`, or a single process)."""
    import jax

    coord = os.environ.get(ENV_COORDINATOR) if jax.process_count() > 1 else None
    return Info(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(), coord)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               local_device_ids=None, heartbeat_timeout_s: int | None = None, init_timeout_s: int | None = None,
               cpu_collectives: str = "gloo") -> Info:
    """Join (or start) the job: a thin layer over ``jax.distributed.initialize`` (see the module docstring).

    ``coordinator`` is "host:port" of process 0. ``cpu_collectives`` is set as
    ``jax_cpu_collectives_implementation`` so CPU processes can run collectives (gloo over TCP). Idempotent: a
    second call returns the same :class:`Info`."""
    import jax

    if jax.distributed.is_initialized():
        return info()
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _env_int(ENV_NUM, None) if num_processes is None else int(num_processes)
    process_id = _env_int(ENV_ID, None) if process_id is None else int(process_id)
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("initialize: give all of coordinator, num_processes and process_id (or set "
                         f"${ENV_COORDINATOR}, ${ENV_NUM}, ${ENV_ID}), or none of them to let JAX detect the cluster")
    if num_processes is not None:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"initialize: process_id must be in [0, num_processes) and num_processes >= 1, got "
                             f"process_id={process_id}, num_processes={num_processes}")
        if num_processes == 1:
            _mark_joined("running (single process)")
            return info()
    hb = heartbeat_timeout_s or _env_int(ENV_HEARTBEAT, DEFAULT_HEARTBEAT_S)
    init_t = init_timeout_s or _env_int(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S)
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    set_phase(f"joining the job (coordinator {coordinator or 'auto-detected'}, up to {init_t} s)")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=int(init_t), heartbeat_timeout_seconds=int(hb))
    except RuntimeError as e:  # JAX already in use in this process (a notebook): stay one process if that is all
        if all(given) or "must be called before" not in str(e) or any(v in os.environ for v in CLUSTER_VARS):
            raise
        _mark_joined("running (single process; JAX was already initialised)")
        return info()
    except ValueError as e:
        if all(given) or "coordinator_address should be defined" not in str(e):
            raise
        _mark_joined("running (single process)")
        return info()  # no cluster detected: a single-process run
    out = info()
    _mark_joined(f"joined: {out}")
    return out


def _mark_joined(text):
    global _joined
    _joined = True
    set_phase(text)


def set_phase(text: str) -> None:
    """Record what this process is doing now (for the launcher's failure messages); cheap, atomic."""
    global _phase
    _phase = str(text)
    path = os.environ.get(ENV_STATUS)
    if not path:
        return
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"phase": _phase, "joined": _joined, "time": time.time(), "pid": os.getpid()}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a status line is best effort; never fail the job for it


def phase() -> str:
    return _phase


def global_mesh(shape=None):
    """A ``("data", "model")`` mesh over every device of every process, ordered by (process, device id) so the
    model axis stays inside a process and the data axis spans processes. Default shape: (processes, local
    devices)."""
    import jax

    from ..sharding import make_mesh

    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    shape = (jax.process_count(), jax.local_device_count()) if shape is None else tuple(shape)
    return make_mesh(shape, devs)


def allgather_exact(x) -> np.ndarray:
    """``[num_processes, *x.shape]``: every process's ``x`` (any numpy dtype), bit for bit.

    Wider dtypes travel as their int32 words (``process_allgather`` over the global devices), so int64 counts and
    float64 sums arrive exact whether or not ``jax_enable_x64`` is on. Every process must call it with the same
    shape and dtype."""
    import jax

    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None].copy()
    from jax.experimental import multihost_utils

    if x.dtype.itemsize % 4:
        raise ValueError(f"allgather_exact: dtype {x.dtype} is not a whole number of 32-bit words")
    words = x.reshape(-1).view(np.int32)
    got = np.asarray(multihost_utils.process_allgather(words))
    return got.view(x.dtype).reshape((jax.process_count(), *x.shape))


def sum_exact(x) -> np.ndarray:
    """Exact sum over processes of an integer array (int64 on the host)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"sum_exact is for integer counts, got {x.dtype} (gather floats with allgather_exact and "
                         f"sum them in a fixed order)")
    return allgather_exact(x.astype(np.int64)).sum(0)


def broadcast_json(obj=None):
    """Process 0's JSON-able ``obj``, on every process (others pass anything; their value is ignored)."""
    import jax

    if jax.process_count() == 1:
        return obj
    data = json.dumps(obj).encode() if jax.process_index() == 0 else b""
    n = int(allgather_exact(np.array([len(data)], np.int64))[0, 0])
    buf = np.zeros(-(-n // 4) * 4, np.uint8)
    if jax.process_index() == 0:
        buf[:n] = np.frombuffer(data, np.uint8)
    got = allgather_exact(buf.view(np.int32))[0].view(np.uint8)[:n]
    return json.loads(got.tobytes().decode())


def barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

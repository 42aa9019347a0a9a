"""Shared timing utilities for grokviz's benchmarks (no jax/torch import at module level).

Method (the same as ``shared/bench-peers/_common.py``, re-implemented here so that ``bench/`` is
self-contained):

* every mode of one shape runs **interleaved**, in a new random order each round, after ``warmup`` rounds
  (in one process, or — ``bench_peers.py`` — one worker process per framework driven by a coordinator);
  the table gives median and p25/p75 of the kept rounds — quote *ratios* from one run;
* a **foreign-load filter**: ``/proc/stat`` busy time minus our CPU time (this process's, plus that of
  any worker processes named) is other processes' load; a round where it exceeds ``max_foreign`` of the
  machine's CPUs is discarded and re-run after waiting (bounded) for quiet. On a shared 2-core machine
  an XLA forward slows 2-10x when another process takes a core, so unfiltered numbers mean little;
* compile time (trace + lower + compile) is measured apart from step time;
* peak RSS is VmHWM, optionally reset via ``/proc/self/clear_refs`` before the measured region;
* the **floor**: forward-pass matmul FLOPs / the rate of a 2048^3 fp32 GEMM timed interleaved in the
  same rounds (same library, same thread pool, same machine load);
* the **process settings** are those of the notebook kernels when a script is started through
  ``scripts/env.sh`` (``bash scripts/env.sh .venv/bin/python bench/bench_forward.py``); importing this module
  changes nothing, and a script started otherwise says so on stderr and measures glibc's defaults.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

SEED = 0
GEMM_REF = "_gemm_2048"


# --------------------------------------------------------------------------- configuration of record
def config_of_record(num_layers: int = 4, **overrides):
    """vocab 8192, d_model 256, 8 q / 2 kv heads of 32, 8 experts top-2, expert FFN 512 (wf=3), fp32."""
    import grokviz as gv

    kw = dict(name="bench-of-record", vocab_size=8192, d_model=256, num_layers=num_layers, num_q_heads=8,
              num_kv_heads=2, head_dim=32, widening_factor=3, num_experts=8, top_k=2, sequence_len=8192)
    kw.update(overrides)
    cfg = gv.GrokConfig(**kw)
    assert cfg.ffn_size == 512 or "widening_factor" in overrides, cfg.ffn_size
    return cfg


SHAPES = {"b4_t256": (4, 256), "b1_t1024": (1, 1024)}


def tokens(batch: int, seq: int, vocab: int = 8192, seed: int = SEED) -> np.ndarray:
    """int32 ids in [1, vocab): no padding (id 0 is grokviz's pad token)."""
    return np.random.default_rng(seed).integers(1, vocab, size=(batch, seq)).astype(np.int32)


def forward_flops(cfg, batch: int, seq: int, causal: bool = True) -> dict:
    """GEMM FLOPs (2 per MAC) of one forward: q/k/v/o, QK^T + PV (causal lower triangle), router, the top_k
    selected experts per token (gate, up, down), unembedding. Memory-bound ops are not counted."""
    d, H, KV, hd = cfg.d_model, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    E, k, F, V, L = cfg.num_experts, cfg.top_k, cfg.ffn_size, cfg.vocab_size, cfg.num_layers
    n = batch * seq
    pairs = batch * (seq * (seq + 1) // 2 if causal else seq * seq)
    out = {
        "attn_proj": L * n * (2 * d * H * hd + 2 * 2 * d * KV * hd + 2 * H * hd * d),
        "attn_core": L * pairs * H * hd * 2 * 2,
        "router": L * n * 2 * d * E,
        "experts_topk": L * n * k * 3 * 2 * d * F,
        "unembed": n * 2 * d * V,
    }
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- foreign load
_HZ = os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _HZ


def proc_cpu_s(pid: int) -> float:
    """utime + stime (fields 14 and 15 of ``/proc/<pid>/stat``, all threads) of process ``pid``, seconds;
    0.0 when it cannot be read (the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces and ')'
    except (OSError, IndexError):
        return 0.0
    return (int(rest[11]) + int(rest[12])) / _HZ  # rest[0] is field 3 (state)


class ForeignLoad:
    """Fraction of the machine's CPUs used by *other* processes between start() and stop().

    "Ours" is this process's CPU time plus that of ``pids`` (e.g. worker processes that run the timed
    calls); everything else busy on the machine (``/proc/stat``) is foreign.
    """

    def __init__(self, pids: Sequence[int] = ()):
        self.pids = tuple(p for p in pids if p != os.getpid())  # ours already

    def _ours_s(self) -> float:
        t = os.times()
        return t.user + t.system + sum(proc_cpu_s(p) for p in self.pids)

    def start(self):
        self.t0, self.b0, self.o0 = time.perf_counter(), _busy_s(), self._ours_s()
        return self

    def stop(self) -> float:
        ours = self._ours_s() - self.o0
        wall = time.perf_counter() - self.t0
        foreign = (_busy_s() - self.b0) - ours
        return max(0.0, foreign / (wall * (os.cpu_count() or 1)))


_WAIT_BUDGET = [float(os.environ.get("GROKVIZ_BENCH_MAX_WAIT_S", "300"))]


def wait_quiet(max_foreign: float, window_s: float = 1.0, max_wait_s: float = 60.0,
               pids: Sequence[int] = ()) -> float:
    """Sleep until other processes use at most ``max_foreign`` of the CPUs over ``window_s`` (bounded by
    ``max_wait_s`` per call and a per-process budget, GROKVIZ_BENCH_MAX_WAIT_S, default 300 s). ``pids``:
    processes whose CPU time counts as ours (see :class:`ForeignLoad`)."""
    t0 = time.perf_counter()
    while _WAIT_BUDGET[0] > 0:
        fl = ForeignLoad(pids).start()
        time.sleep(window_s)
        if fl.stop() <= max_foreign or time.perf_counter() - t0 >= max_wait_s:
            break
        if time.perf_counter() - t0 >= _WAIT_BUDGET[0]:
            break
    waited = time.perf_counter() - t0
    _WAIT_BUDGET[0] -= waited
    return waited


# --------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """VmHWM: peak RSS since process start or the last :func:`reset_peak_rss`."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn: Callable[[], object], runs: int = 2) -> dict:
    """Peak RSS (MiB) over ``runs`` calls of fn, and its delta over the RSS just before."""
    gc.collect()
    base = rss_mb()
    ok = reset_peak_rss()
    for _ in range(runs):
        fn()
    peak = peak_rss_mb()
    return {"base_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1), "delta_rss_mb": round(peak - base, 1),
            "peak_reset_ok": ok}


def mem_subprocess(script: str, spec: str, extra: list[str] | None = None) -> dict:
    """Run ``script --mem-only SPEC`` in a fresh interpreter; it prints one JSON line last."""
    r = subprocess.run([sys.executable, script, "--mem-only", spec] + (extra or []), capture_output=True, text=True)
    for line in reversed(r.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (r.stderr or r.stdout)[-800:]}


# --------------------------------------------------------------------------- jax helpers
def block(tree):
    import jax

    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def compile_timed(jitted, *args, **kwargs):
    """(compiled, trace+lower seconds, compile seconds, first-call seconds)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    block(compiled(*args, **kwargs))
    t3 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1, t3 - t2


def gemm_ref_fn(lib: str = "jax", n: int = 2048) -> Callable[[], object]:
    """An fp32 n^3 GEMM in the harness's own library, to be timed interleaved with the modes."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    if lib == "jax":
        import jax
        import jax.numpy as jnp

        ja, jb = jnp.asarray(a), jnp.asarray(b)
        mm = jax.jit(jnp.matmul)
        mm(ja, jb).block_until_ready()

        def f():
            mm(ja, jb).block_until_ready()
    elif lib == "torch":
        import torch

        ta, tb, out = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)

        def f():
            torch.mm(ta, tb, out=out)
    else:
        out = np.empty((n, n), np.float32)

        def f():
            np.matmul(a, b, out=out)
    f.flop = 2 * n ** 3
    return f


# --------------------------------------------------------------------------- timing
def bench_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, reps: int = 9,
                      max_foreign: float = 0.2, max_rounds: int | None = None,
                      verbose: bool = False, pause_s: float = 0.0,
                      pids: Sequence[int] = ()) -> tuple[dict[str, list[float]], dict]:
    """Time each callable (ms), all interleaved in a fresh random order each round. Returns (times, meta).

    Rounds with foreign load > ``max_foreign`` are dropped and re-run (up to ``max_rounds``, default 3*reps);
    if the machine never quiets down the least-contended dropped rounds fill the gap (meta says so).
    ``pause_s``: sleep before each call, outside the timed region (lets another library's spinning thread
    pool go idle when two libraries are timed on one machine).
    ``pids``: other processes whose CPU time counts as ours in the foreign-load filter (workers that run
    the calls). A callable with a true ``reports_ms`` attribute times itself (e.g. in a worker process) and
    returns its time in ms, which is used instead of the time around the call; meta then gives the median
    of the difference (``call_overhead_ms_median``: request/reply round trip).
    """
    names = list(fns)
    rng = np.random.default_rng(SEED)
    max_rounds = max_rounds or 3 * reps
    kept, dropped, overhead = [], [], []
    waited = wait_quiet(max_foreign, pids=pids)
    r = 0
    while len(kept) < reps and r < warmup + max_rounds:
        order = [names[i] for i in rng.permutation(len(names))]
        fl = ForeignLoad(pids).start()
        rt = {}
        for n in order:
            gc.collect()
            if pause_s:
                time.sleep(pause_s)
            self_timed = getattr(fns[n], "reports_ms", False)
            t0 = time.perf_counter()
            if self_timed:
                rt[n] = float(fns[n]())
                overhead.append((time.perf_counter() - t0) * 1e3 - rt[n])
            else:
                fns[n]()  # the result is freed inside the timed region, before the next call
                rt[n] = (time.perf_counter() - t0) * 1e3
        foreign = fl.stop()
        if verbose:
            print(f"  round {r} foreign={foreign:.2f} " + " ".join(f"{n}={v:.1f}" for n, v in rt.items()),
                  file=sys.stderr, flush=True)
        if r >= warmup:
            (kept if foreign <= max_foreign else dropped).append((foreign, rt))
        if foreign > max_foreign:
            waited += wait_quiet(max_foreign, pids=pids)
        r += 1
    filled = 0
    if len(kept) < reps:
        dropped.sort(key=lambda x: x[0])
        filled = reps - len(kept)
        kept += dropped[:filled]
        dropped = dropped[filled:]
    times = {n: [rt[n] for _, rt in kept] for n in names}
    meta = {"rounds_kept": len(kept), "rounds_dropped": len(dropped), "rounds_filled_contended": filled,
            "foreign_load_kept_mean": round(float(np.mean([f for f, _ in kept])), 3) if kept else None,
            "foreign_load_kept_max": round(float(np.max([f for f, _ in kept])), 3) if kept else None,
            "waited_s": round(waited, 1), "max_foreign": max_foreign}
    if overhead:
        meta["call_overhead_ms_median"] = round(float(np.median(overhead)), 3)
    return times, meta


def summarize(ts: list[float]) -> dict:
    q = np.percentile(ts, [25, 50, 75])
    return {"median_ms": round(float(q[1]), 2), "p25_ms": round(float(q[0]), 2), "p75_ms": round(float(q[2]), 2),
            "min_ms": round(min(ts), 2), "n": len(ts)}


def gemm_gflops(times_ms: list[float], flop: float) -> float:
    return flop / (statistics.median(times_ms) / 1e3) / 1e9


# --------------------------------------------------------------------------- reporting
def env_info() -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "loadavg_start": list(os.getloadavg()),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("jax", "jaxlib", "torch", "transformers"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


def markdown_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """rows -> markdown; cols = [(key, header)]. None -> '–'."""
    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(out)


def note_process_settings() -> bool:
    """Whether this process was started with grokviz's malloc tunables (scripts/env.sh); prints a note to
    stderr when not, since the numbers then are those of glibc's defaults."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    missing = [n for n in ("mmap_max", "trim_threshold", "top_pad", "hugetlb") if f"glibc.malloc.{n}=" not in tunables]
    if missing:
        print(f"# note: started without scripts/env.sh (GLIBC_TUNABLES={tunables!r}, no {', '.join(missing)}): "
              "this measures glibc's default malloc, not the notebook kernels' settings. Run "
              "`bash scripts/env.sh .venv/bin/python bench/SCRIPT.py` for those.", file=sys.stderr)
    return not missing


def base_argparser(desc: str) -> argparse.ArgumentParser:
    """The options every bench script takes (and the process-settings note: see :func:`note_process_settings`)."""
    note_process_settings()
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--max-foreign", type=float, default=0.2,
                   help="drop rounds where other processes used more than this fraction of the CPUs")
    p.add_argument("--json", default="", help="also write the rows (and meta) to this JSON file")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--mem-only", default="", help=argparse.SUPPRESS)
    return p


def write_json(path: str, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"# wrote {path}")


# --------------------------------------------------------------------------- CPU line
def cpu_info() -> dict:
    """Model name, vector extensions (from /proc/cpuinfo flags) and L2 cache per core (sysfs) of this machine."""
    info = {"cpu": "?", "avx2": False, "avx512": False, "avx512_bf16": False, "amx": False, "l2_per_core": "?",
            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and info["cpu"] == "?":
                    info["cpu"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    info.update(avx2="avx2" in flags, avx512="avx512f" in flags,
                                avx512_bf16="avx512_bf16" in flags, amx="amx_tile" in flags)
                    break
    except OSError:
        pass
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            d = os.path.join(base, idx)
            with open(os.path.join(d, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(d, "size")) as f:
                    size = f.read().strip()
                with open(os.path.join(d, "shared_cpu_list")) as f:
                    shared = f.read().strip()
                n = sum(int(b) - int(a) + 1 for a, _, b in (r.partition("-") if "-" in r else (r, "", r)
                                                              for r in shared.split(",")))
                info["l2_per_core"] = size if n <= 1 else f"{size} shared by {n} CPUs"
    except (OSError, ValueError):
        pass
    return info


def cpu_line(gemm_gflops_measured: float | None = None, lib: str = "jax") -> str:
    """One line for a table's caption: CPU model, AVX2 / AVX-512 (and bf16, AMX), L2 per core, the GEMM rate
    measured in this run."""
    c = cpu_info()
    ext = "AVX-512" + (" (bf16)" if c["avx512_bf16"] else "") if c["avx512"] else ("AVX2" if c["avx2"] else
                                                                                   "no AVX2")
    if c["amx"]:
        ext += ", AMX"
    gemm = (f"; {lib} 2048^3 fp32 GEMM {gemm_gflops_measured:.0f} GFLOP/s in this run"
            if gemm_gflops_measured else "")
    return f"CPU: {c['cpu']}, {c['cpus']} CPUs, {ext}, L2 {c['l2_per_core']} per core{gemm}"

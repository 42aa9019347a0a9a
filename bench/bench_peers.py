#!/usr/bin/env python3
"""grokviz vs Hugging Face ``MixtralForCausalLM`` on the same shapes: one worker process per framework, interleaved.

Needs torch + transformers (the ``bench`` extra); skips with a message when they are not importable. Keep
them out of the project venv:

    python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch==2.13.0 transformers -e .
    /work/bench-venv/bin/python bench/bench_peers.py [--shapes b4_t256,b1_t1024] [--reps 9] [--same-process]

Both models: vocab 8192, d_model 256, 4 layers, 8 q / 2 kv heads of 32, 8 experts top-2, expert FFN 512,
fp32, CPU, each with its own random init (seed 0). The GEMM work is identical; Grok adds memory-bound
pieces (4 norms per layer, the attention soft cap, GELU gating), Mixtral has 2 norms per layer and SiLU.
Routing differs (different weights), so per-expert loads differ; both run only the 2 selected experts.

Modes, timed round-robin in a random order each round (+ a jax 2048^3 GEMM for the floor):
  grokviz:plain, grokviz:routing, grokviz:routing_attn   (jitted, compile apart)
  hf:sdpa_plain                                           model(ids) with attn_implementation="sdpa"
  hf:eager_router_attn                                    output_router_logits + output_attentions (eager)

Method. Each framework runs in its own worker process (``multiprocessing`` "spawn", one Pipe each), as a
user runs one tool: the grokviz worker (never imports torch) compiles the three grokviz modes and the jax
GEMM; the HF worker (never imports jax) builds the two HF models. A coordinator process (imports neither)
drives both through ``_harness.bench_interleaved``: same rounds, same random round-robin order, same
foreign-load filter as the other scripts, with both workers' CPU time (``/proc/<pid>/stat``) counted as
ours. Each timed call is a request "run mode X once" to the worker that owns X; the worker runs
``gc.collect()`` (cheap: whatever setup left alive is ``gc.freeze()``-d), times the call itself
(``perf_counter`` around it, result freed inside, as in the single-process harness) and replies with
that **worker-side time**, which is what the table shows. The coordinator waits for each reply before the
next request, so only one framework computes at a time; the request/reply round trip is reported apart
(``call_overhead_ms_median`` in the per-shape meta line, about 0.5 ms).

Why: two frameworks in one process share one allocator and two thread pools (XLA's Eigen pool and torch's
OpenMP); measured before this change, that slowed grokviz by ~25% with a wide p25-p75 spread (4x256 plain
49 ms alone, 61 ms next to torch), an artefact no user sees. ``--same-process`` keeps the old method for
comparison (default pause 0.05 s there).

Malloc: started through ``scripts/env.sh`` (``bash scripts/env.sh .venv/bin/python bench/bench_peers.py``),
the coordinator has grokviz's glibc malloc tunables (``grokviz.runtime``: no mmap for big blocks, a 2 GiB trim
threshold, a 256 MiB top pad, transparent huge pages) and both workers inherit them, so both frameworks run
with the same allocator settings; the header prints the GLIBC_TUNABLES each worker started with.

``--pause`` (sleep before each timed call, outside the timed region; default 0.02 s): the workers still
share the machine's cores, and torch's OpenMP threads keep spinning for ~5-10 ms after an HF call (XLA's
workers go idle at once), which slowed a grokviz call right behind it by a few ms. Longer pauses are not
better: after 0.1 s of idle the next call was slower again (cold, idle vCPUs).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

GROKVIZ_MODES = ("plain", "routing", "routing_attn")
PAUSE_SAME_PROCESS = 0.05  # the old single-process default
PAUSE_WORKERS = 0.02  # torch's OpenMP threads spin ~5-10 ms after a call (measured via /proc/<pid>/stat)


def hf_model(attn: str, seed: int = H.SEED):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.02,
                        tie_word_embeddings=False, sliding_window=None, attn_implementation=attn)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


# --------------------------------------------------------------------------- workers (child processes)
class _WorkerBase:
    fns: dict

    @staticmethod
    def _freeze():
        """After a setup: move every live object out of the collector's reach, so that the gc.collect()
        before each call scans only what the calls create (~0.01 ms instead of ~100 ms with torch +
        transformers loaded; it runs outside the timed region either way)."""
        gc.collect()
        gc.freeze()

    def run(self, name: str) -> float:
        """Run mode ``name`` once; the worker-side time in ms."""
        fn = self.fns[name]
        gc.collect()
        t0 = time.perf_counter()
        fn()  # the result is freed inside the timed region, as in _harness.bench_interleaved
        return (time.perf_counter() - t0) * 1e3

    def frameworks(self, _=None) -> list[str]:
        """Which of jax / torch / transformers this process has imported."""
        return [m for m in ("jax", "torch", "transformers") if m in sys.modules]


class GrokvizWorker(_WorkerBase):
    """grokviz (jax) modes and the jax GEMM reference; never imports torch."""

    def __init__(self):
        import jax

        import grokviz  # noqa: F401  (imported before it is timed)

        self.jax, self.fns, self.ref = jax, {}, None
        self.malloc = os.environ.get("GLIBC_TUNABLES", "")  # inherited from the coordinator

    def info(self) -> dict:
        return {"pid": os.getpid(), "jax": self.jax.__version__, "backend": self.jax.default_backend(),
                "malloc": self.malloc, "torch_imported": "torch" in sys.modules}

    def setup(self, shape: str) -> dict:
        """Compile the modes for ``shape``; returns {mode: compile info} and the forward FLOPs."""
        from bench_forward import make_fn, setup

        self.fns = {}
        gc.unfreeze()
        gc.collect()
        cfg, params, toks = setup(shape)
        info = {}
        for m in GROKVIZ_MODES:
            self.fns[f"grokviz:{m}"], info[f"grokviz:{m}"] = make_fn(cfg, params, toks, m)
        if self.ref is None:
            self.ref = H.gemm_ref_fn("jax")
        self.fns[H.GEMM_REF] = self.ref
        b, t = H.SHAPES[shape]
        self._freeze()
        return {"info": info, "flops_total": H.forward_flops(cfg, b, t)["total"], "gemm_flop": self.ref.flop,
                "names": list(self.fns)}


class HFWorker(_WorkerBase):
    """The two HF Mixtral modes; never imports jax. Malloc: the tunables inherited from the coordinator."""

    def __init__(self):
        self.malloc = os.environ.get("GLIBC_TUNABLES", "")
        import torch
        import transformers

        self.torch, self.transformers = torch, transformers
        self.models = {"sdpa": hf_model("sdpa"), "eager": hf_model("eager")}
        self.fns = {}

    def info(self) -> dict:
        torch = self.torch
        return {"pid": os.getpid(), "torch": torch.__version__, "transformers": self.transformers.__version__,
                "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "experts_implementation": getattr(self.models["sdpa"].config, "_experts_implementation", None),
                "malloc": self.malloc, "jax_imported": "jax" in sys.modules}

    def setup(self, shape: str) -> dict:
        torch = self.torch
        self.fns = {}
        gc.unfreeze()
        b, t = H.SHAPES[shape]
        ids = torch.from_numpy(H.tokens(b, t).astype("int64"))

        def hf_run(model, **kw):
            def f():
                with torch.inference_mode():
                    return model(ids, use_cache=False, **kw)
            return f

        self.fns = {"hf:sdpa_plain": hf_run(self.models["sdpa"]),
                    "hf:eager_router_attn": hf_run(self.models["eager"], output_router_logits=True,
                                                   output_attentions=True)}
        self._freeze()
        return {"info": {}, "names": list(self.fns)}


WORKERS = {"grokviz": GrokvizWorker, "hf": HFWorker}


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this worker when the coordinator dies (even by SIGKILL): no orphans."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the coordinator shuts us down
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the coordinator died before prctl
        os._exit(1)


def _serve(kind: str, conn, parent_pid: int) -> None:
    """Worker main loop: requests (op, arg) -> replies ("ok", value) | ("err", traceback) | ("skip", why)."""
    _die_with_parent(parent_pid)
    try:
        try:
            worker = WORKERS[kind]()
        except ImportError as e:
            if kind != "hf":
                raise
            conn.send(("skip", str(e)))  # torch / transformers missing
            return
        conn.send(("ok", worker.info()))
        while True:
            try:
                op, arg = conn.recv()
            except EOFError:  # the coordinator went away
                return
            if op == "stop":
                return
            try:
                conn.send(("ok", getattr(worker, op)(arg)))
            except Exception:
                conn.send(("err", traceback.format_exc()))
    except Exception:
        try:
            conn.send(("err", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


class WorkerSkip(Exception):
    pass


class Worker:
    """Coordinator-side handle of one worker process."""

    def __init__(self, kind: str, ctx):
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(kind, child, os.getpid()), name=f"bench_peers-{kind}",
                                daemon=True)
        self.proc.start()
        child.close()  # ours is closed: the worker's death reads as EOF here
        self.pid = self.proc.pid
        self.info = None

    def reply(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc.join(1)
            raise RuntimeError(f"{self.kind} worker died (exit code {self.proc.exitcode})") from None
        if status == "skip":
            raise WorkerSkip(value)
        if status == "err":
            raise RuntimeError(f"{self.kind} worker failed:\n{value}")
        return value

    def call(self, op: str, arg=None):
        self.conn.send((op, arg))
        return self.reply()

    def runner(self, name: str):
        """A callable for bench_interleaved: run ``name`` once in the worker, return the worker-side ms."""
        send, reply = self.conn.send, self.reply

        def f():
            send(("run", name))
            return reply()
        f.reports_ms = True
        return f

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(("stop", None))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)  # a worker busy compiling finishes that first
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


# --------------------------------------------------------------------------- coordinator
COLS = [("shape", "shape"), ("mode", "mode"), ("median_ms", "median ms"), ("p25_ms", "p25"), ("p75_ms", "p75"),
        ("x_hf_sdpa", "× HF sdpa plain"), ("x_floor", "× floor"), ("compile_s", "compile s")]


def rows_of(shape, times, info, flops_total, gemm_flop) -> tuple[list[dict], float, float]:
    rate = H.gemm_gflops(times[H.GEMM_REF], gemm_flop)
    floor_ms = flops_total / (rate * 1e9) * 1e3
    hf_med = H.summarize(times["hf:sdpa_plain"])["median_ms"]
    rows = []
    for n in times:
        if n == H.GEMM_REF:
            continue
        s = H.summarize(times[n])
        rows.append({"shape": shape, "mode": n, **s, **info.get(n, {}),
                     "x_hf_sdpa": round(s["median_ms"] / hf_med, 2), "x_floor": round(s["median_ms"] / floor_ms, 2)})
    return rows, rate, floor_ms


def start_workers(kinds, script: str) -> dict | None:
    """Start one spawned worker per kind (in parallel: each imports its framework, the HF ones build models) and
    wait for their info; None (with a line saying why) when torch/transformers are not importable. A failure
    closes the workers already started."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers = {}
    try:
        for kind in kinds:
            workers[kind] = Worker(kind, ctx)
        for w in workers.values():
            w.info = w.reply()
    except WorkerSkip as e:
        print(f"# {script} skipped: torch/transformers not importable ({e}); see the module docstring")
        for w in workers.values():
            w.close()
        return None
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers


def run_workers(args) -> None:
    workers = start_workers(("hf", "grokviz"), "bench_peers")
    if workers is None:
        return
    gz, hf = workers["grokviz"], workers["hf"]
    try:
        winfo = {k: w.info for k, w in workers.items()}
        print(f"# grokviz bench_peers  {H.env_info()}  method: one worker process per framework, pause "
              f"{args.pause} s")
        print(f"# grokviz worker {gz.info}")
        print(f"# HF worker      {hf.info}")
        print(f"# HF experts implementation: {hf.info['experts_implementation']}")
        all_rows, metas = [], {}
        for shape in args.shapes.split(","):
            g = gz.call("setup", shape)  # one at a time: compile time is not shared with the other worker
            h = hf.call("setup", shape)
            fns = {n: w.runner(n) for w, r in ((gz, g), (hf, h)) for n in r["names"] if n != H.GEMM_REF}
            fns[H.GEMM_REF] = gz.runner(H.GEMM_REF)  # last, as in the single-process dict
            times, meta = H.bench_interleaved(fns, args.warmup, args.reps, args.max_foreign, verbose=args.verbose,
                                              pause_s=args.pause, pids=[gz.pid, hf.pid])
            rows, rate, floor_ms = rows_of(shape, times, g["info"], g["flops_total"], g["gemm_flop"])
            all_rows += rows
            meta.update(gemm_gflops=round(rate, 1), floor_ms=round(floor_ms, 2))
            metas[shape] = meta
            print(f"# {shape}: {meta}", flush=True)
        print(H.markdown_table(all_rows, COLS))
        winfo["grokviz"]["imported_at_end"] = gz.call("frameworks")
        winfo["hf"]["imported_at_end"] = hf.call("frameworks")
        print(f"# frameworks imported at the end: grokviz worker {winfo['grokviz']['imported_at_end']}, HF worker "
              f"{winfo['hf']['imported_at_end']}")
        print(f"# torch {hf.info['torch']} ({hf.info['cpu_capability']}, {hf.info['torch_threads']} threads), "
              f"transformers {hf.info['transformers']}, jax {gz.info['jax']}; each in its own worker; loadavg end "
              f"{os.getloadavg()}")
        H.write_json(args.json, {"meta": metas, "rows": all_rows, "env": H.env_info(),
                                 "method": "workers", "pause_s": args.pause, "workers": winfo})
    finally:
        for w in workers.values():
            w.close()


def run_same_process(args) -> None:
    """The old method: both frameworks in this process (shared allocator, two thread pools)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"# bench_peers skipped: torch/transformers not importable ({e}); see the module docstring")
        return
    import jax
    from bench_forward import make_fn, setup

    print(f"# grokviz bench_peers  {H.env_info() | {'torch_threads': torch.get_num_threads()}}  method: same "
          f"process, pause {args.pause} s")
    hf = {"sdpa": hf_model("sdpa"), "eager": hf_model("eager")}
    print(f"# HF experts implementation: {hf['sdpa'].config._experts_implementation}")
    all_rows, metas = [], {}
    for shape in args.shapes.split(","):
        cfg, params, toks = setup(shape)
        b, t = H.SHAPES[shape]
        ids = torch.from_numpy(H.tokens(b, t).astype("int64"))
        fns, info = {}, {}
        for m in GROKVIZ_MODES:
            fns[f"grokviz:{m}"], info[f"grokviz:{m}"] = make_fn(cfg, params, toks, m)

        def hf_run(model, ids, **kw):
            def f():
                with torch.inference_mode():
                    return model(ids, use_cache=False, **kw)
            return f

        fns["hf:sdpa_plain"] = hf_run(hf["sdpa"], ids)
        fns["hf:eager_router_attn"] = hf_run(hf["eager"], ids, output_router_logits=True, output_attentions=True)
        ref = H.gemm_ref_fn("jax")
        fns[H.GEMM_REF] = ref
        times, meta = H.bench_interleaved(fns, args.warmup, args.reps, args.max_foreign, verbose=args.verbose,
                                          pause_s=args.pause)
        rows, rate, floor_ms = rows_of(shape, times, info, H.forward_flops(cfg, b, t)["total"], ref.flop)
        all_rows += rows
        meta.update(gemm_gflops=round(rate, 1), floor_ms=round(floor_ms, 2))
        metas[shape] = meta
        print(f"# {shape}: {meta}", flush=True)
    print(H.markdown_table(all_rows, COLS))
    print(f"# torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, jax {jax.__version__}; malloc (process-wide) "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; loadavg end {os.getloadavg()}")
    H.write_json(args.json, {"meta": metas, "rows": all_rows, "env": H.env_info(), "method": "same-process",
                             "pause_s": args.pause})


def main():
    p = H.base_argparser(__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(H.SHAPES))
    p.add_argument("--pause", type=float, default=None,
                   help=f"seconds of sleep before each timed call (default {PAUSE_WORKERS}, "
                        f"{PAUSE_SAME_PROCESS} with --same-process)")
    p.add_argument("--same-process", action="store_true",
                   help="old method: both frameworks in this process (for comparison)")
    args = p.parse_args()
    if args.pause is None:
        args.pause = PAUSE_SAME_PROCESS if args.same_process else PAUSE_WORKERS
    if args.same_process:
        return run_same_process(args)
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"# bench_peers skipped: torch/transformers not importable (No module named {missing[0]!r}); see "
              f"the module docstring")
        return
    run_workers(args)


if __name__ == "__main__":
    main()

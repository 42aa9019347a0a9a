"""The study loop: data-parallel over the processes of a ``jax.distributed`` job (or one process), with exact
reductions and resumable progress.

**Work.** The dataset is cut into global batches exactly as :func:`grokviz.analysis.dataset.batches` cuts it
(fixed ``batch_size`` rows, bucketed lengths); global batch ``b`` is the unit of work. Round ``r`` is batches
``[r * R, (r + 1) * R)`` (``R = batches_per_round``); in a round, process ``p`` of ``P`` runs the batches whose
offset in the round is ``p mod P``. Each batch's statistics are computed by the analysis code itself
(:func:`grokviz.analysis.dataset.routing_stats`'s update on a zeroed :class:`RoutingStats`, and
:func:`grokviz.analysis.attention.attention_sums`).

**Reduction.** After each round every process gathers every process's contributions (``allgather_exact``: bits, not
values): integer counts (int64) are summed, which is exact in any order; float sums are added one batch at a time
in global batch order, then the round's sum is added to the total. The order depends only on the batch indices,
so results are bit-identical for any number of processes, and equal to an uninterrupted run after any resume.

**Progress.** Process 0 writes ``progress`` atomically after every round (finished rounds + reduced totals +
the study's fingerprint); a restarted job (any process count) continues with the first unfinished round. The
results are written atomically by process 0 at the end; then the progress file is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time

import numpy as np

from .. import distributed as dist
from ..analysis import attention as A
from ..analysis import dataset as D
from ..analysis import patching as PT
from ..analysis import specialisation as S
from . import store
from .results import ablation_labels
from .spec import Spec, load_spec, model_fingerprint

ROUTING_CAPTURE = ["blocks.moe.top_k_experts", "blocks.moe.router_probs", "blocks.moe.router_logits",
                   "blocks.moe.top_k_weights"]
ATTENTION_CAPTURE = ["blocks.attn.pattern", "blocks.attn.logits"]
ATT_FLOAT = ("entropy", "first_token", "prev_token", "cap_binding")


@dataclasses.dataclass
class Plan:
    """Everything every process derives identically from the spec and the model."""

    spec: Spec
    model: object
    batches: list           # [(tokens [B, T] int32, domains)]
    domains: list           # sorted domain names in the data
    fingerprint: str
    template: D.RoutingStats | None
    classes: np.ndarray | None
    reads: list | None = None  # mesh: [(bytes read, checkpoint bytes)] of every process

    @property
    def n_rounds(self) -> int:
        return math.ceil(len(self.batches) / self.spec.batches_per_round)


def _layout(plan: Plan):
    """(int fields, float fields): [(name, shape)] in a fixed order."""
    ints, floats = [], []
    cfg = plan.model.cfg
    t = plan.template
    if t is not None:
        ints += [("n_tokens", (1,)), ("load", t.load.shape), ("coactivation", t.coactivation.shape),
                 ("consecutive", t.consecutive.shape), ("flow", t.flow.shape),
                 ("domain_counts", (len(plan.domains), *t.load.shape))]
        if t.class_counts is not None:
            ints.append(("class_counts", t.class_counts.shape))
        if t.token_counts is not None:
            ints.append(("token_counts", t.token_counts.shape))
        floats += [(k, v.shape) for k, v in sorted(t.sums.items())]
    if "attention" in plan.spec.collect:
        lh = (cfg.num_layers, cfg.num_q_heads)
        ints += [(f"att_n_{k}", (1,)) for k in ATT_FLOAT]
        floats += [(f"att_{k}", lh) for k in ATT_FLOAT]
    if "ablation" in plan.spec.collect:
        n = len(ablation_labels(plan)[0])
        floats += [("abl_nll", (n,)), ("abl_kl", (n,)), ("abl_base_nll", (1,)), ("abl_n_pred", (1,))]
    return ints, floats


def _pack(parts: dict, layout, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(parts[n], dtype).reshape(-1) for n, _ in layout]) if layout else \
        np.zeros(0, dtype)


def _unpack(vec: np.ndarray, layout) -> dict:
    out, i = {}, 0
    for n, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[n] = vec[i:i + size].reshape(shape)
        i += size
    return out


def _zero_stats(t: D.RoutingStats) -> D.RoutingStats:
    return dataclasses.replace(
        t, load=np.zeros_like(t.load), coactivation=np.zeros_like(t.coactivation),
        consecutive=np.zeros_like(t.consecutive), flow=np.zeros_like(t.flow),
        sums={k: np.zeros_like(v) for k, v in t.sums.items()}, n_tokens=0,
        class_counts=None if t.class_counts is None else np.zeros_like(t.class_counts),
        token_counts=None if t.token_counts is None else np.zeros_like(t.token_counts), domain_counts={})


def batch_parts(plan: Plan, b: int) -> tuple[dict, dict]:
    """(int parts, float parts) of global batch ``b``, computed by the analysis code on one forward pass."""
    toks, domains = plan.batches[b]
    capture = (ROUTING_CAPTURE if plan.template is not None else []) + \
        (ATTENTION_CAPTURE if "attention" in plan.spec.collect else [])
    ints, floats = {}, {}
    if capture:
        run = plan.model.run(toks, capture=capture, expert_impl=plan.spec.expert_impl)
        real = _host(run.real)
    if plan.template is not None:
        st = _zero_stats(plan.template)
        D._update_routing(st, {n: _host(run.cache[n]) for n in ROUTING_CAPTURE}, toks, real, domains,
                          plan.classes)
        ints.update(n_tokens=[st.n_tokens], load=st.load, coactivation=st.coactivation,
                    consecutive=st.consecutive, flow=st.flow, class_counts=st.class_counts,
                    token_counts=st.token_counts,
                    domain_counts=np.stack([st.domain_counts.get(d, np.zeros_like(st.load)) for d in plan.domains])
                    if plan.domains else np.zeros((0, *st.load.shape), np.int64))
        floats.update(st.sums)
    if "attention" in plan.spec.collect:
        s = A.attention_sums(_host(run.cache["blocks.attn.pattern"]), real,
                             _host(run.cache["blocks.attn.logits"]), cap=plan.model.cfg.attn_softcap)
        lh = (plan.model.cfg.num_layers, plan.model.cfg.num_q_heads)
        for k in ATT_FLOAT:
            floats[f"att_{k}"] = s.get(k, np.zeros(lh))
            ints[f"att_n_{k}"] = [int(s.get(f"n_{k}", 0))]
    if "ablation" in plan.spec.collect:
        a = dict(plan.spec.ablation)
        s = PT.ablation_sums(plan.model, toks, kind=a["kind"], mode=a["mode"], expert_impl=plan.spec.expert_impl,
                             layers=None if a["layers"] is None else list(a["layers"]))
        lay, unit = ablation_labels(plan)
        if not (np.array_equal(s["layer"], lay) and np.array_equal(s["unit"], unit)):
            raise RuntimeError("ablation_sums returned units in another order than the study's layout")
        floats.update(abl_nll=s["nll"], abl_kl=s["kl"], abl_base_nll=[s["base_nll"]], abl_n_pred=[s["n_pred"]])
    return ints, floats


def _host(x) -> np.ndarray:
    """A (possibly multi-process) array as numpy, whole, on this process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def load_model(spec: Spec):
    """The spec's model: whole in this process, or (``mesh``) placed on the global mesh reading only this process's
    shards (:func:`grokviz.distributed.sharded.load`); returns (model, ReadStats or None)."""
    import jax

    dist.set_phase(f"loading model {spec.model}")
    if spec.mesh is None:
        from ..loading import load

        return load(spec.model_path(), progress=False), None
    from ..distributed import sharded

    n = spec.mesh[0] * spec.mesh[1]
    if n != jax.device_count():
        raise ValueError(f"study spec: mesh {list(spec.mesh)} has {n} devices but the job has {jax.device_count()} "
                         f"({jax.process_count()} process(es) x {jax.local_device_count()}); data x model must use "
                         f"every device")
    return sharded.load(spec.model_path(), dist.global_mesh(spec.mesh))


def prepare(spec, model=None) -> Plan:
    spec = load_spec(spec)
    reads = None
    if model is None:
        model, stats = load_model(spec)
        if stats is not None:
            mine = np.array([stats.bytes_read + stats.header_bytes, stats.file_bytes or stats.tensor_bytes], np.int64)
            reads = [tuple(int(v) for v in row) for row in dist.allgather_exact(mine)]
    dist.set_phase("reading and batching the dataset")
    batches = list(D.batches(model, spec.documents(), batch_size=spec.batch_size, max_len=spec.max_len,
                             progress=False, with_domains=True))
    if not batches:
        raise ValueError("study: the dataset gives no batches (no document has >= 2 tokens)")
    h = hashlib.sha256()
    for toks, doms in batches:
        h.update(np.ascontiguousarray(toks).tobytes())
        h.update(json.dumps(doms).encode())
    domains = sorted({d for _, doms in batches for d in doms if d is not None})
    template = classes = None
    if "routing" in spec.collect:
        template = D.routing_stats(model, [], token_stats="top_tokens" in spec.collect, progress=False)
        classes = S.vocab_classes(template.pieces) if template.pieces is not None else None
    fp = hashlib.sha256(json.dumps({"model": model_fingerprint(spec, model.cfg), "data": h.hexdigest(),
                                    "spec": spec.key()}, sort_keys=True).encode()).hexdigest()
    return Plan(spec, model, batches, domains, fp, template, classes, reads)


def _meta(plan: Plan, fmt: str, **extra) -> dict:
    return {"format": fmt, "version": store.VERSION, "fingerprint": plan.fingerprint, "model": plan.spec.model,
            "config": plan.model.cfg.name, "n_batches": len(plan.batches), "spec": plan.spec.key(),
            "domains": plan.domains, **extra}


def _resume(plan: Plan, n_int: int, n_float: int):
    """(rounds done, int totals, float totals) from process 0's progress file, agreed by every process."""
    spec, msg, state = plan.spec, None, (0, np.zeros(n_int, np.int64), np.zeros(n_float, np.float64))
    import jax

    if jax.process_index() == 0 and spec.progress.exists():
        try:
            meta, arr = store.read(spec.progress, store.PROGRESS_FORMAT, plan.fingerprint, what="progress file")
            if arr["ints"].shape != (n_int,) or arr["floats"].shape != (n_float,):
                raise ValueError(f"progress file {spec.progress} does not match this study's statistics; delete it")
            state = (int(meta["rounds_done"]), arr["ints"].astype(np.int64), arr["floats"].astype(np.float64))
        except ValueError as e:
            msg = str(e)
    got = dist.broadcast_json({"error": msg, "rounds_done": state[0]})
    if got["error"]:
        raise ValueError(got["error"] if msg else f"process 0 refused the progress file: {got['error']}")
    return got["rounds_done"], state[1], state[2]


def run(spec, *, model=None, progress: bool = True, log=None):
    """Run a study (a spec path, dict or :class:`Spec`) in this process, or in every process of a job started
    with :func:`grokviz.distributed.initialize`; returns the :class:`~grokviz.study.StudyResult` (on every
    process; only process 0 writes it). ``log``: a function for one line per finished round (process 0)."""
    import jax

    from . import results as res

    plan = prepare(spec, model)
    spec = plan.spec
    P, p = jax.process_count(), jax.process_index()
    ints_l, floats_l = _layout(plan)
    n_int = sum(int(np.prod(s, dtype=np.int64)) for _, s in ints_l)
    n_float = sum(int(np.prod(s, dtype=np.int64)) for _, s in floats_l)
    done, tot_i, tot_f = _resume(plan, n_int, n_float)
    R, nb = spec.batches_per_round, len(plan.batches)
    # data-parallel: process p runs every P-th batch of a round; on a mesh every process runs every batch (the
    # model spans them) and process 0's statistics are the batch's
    W, w = (1, 0) if spec.mesh else (P, p)
    slots = math.ceil(R / W)
    bar = None
    if progress and p == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=nb, initial=min(done * R, nb), desc=f"study ({P} process{'es' if P > 1 else ''})",
                   unit="batch")
    if log is not None and plan.reads:
        log(f"study: model on mesh {list(spec.mesh)}, bytes read per process: " + ", ".join(
            f"{q}: {n:,} of {tot:,} ({100 * n / max(tot, 1):.1f} %)" for q, (n, tot) in enumerate(plan.reads)))
    t0 = time.perf_counter()
    for r in range(done, plan.n_rounds):
        store.fault("start", r)
        idx = list(range(r * R, min((r + 1) * R, nb)))
        mine = idx[w::W]
        li, lf, lid = np.zeros(n_int, np.int64), np.zeros((slots, n_float), np.float64), np.full(slots, -1)
        for j, b in enumerate(mine):
            dist.set_phase(f"study round {r + 1}/{plan.n_rounds}: batch {b} (of {nb})")
            pi, pf = batch_parts(plan, b)
            if W == P or p == 0:
                li += _pack(pi, ints_l, np.int64)
                lf[j], lid[j] = _pack(pf, floats_l, np.float64), b
        dist.set_phase(f"study round {r + 1}/{plan.n_rounds}: reducing over {P} process(es)")
        try:
            tot_i = tot_i + dist.sum_exact(li)
            gf, gid = dist.allgather_exact(lf), dist.allgather_exact(lid.astype(np.int64))
        except Exception as e:  # noqa: BLE001 - XLA's runtime errors have no narrower public type
            if P == 1:
                raise
            raise RuntimeError(f"study round {r + 1}/{plan.n_rounds}: process {p} could not reduce with the other "
                               f"{P - 1} process(es): one of them died or left the job ({type(e).__name__}: "
                               f"{str(e)[:300]}). Rerun the same command to resume from {spec.progress}") from None
        where = {int(gid[q, j]): (q, j) for q in range(P) for j in range(slots) if gid[q, j] >= 0}
        if sorted(where) != idx:
            raise RuntimeError(f"study round {r}: gathered batches {sorted(where)} != expected {idx}")
        round_f = np.zeros(n_float, np.float64)
        for b in idx:  # fixed order: global batch index
            round_f = round_f + gf[where[b]]
        tot_f = tot_f + round_f
        if p == 0:
            dist.set_phase(f"study round {r + 1}/{plan.n_rounds}: writing progress")
            store.write(spec.progress, _meta(plan, store.PROGRESS_FORMAT, rounds_done=r + 1,
                                             finished_batches=idx[-1] + 1),
                        {"ints": tot_i, "floats": tot_f}, fault_round=r)
            if bar is not None:
                bar.update(len(idx))
            if log is not None:
                log(f"study: round {r + 1}/{plan.n_rounds} done ({idx[-1] + 1}/{nb} batches, "
                    f"{time.perf_counter() - t0:.1f} s)")
    if bar is not None:
        bar.close()
    result = res.from_totals(plan, _unpack(tot_i, ints_l), _unpack(tot_f, floats_l))
    if p == 0:
        dist.set_phase("writing results")
        res.save(result, spec.output, _meta(plan, store.RESULTS_FORMAT))
        spec.progress.unlink(missing_ok=True)
    dist.barrier("grokviz-study-done")
    dist.set_phase("study finished")
    return result

"""A study's results: :class:`StudyResult` holds the analysis objects themselves
(:class:`grokviz.analysis.dataset.RoutingStats`, :class:`~grokviz.analysis.dataset.AttentionStats`), so
``result.routing.summary()``, ``.top_tokens()``, ``.specialisation()`` and the widgets that take a RoutingStats
work unchanged; :func:`load` reads the one ``.npz`` file a study writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..analysis import dataset as D
from . import store


@dataclasses.dataclass
class StudyResult:
    routing: D.RoutingStats | None
    attention: D.AttentionStats | None
    meta: dict
    ablation_sums: dict | None = None   # ablation_sums's keys, summed over the dataset

    @property
    def ablation(self):
        """The ablation sweep's table (:func:`grokviz.analysis.patching.sums_to_frame`), or None."""
        if self.ablation_sums is None:
            return None
        from ..analysis import patching as PT

        return PT.sums_to_frame(self.ablation_sums, self.ablation_sums["kind"])

    def arrays(self) -> dict:
        """Every statistic as named numpy arrays (what the results file stores besides ``meta``)."""
        out = {}
        st = self.routing
        if st is not None:
            out.update(load=st.load, coactivation=st.coactivation, consecutive=st.consecutive, flow=st.flow,
                       n_tokens=np.array([st.n_tokens], np.int64), num_experts=np.array([st.num_experts]),
                       top_k=np.array([st.top_k]),
                       domain_names=np.array(sorted(st.domain_counts), dtype=str),
                       domain_counts=np.stack([st.domain_counts[d] for d in sorted(st.domain_counts)])
                       if st.domain_counts else np.zeros((0, *st.load.shape), np.int64))
            out.update({f"sums_{k}": v for k, v in st.sums.items()})
            if st.class_counts is not None:
                out["class_counts"] = st.class_counts
            if st.token_counts is not None:
                out["token_counts"] = st.token_counts
            if st.pieces is not None:
                out["pieces"] = np.array(st.pieces, dtype=str)
        if self.attention is not None:
            out.update({f"att_{k}": np.asarray(v) for k, v in self.attention.sums.items()})
            out["att_group_size"] = np.array([self.attention.group_size])
        if self.ablation_sums is not None:
            out.update({f"abl_{k}": np.asarray(v) for k, v in self.ablation_sums.items()})
        return out

    def same_as(self, other: StudyResult) -> bool:
        """Bit-for-bit equal statistics (dtypes, shapes and values)."""
        a, b = self.arrays(), other.arrays()
        return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                            np.array_equal(a[k], b[k]) for k in a)


def from_totals(plan, ints: dict, floats: dict) -> StudyResult:
    routing = attention = None
    t = plan.template
    if t is not None:
        routing = dataclasses.replace(
            t, load=ints["load"].copy(), coactivation=ints["coactivation"].copy(),
            consecutive=ints["consecutive"].copy(), flow=ints["flow"].copy(),
            sums={k: floats[k].copy() for k in t.sums}, n_tokens=int(ints["n_tokens"][0]),
            class_counts=ints["class_counts"].copy() if "class_counts" in ints else None,
            token_counts=ints["token_counts"].copy() if "token_counts" in ints else None,
            domain_counts={d: ints["domain_counts"][i].copy() for i, d in enumerate(plan.domains)})
    if "attention" in plan.spec.collect:
        sums = {}
        for k, v in floats.items():
            if k.startswith("att_"):
                sums[k[4:]] = v.copy()
        for k, v in ints.items():
            if k.startswith("att_n_"):
                sums[k[4:]] = int(v[0])
        attention = D.AttentionStats(sums, plan.model.cfg.group_size)
    abl = None
    if "ablation" in plan.spec.collect:

        lay, unit = ablation_labels(plan)
        abl = {"kind": dict(plan.spec.ablation)["kind"], "layer": lay, "unit": unit, "nll": floats["abl_nll"].copy(),
               "kl": floats["abl_kl"].copy(), "base_nll": float(floats["abl_base_nll"][0]),
               "n_pred": float(floats["abl_n_pred"][0])}
    return StudyResult(routing, attention, {}, abl)


def save(result: StudyResult, path, meta: dict) -> Path:
    result.meta = dict(meta)
    store.write(Path(path), meta, result.arrays())
    return Path(path)


def load(path) -> StudyResult:
    """The :class:`StudyResult` in a results file (refused with a ValueError when damaged)."""
    meta, z = store.read(Path(path), store.RESULTS_FORMAT, what="study results")
    routing = attention = None
    if "load" in z:
        names = [str(x) for x in z["domain_names"]]
        routing = D.RoutingStats(
            int(z["num_experts"][0]), int(z["top_k"][0]), z["load"], z["coactivation"], z["consecutive"],
            z["flow"], {k[5:]: z[k] for k in z if k.startswith("sums_")}, int(z["n_tokens"][0]),
            z.get("class_counts"), z.get("token_counts"),
            {d: z["domain_counts"][i] for i, d in enumerate(names)},
            [str(x) for x in z["pieces"]] if "pieces" in z else None)
    abl = None
    if "abl_nll" in z:
        abl = {k[4:]: z[k] for k in z if k.startswith("abl_")}
        abl.update(kind=str(abl["kind"]), base_nll=float(abl["base_nll"]), n_pred=float(abl["n_pred"]))
    att = {k[4:]: z[k] for k in z if k.startswith("att_") and k != "att_group_size"}
    if att:
        att = {k: (int(v) if k.startswith("n_") else v) for k, v in att.items()}
        attention = D.AttentionStats(att, int(z["att_group_size"][0]))
    return StudyResult(routing, attention, meta, abl)


def ablation_labels(plan):
    """(layer [n], unit [n]) of a study plan's ablation sweep, in ``ablation_sums``'s order."""
    from ..analysis import patching as PT

    cfg, a = plan.model.cfg, dict(plan.spec.ablation)
    units = cfg.num_experts if a["kind"] == "expert" else cfg.num_q_heads
    layers = PT._layers(None if a["layers"] is None else list(a["layers"]), cfg, a["kind"])
    return np.repeat(layers, units), np.tile(np.arange(units), len(layers))

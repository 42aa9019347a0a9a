"""What figures of large models need (64-128 experts, top-8, dense MLP layers among the MoE layers): thinned
ticks, layer axes that carry the real layer numbers and show dense layers as such, expert subsets and orders
(top-N by load, co-activation clusters), and the expert-list syntax of the ablation lab ("3,17,90-95").

Pure numpy; no JAX, no widgets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_TICKS = 32          # tick labels on an expert or layer axis; more are thinned to every n-th
DENSE_FILL = "#e6e6e6"  # background of a dense layer's row (no routing there)


def finite(a) -> list:
    """``a`` as nested lists with None where it is NaN or infinite: plotly draws a gap there, and the figure stays
    strict JSON (a widget message with NaN is refused by Jupyter's serializer)."""
    a = np.asarray(a, np.float64)
    return np.where(np.isfinite(a), a, None).tolist()


def show_token(tok: str) -> str:
    """A printable form of a token piece (SentencePiece's word marker becomes a visible space)."""
    return str(tok).replace("\u2581", "\u2423").replace("\n", "\u21b5") or "\u2205"


def token_ticks(labels: Sequence[str], max_ticks: int = 64) -> dict:
    """Token-axis ticks at positions 0..n-1 labelled with the token pieces, thinned beyond ``max_ticks``."""
    idx = thin(len(labels), max_ticks)
    return dict(tickmode="array", tickvals=idx, ticktext=[show_token(labels[i]) for i in idx])


def thin(n: int, max_ticks: int = MAX_TICKS) -> list[int]:
    """Positions 0..n-1, every one up to ``max_ticks``, then every n-th (always starting at 0)."""
    return list(range(0, int(n), max(1, int(np.ceil(n / max_ticks)))))


def id_ticks(ids: Sequence[int], max_ticks: int = MAX_TICKS) -> dict:
    """Axis ticks for columns/rows at positions 0..n-1 showing ``ids`` (expert numbers), thinned."""
    ids = [int(i) for i in ids]
    pos = thin(len(ids), max_ticks)
    return dict(tickmode="array", tickvals=pos, ticktext=[str(ids[p]) for p in pos])


# ------------------------------------------------------------------------------------------ layer axes --

def layer_axis(layers: Sequence[int] | None, n_rows: int, num_layers: int | None) -> tuple[list[int], int]:
    """(real layer number of each routing row, the model's layer count). ``layers=None``: rows are layers
    0..n_rows-1; ``num_layers=None``: the last routing layer + 1. ValueError when they disagree."""
    rows = list(range(n_rows)) if layers is None else [int(l) for l in layers]
    if len(rows) != n_rows:
        raise ValueError(f"layers names {len(rows)} layer numbers for {n_rows} routing rows")
    if rows != sorted(set(rows)) or (rows and rows[0] < 0):
        raise ValueError(f"layers must be increasing layer numbers >= 0, got {rows}")
    n = (rows[-1] + 1 if rows else 0) if num_layers is None else int(num_layers)
    if rows and rows[-1] >= n:
        raise ValueError(f"layer {rows[-1]} is outside the model's {n} layers")
    return rows, n


def expand_layers(values, rows: Sequence[int], num_layers: int) -> np.ndarray:
    """[routing row, ...] -> object array [num_layers, ...] with None (a gap) on the dense layers' rows and
    NaN/inf turned into None as well (strict JSON for widget messages)."""
    values = np.asarray(values)
    out = np.full((num_layers,) + values.shape[1:], None, object)
    if values.dtype.kind == "f":
        vals = np.where(np.isfinite(values), values, None)
    else:
        vals = values.astype(object)
    out[list(rows)] = vals
    return out


def layer_ticks(rows: Sequence[int], num_layers: int, max_ticks: int = MAX_TICKS) -> dict:
    """y-axis ticks over layers 0..num_layers-1: the layer number, "<n> dense" on a dense layer, thinned."""
    moe = set(rows)
    pos = thin(num_layers, max_ticks)
    return dict(tickmode="array", tickvals=pos, ticktext=[f"{l}" if l in moe else f"{l} dense" for l in pos])


def dense_runs(rows: Sequence[int], num_layers: int) -> list[tuple[int, int]]:
    """The dense layers as inclusive runs [(first, last), ...] of consecutive layer numbers."""
    moe, runs = set(rows), []
    for l in range(num_layers):
        if l in moe:
            continue
        if runs and runs[-1][1] == l - 1:
            runs[-1] = (runs[-1][0], l)
        else:
            runs.append((l, l))
    return runs


def shade_dense(fig, rows: Sequence[int], num_layers: int) -> int:
    """Grey bands behind the dense layers' rows of a layer-on-y heatmap; returns how many layers are dense."""
    runs = dense_runs(rows, num_layers)
    for a, b in runs:
        fig.add_hrect(y0=a - 0.5, y1=b + 0.5, fillcolor=DENSE_FILL, line_width=0, layer="below")
    return sum(b - a + 1 for a, b in runs)


def dense_note(n_dense: int) -> str:
    return f"; grey rows: {n_dense} dense MLP layer(s), no routing" if n_dense else ""


def row_height(n_rows: int, budget: int = 640) -> int:
    """Pixels per heatmap row: 22 for a few layers, shrinking to fit ``budget`` (never under 9)."""
    return int(np.clip(budget / max(n_rows, 1), 9, 22))


# ------------------------------------------------------------------------------------- expert subsets --

def top_experts(score, top: int | None) -> np.ndarray:
    """The ``top`` experts by ``score`` (descending, ties by id); all of them (by id) when ``top`` is None or 0
    or not smaller than the expert count."""
    score = np.nan_to_num(np.asarray(score, np.float64), nan=-np.inf)
    E = score.shape[-1]
    if not top or top >= E:
        return np.arange(E)
    if top < 0:
        raise ValueError(f"top must be >= 0 experts, got {top}")
    return np.argsort(-score, kind="stable")[:int(top)]


def cluster_order(co) -> np.ndarray:
    """An expert order that puts experts which are often selected together next to each other: average-linkage
    agglomerative clustering of the symmetrised co-activation counts (diagonal = load, ignored), normalised as
    a_ij / sqrt(d_i d_j) with d the row sums, whose leaves are read out in merge order; each merge joins the two
    clusters of highest mean affinity and turns them so that the two most affine end experts meet. Unused experts
    go last. Ties go to the lowest ids, so the order is the same on every machine (a spectral order by the
    Fiedler vector was not: with equal-sized clusters that eigenvector is not unique, and LAPACK builds for
    different CPUs returned different ones)."""
    co = np.asarray(co, np.float64)
    used = np.diag(co) > 0
    idx = np.flatnonzero(used)
    if len(idx) > 2:
        a = (co + co.T)[np.ix_(used, used)] / 2
        np.fill_diagonal(a, 0)
        d = a.sum(1)
        inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
        a = inv[:, None] * a * inv[None, :]
        n = len(idx)
        members = {i: [i] for i in range(n)}  # cluster id (its first leaf) -> leaves in order
        link = a.copy()                     # mean affinity between clusters (rows/cols of live clusters)
        np.fill_diagonal(link, -np.inf)
        size = np.ones(n)
        while len(members) > 1:
            live = np.array(sorted(members))
            sub = link[np.ix_(live, live)]
            flat = int(np.argmax(sub))       # first maximum: lowest ids on ties
            x, y = sorted((int(live[flat // len(live)]), int(live[flat % len(live)])))
            A, B = members.pop(x), members.pop(y)
            ends = {(False, False): a[A[-1], B[0]], (False, True): a[A[-1], B[-1]],
                    (True, False): a[A[0], B[0]], (True, True): a[A[0], B[-1]]}
            flip_a, flip_b = max(ends, key=lambda k: (ends[k], not k[0], not k[1]))
            members[x] = (A[::-1] if flip_a else A) + (B[::-1] if flip_b else B)
            link[x] = link[:, x] = (size[x] * link[x] + size[y] * link[y]) / (size[x] + size[y])
            link[y] = link[:, y] = -np.inf
            link[x, x] = -np.inf
            size[x] += size[y]
        idx = idx[members[min(members)]]
    return np.concatenate([idx, np.flatnonzero(~used)]).astype(int)


ORDERS = ("id", "load", "cluster")


def expert_order(co, how: str = "id", top: int | None = None) -> np.ndarray:
    """Experts to show, in order, from [E, E] co-activation counts (diagonal = load): ``top`` busiest (all when
    None), ordered by ``how``: "id", "load" (busiest first) or "cluster" (:func:`cluster_order`)."""
    if how not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {how!r}")
    co = np.asarray(co, np.float64)
    if co.ndim != 2 or co.shape[0] != co.shape[1]:
        raise ValueError(f"co-activation counts must be a square [expert, expert] array, got shape {co.shape}")
    if not np.all(np.isfinite(co)):
        raise ValueError("co-activation counts contain NaN or infinite values")
    load = np.diag(co)
    keep = top_experts(load, top)
    if how == "load":
        return keep[np.argsort(-load[keep], kind="stable")]
    keep = np.sort(keep)
    if how == "cluster":
        return keep[cluster_order(co[np.ix_(keep, keep)])]
    return keep


# ------------------------------------------------------------------------------------ expert-list text --

def parse_ids(text: str, n: int, what: str = "expert") -> list[int]:
    """Ids from "3, 17, 90-95" (single ids and inclusive ranges, commas or spaces between); "" -> []. A
    ValueError names the bad part and the range [0, n)."""
    out: set[int] = set()
    for part in str(text).replace(",", " ").split():
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"{what}s: {part!r} is not a number or a range like 90-95") from None
        if b < a:
            raise ValueError(f"{what}s: range {part!r} runs backwards")
        if a < 0 or b >= n:
            raise ValueError(f"{what}s: {part!r} is outside [0, {n}): the model has {n} {what}s")
        out.update(range(a, b + 1))
    return sorted(out)


def format_ids(ids) -> str:
    """Sorted ids as compact text with ranges: [3, 17, 90, 91, 92] -> "3, 17, 90-92"."""
    ids, parts = sorted({int(i) for i in ids}), []
    for i in ids:
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)

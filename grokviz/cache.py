"""ActivationCache: an immutable mapping hook name -> array, indexable by (name, layer).

``cache[name]`` is the whole capture; ``cache[name, layer]`` one layer of a ``blocks.*`` hook, by layer number
(negative numbers count from the model's last layer), whatever layers were kept and whether the cache has a
leading variant axis (:meth:`grokviz.Model.run_many`). Out-of-range layers raise ``IndexError`` naming the
bound. A cache made with ``length`` holds arrays padded along seq/kv_seq (a bucketed run) and cuts them to
``length`` on the host the first time each is read (numpy views: nothing compiles per length).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .hooks import REGISTRY, unknown_hook_error


def trim_seq(name: str, value, t: int, lead: int = 0) -> np.ndarray:
    """``value`` as a numpy array cut back to its first ``t`` positions along the seq/kv_seq axes of hook
    ``name`` (``lead``: leading axes before the hook's own, e.g. a variant axis)."""
    axes = REGISTRY[name].axes
    index = (slice(None),) * lead + tuple(slice(0, t) if a in ("seq", "kv_seq") else slice(None) for a in axes)
    return np.asarray(value)[index]


def _layer_number(layer, n: int, name: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"cache[{name!r}, layer]: layer must be an int, got {layer!r}; "
                        f"slice the whole capture cache[{name!r}][...] instead")
    if not -n <= layer < n:
        raise IndexError(f"layer {int(layer)} is outside the model's {n} layers [-{n}, {n}) for {name}")
    return int(layer) % n


class ActivationCache(Mapping):
    """``values``: {hook name: array}; ``layout``: {name: (layers or None, heads or None)} for hooks kept for some
    layers/heads only (AttentionSpec, or routing hooks of a model with dense MLP layers); ``moe_layers``: the
    model's MoE layers; ``num_layers``: the model's layer count (default: the leading layer axis
    of the captures); ``length``: true sequence length when the values are padded; ``variants``: True when every
    value has a leading variant axis (``run_many``)."""

    def __init__(self, values: dict, layout: dict | None = None, *, num_layers: int | None = None,
                 length: int | None = None, variants: bool = False, moe_layers: tuple[int, ...] | None = None):
        #: the model's MoE layers (None: unknown or every layer); routing hooks exist for these layers only
        self.moe_layers = None if moe_layers is None else tuple(moe_layers)
        self._values = dict(values)
        self._host: dict = {}
        self.layout = dict(layout or {})
        self.length = length
        self.variants = bool(variants)
        self.num_layers = num_layers

    def layers_of(self, name) -> tuple[int, ...] | None:
        """The layer numbers along the layer axis of ``cache[name]`` when only some were kept (None: all)."""
        return self.layout.get(name, (None, None))[0]

    def heads_of(self, name) -> tuple[int, ...] | None:
        return self.layout.get(name, (None, None))[1]

    def _n_layers(self, name) -> int:
        if self.num_layers is not None:
            return self.num_layers
        if self.layers_of(name) is not None:
            raise IndexError(f"{name} keeps some layers only and this cache does not know the model's layer count")
        return int(np.shape(self._values[name])[int(self.variants)])

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if len(key) != 2:
                raise KeyError(f"index the cache as cache[name] or cache[name, layer], got {key!r}")
            name, layer = key
            arr = self[name]
            if not REGISTRY[name].per_layer:
                raise KeyError(f"{name} has no layer axis; index it as cache[{name!r}]")
            n = self._n_layers(name)
            layer = _layer_number(layer, n, name)
            kept = self.layers_of(name)
            if kept is not None:
                if layer not in kept and self.moe_layers is not None and layer not in self.moe_layers:
                    raise KeyError(f"layer {layer} is a dense MLP layer: {name} exists at the MoE layers "
                                   f"{list(self.moe_layers)} only")
                if layer not in kept:
                    raise KeyError(f"{name} was captured for layers {list(kept)} only, not layer {layer} "
                                   f"(index by layer number; pass AttentionSpec(layers=...) including it)")
                layer = kept.index(layer)
            return arr[:, layer] if self.variants else arr[layer]
        if key not in self._values:
            if key in REGISTRY:
                raise KeyError(f"{key!r} was not captured in this run; pass capture=[{key!r}] to model.run "
                               f"(captured: {', '.join(sorted(self._values)) or 'nothing'})")
            raise unknown_hook_error(key)
        if self.length is None:
            return self._values[key]
        if key not in self._host:
            self._host[key] = trim_seq(key, self._values[key], self.length, lead=int(self.variants))
            self._values[key] = self._host[key]  # drop the padded device buffer
        return self._host[key]

    def __contains__(self, key):
        return key in self._values

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def to_numpy(self) -> dict:
        return {k: np.asarray(self[k]) for k in self._values}

    def axes(self, name) -> tuple[str, ...]:
        return (("variant",) if self.variants else ()) + REGISTRY[name].axes

    def shape(self, name) -> tuple[int, ...]:
        """Shape of ``cache[name]`` without fetching it."""
        shape = list(np.shape(self._values[name]))
        if self.length is not None and name not in self._host:
            for i, a in enumerate(self.axes(name)):
                if a in ("seq", "kv_seq"):
                    shape[i] = min(shape[i], self.length)
        return tuple(shape)

    def __repr__(self):
        items = ", ".join(f"{k}{list(self.shape(k))}" for k in sorted(self._values))
        return f"ActivationCache({items})"

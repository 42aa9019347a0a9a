"""ActivationCache: an immutable mapping hook name -> array, indexable by (name, layer)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .hooks import REGISTRY, unknown_hook_error


class ActivationCache(Mapping):
    def __init__(self, values: dict, layout: dict | None = None):
        self._values = dict(values)
        # {name: (layers or None, heads or None)} for hooks kept only for some layers/heads (AttentionSpec)
        self.layout = dict(layout or {})

    def layers_of(self, name) -> tuple[int, ...] | None:
        """The layer numbers along axis 0 of ``cache[name]`` when only some were kept (None: all layers)."""
        return self.layout.get(name, (None, None))[0]

    def heads_of(self, name) -> tuple[int, ...] | None:
        return self.layout.get(name, (None, None))[1]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            name, layer = key
            arr = self[name]
            if not REGISTRY[name].per_layer:
                raise KeyError(f"{name} has no layer axis; index it as cache[{name!r}]")
            kept = self.layers_of(name)
            if kept is not None:
                if layer not in kept:
                    raise KeyError(f"{name} was captured for layers {list(kept)} only, not layer {layer} "
                                   f"(index by layer number; pass AttentionSpec(layers=...) including it)")
                return arr[kept.index(layer)]
            return arr[layer]
        if key not in self._values:
            if key in REGISTRY:
                raise KeyError(f"{key!r} was not captured in this run; pass capture=[{key!r}] to model.run "
                               f"(captured: {', '.join(sorted(self._values)) or 'nothing'})")
            raise unknown_hook_error(key)
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def to_numpy(self) -> dict:
        return {k: np.asarray(v) for k, v in self._values.items()}

    def axes(self, name) -> tuple[str, ...]:
        return REGISTRY[name].axes

    def __repr__(self):
        items = ", ".join(f"{k}{list(np.shape(v))}" for k, v in sorted(self._values.items()))
        return f"ActivationCache({items})"

"""Optional compiled CPU kernels called through JAX's FFI (issue 17; docs/grok1.md#attention).

``available()`` builds the fused attention kernel on first use (never at import; see :mod:`.build`) and says
whether it loaded; ``reason()`` says why not. The model's ``attn_impl="fused"`` (and the default ``"auto"`` on
CPU) uses it through :func:`grokviz.kernels.fused.attend_fused`; without it the pure-JAX tiled form runs, with
a one-time message naming the reason. Build ahead: ``python -m grokviz.kernels build``.
"""

from __future__ import annotations

import logging

from . import build as _build

_log = logging.getLogger("grokviz.kernels")
_told: set = set()


def available() -> bool:
    """True when the fused attention kernel is built, loaded and registered (builds it the first time)."""
    return bool(_build.load()["ok"])


def reason() -> str:
    """Why the kernel is (un)available: "built and loaded", or the failure."""
    return str(_build.load()["reason"])


def library() -> str | None:
    """The path of the loaded (or attempted) library."""
    return _build.load()["path"]


def fallback_notice(wanted: str) -> None:
    """Say once per process that ``wanted`` falls back to the tiled form, and why."""
    if wanted in _told:
        return
    _told.add(wanted)
    _log.warning("grokviz: attn_impl=%r falls back to 'tiled' (the fused CPU kernel is unavailable: %s)",
                 wanted, reason())


__all__ = ["available", "fallback_notice", "library", "reason"]

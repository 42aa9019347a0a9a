"""Streaming: each token reaches the host as the compiled loop produces it, without leaving the loop.

Inside the loop an ordered ``io_callback`` sends (call id, step, tokens, alive, prob, logprob, and the token's
selected experts when routing is captured) to
:func:`_dispatch`, which hands a :class:`StepEvent` to the sink registered for that call id. The call id is a
traced argument, so one compiled program serves every callback; the callback is compiled in only when
streaming is asked for (``stream=True`` or ``callback=``), and costs one device-to-host copy of a few
[batch] arrays per step.

:class:`GenerationStream` runs the program on a worker thread and yields the events from a queue;
``.result()`` then gives the :class:`~grokviz.generation.result.GenerationResult`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import typing

import numpy as np
from jax.experimental import io_callback


class StepEvent(typing.NamedTuple):
    """One generated token for every row (host numpy arrays)."""

    step: int             # token index t (0 = the first new token)
    tokens: np.ndarray    # int32 [batch]; the pad token for rows that had already stopped
    alive: np.ndarray     # bool [batch]: the row had not stopped before this token
    prob: np.ndarray      # float32 [batch]: sampler probability of the token
    logprob: np.ndarray   # float32 [batch]: the model's log-probability of the token
    #: int32 [moe layer, batch, k]: the experts the token was routed to (when routing is captured, else None)
    experts: np.ndarray | None = None
    #: float32 [moe layer, batch, k]: their gates (when ``blocks.moe.top_k_weights`` is captured, else None)
    gates: np.ndarray | None = None


_SINKS: dict[int, tuple[typing.Callable, int]] = {}  # call id -> (sink, max_new_tokens)
_IDS = itertools.count(1)
_LOCK = threading.Lock()


def register(sink, n: int) -> int:
    """A new call id whose steps ``< n`` go to ``sink(event)``."""
    with _LOCK:
        i = next(_IDS) % (2**31 - 1)
        _SINKS[i] = (sink, n)
    return i


def unregister(call_id: int) -> None:
    with _LOCK:
        _SINKS.pop(call_id, None)


def _dispatch(call_id, step, tokens, alive, prob, logprob, experts=None, gates=None):
    entry = _SINKS.get(int(call_id))
    if entry is not None and int(step) < entry[1]:
        entry[0](StepEvent(int(step), np.asarray(tokens), np.asarray(alive), np.asarray(prob),
                           np.asarray(logprob), None if experts is None else np.asarray(experts),
                           None if gates is None else np.asarray(gates)))


def emit(call_id, step, tokens, alive, prob, logprob, experts=None, gates=None) -> None:
    """Traced: send one step to the host (see the module docstring); ``experts``, ``gates``: the token's
    routing (optional)."""
    args = (call_id, step, tokens, alive, prob, logprob)
    args += () if experts is None else (experts,) if gates is None else (experts, gates)
    io_callback(_dispatch, None, *args, ordered=True)


_DONE = object()


class GenerationStream:
    """Iterate to get :class:`StepEvent` s as they are produced; :meth:`result` waits for the whole run.

    ``run(sink)`` is the generation call; it is started on a worker thread on first iteration (or by
    :meth:`result`). An exception inside it is raised from the iteration (or :meth:`result`)."""

    def __init__(self, run):
        self._run = run
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._result = None
        self._error: BaseException | None = None

    def _start(self):
        if self._thread is not None:
            return

        def work():
            try:
                self._result = self._run(self._queue.put)
            except BaseException as e:  # handed to the consumer
                self._error = e
            finally:
                self._queue.put(_DONE)

        self._thread = threading.Thread(target=work, name="grokviz-generate", daemon=True)
        self._thread.start()

    def __iter__(self):
        self._start()
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            yield item
        if self._error is not None:
            raise self._error

    def result(self):
        """The :class:`~grokviz.generation.result.GenerationResult` (waits for the run to finish)."""
        self._start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

"""Generation with a KV cache, watching and steering the model as it writes.

``generate(model, prompt, max_new_tokens, ...)`` (also :meth:`grokviz.Model.generate`) prefills the prompt once
and decodes in one compiled ``lax.while_loop``, sampling as the Grok-1 runner does (:mod:`.sampler`, with its
key chain in :mod:`.keys`), capturing routing, attention rows and other hooks per generated token, applying
interventions to every step and patches to chosen steps, and optionally streaming tokens as they are made
(:mod:`.stream`). The result is a :class:`GenerationResult`.
"""

from .generate import generate
from .inputs import ROUTING_CAPTURE, force_routing_steps
from .keys import key_chain
from .loop import TRACE_COUNT
from .result import GenerationResult, step_axes
from .sampler import Sample, sample
from .stream import GenerationStream, StepEvent

__all__ = ["ROUTING_CAPTURE", "TRACE_COUNT", "GenerationResult", "GenerationStream", "Sample", "StepEvent",
           "force_routing_steps", "generate", "key_chain", "sample", "step_axes"]

"""The generation engine: sequences, continuous batching over the model's slots, the
runner that feeds the model, and per-sequence sampling.

``Model.generate`` and ``Model.chat`` are the usual entry points; :class:`Engine` gives
step-by-step control (a server, the ``run`` command). The tools built on the model
(perplexity, the concurrency check, the speed sweep) live beside it.
"""

from .engine import Engine, Event, chat, generate
from .runner import Runner, RunStats
from .sampler import InvalidParameterError, Sampler, SamplingParams
from .scheduler import Scheduler, Step
from .sequence import Completion, Sequence, Status, StopCriteria

__all__ = [
    "Completion", "Engine", "Event", "InvalidParameterError", "RunStats", "Runner",
    "Sampler", "SamplingParams", "Scheduler", "Sequence", "Status", "Step", "StopCriteria",
    "chat", "generate",
]

"""Exponential backoff with jitter for reconnecting to the access server.

Many agents lose the server together (a restart, a network cut); without
jitter they would all come back in the same instant. Each delay is drawn from
the upper half of the exponential step, so it still grows but never lines up.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_INITIAL_S = 0.5
DEFAULT_MAX_S = 30.0
DEFAULT_FACTOR = 2.0
# Delays fall in [(1 - JITTER) * step, step].
JITTER = 0.5
# Past this the step is long capped; bounding it keeps the power finite.
MAX_EXPONENT = 64


@dataclass
class Backoff:
    """Successive delays: ``next_delay()`` grows until ``reset()`` after a success."""

    initial_s: float = DEFAULT_INITIAL_S
    max_s: float = DEFAULT_MAX_S
    factor: float = DEFAULT_FACTOR
    uniform: Callable[[float, float], float] = field(
        default=random.SystemRandom().uniform, repr=False)
    attempts: int = 0

    def next_delay(self) -> float:
        step = min(self.max_s, self.initial_s * self.factor ** min(self.attempts, MAX_EXPONENT))
        self.attempts += 1
        return self.uniform(step * (1 - JITTER), step)

    def reset(self) -> None:
        self.attempts = 0

"""How a failed message is retried: how many times, and how long to wait."""

from __future__ import annotations

import dataclasses
import math
import random

from keylane.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries in place with exponential backoff and jitter.

    ``max_attempts`` counts deliveries, the first included: with 5, a message
    is tried once and retried four times. Before retry ``n`` (1-based) the
    runtime waits ``backoff_base * backoff_factor ** (n - 1)``, capped at
    ``backoff_max``, each wait varied at random by up to ``jitter`` of itself
    (0.1: ±10%), so failing keys do not retry in lockstep. Meanwhile the key
    stays blocked: later messages of it wait behind the failing one.
    """

    max_attempts: int = 5
    backoff_base: float = 0.1
    backoff_factor: float = 2.0
    backoff_max: float = 30.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigError(
                f"max_attempts must be an int, not {type(self.max_attempts).__name__}"
            )
        if self.max_attempts < 1:
            raise ConfigError(
                f"max_attempts must be >= 1 (1 means no retries), got {self.max_attempts}"
            )
        for name in ("backoff_base", "backoff_factor", "backoff_max", "jitter"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ConfigError("backoff_base and backoff_max must be >= 0")
        if self.backoff_factor < 1:
            raise ConfigError(f"backoff_factor must be >= 1, got {self.backoff_factor}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"jitter must be between 0 and 1, got {self.jitter}")

    def exhausted(self, deliveries: int) -> bool:
        """True once ``deliveries`` attempts have failed and none is left."""
        return deliveries >= self.max_attempts

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        exponent = max(retry - 1, 0)
        try:
            raw = self.backoff_base * float(self.backoff_factor) ** exponent
        except OverflowError:  # long past backoff_max anyway
            raw = math.inf
        base = min(self.backoff_max, raw)
        if self.jitter:
            base *= 1 + self.jitter * (2 * (rng or random).random() - 1)
        return max(base, 0.0)

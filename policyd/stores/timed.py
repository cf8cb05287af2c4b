"""A store wrapper that times every operation and counts failures for the metrics."""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter

from ..checks.greylist import Step, Timing
from ..checks.ratelimit import Charge, Decision
from ..metrics import Metrics
from .base import QuestionStore


class TimedStore:
    """Delegates to ``inner``; records latency per operation and errors by operation."""

    def __init__(self, inner: QuestionStore, metrics: Metrics) -> None:
        self.inner = inner
        self._grey = (
            metrics.store_seconds.labels("greylist"),
            metrics.store_errors.labels("greylist"),
        )
        self._rate = (
            metrics.store_seconds.labels("ratelimit"),
            metrics.store_errors.labels("ratelimit"),
        )

    # Timing inline rather than through a shared helper coroutine: one coroutine frame less
    # on every question.
    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step:
        seconds, errors = self._grey
        started = perf_counter()
        try:
            return await self.inner.greylist_step(triplet_key, client_key, now, timing, force_pass)
        except Exception:
            errors.inc()
            raise
        finally:
            seconds.observe(perf_counter() - started)

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]:
        seconds, errors = self._rate
        started = perf_counter()
        try:
            return await self.inner.ratelimit_step(charges, now)
        except Exception:
            errors.inc()
            raise
        finally:
            seconds.observe(perf_counter() - started)

"""A store wrapper that times every operation and counts failures for the metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from ..checks.greylist import Step, Timing
from ..checks.ratelimit import Charge, Decision
from ..metrics import Metrics
from . import QuestionStore

_T = TypeVar("_T")


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

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step:
        operation = self.inner.greylist_step(triplet_key, client_key, now, timing, force_pass)
        return await _timed(self._grey, operation)

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]:
        return await _timed(self._rate, self.inner.ratelimit_step(charges, now))


async def _timed(metrics: tuple[Any, Any], operation: Awaitable[_T]) -> _T:
    """Await ``operation``, observing its latency and counting its failure."""
    seconds, errors = metrics
    started = time.perf_counter()
    try:
        return await operation
    except Exception:
        errors.inc()
        raise
    finally:
        seconds.observe(time.perf_counter() - started)

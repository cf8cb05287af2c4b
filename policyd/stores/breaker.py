"""A circuit breaker for a remote store: after repeated failures, fail at once instead of
waiting out a timeout per question, and probe now and then until the store answers again.

Store-agnostic and free of I/O: the caller asks ``allow()`` before an operation and reports
``success()`` or ``failure()`` after it; time comes from an injected clock. Each state
change is logged once (WARNING when the circuit opens, INFO when it closes again).

    CLOSED ──(``failures`` consecutive failures)──▶ OPEN ──(``reset`` seconds)──▶ HALF_OPEN
      ▲                                              ▲                               │
      └──────────────(probe succeeds)────────────────┴───────(probe fails)───────────┘

In HALF_OPEN exactly one operation (the probe) goes through; the others keep failing fast
until the probe's outcome is reported.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Consecutive-failure breaker. Counters are plain attributes for the metrics layer."""

    def __init__(
        self,
        failures: int,
        reset: float,
        *,
        name: str = "store",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self.threshold = failures
        self.reset = reset
        self.name = name
        self.clock = clock
        self.state = BreakerState.CLOSED
        #: Failures since the last success (reset by any success).
        self.consecutive_failures = 0
        #: Operations refused without trying because the circuit was open.
        self.rejected = 0
        #: Times the circuit opened (a failed probe counts again).
        self.opened = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def is_closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def retry_in(self) -> float:
        """Seconds until the next probe may go through (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset - self.clock())

    def allow(self) -> bool:
        """May an operation be tried now? Counts a refusal in ``rejected``."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self.clock() - self._opened_at >= self.reset:
            self._change(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        self.rejected += 1
        return False

    def success(self) -> None:
        self.consecutive_failures = 0
        self._probing = False
        if self.state is not BreakerState.CLOSED:
            self._change(BreakerState.CLOSED)

    def abandon(self) -> None:
        """An operation ended without telling whether the store works (cancelled): if it
        was the probe, the next operation may probe instead."""
        self._probing = False

    def failure(self, cause: object = None) -> None:
        self.consecutive_failures += 1
        self._probing = False
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.consecutive_failures >= self.threshold
        ):
            self._open(cause)
        # Already OPEN: an operation let through before it opened failed late; the timer
        # keeps running from the moment the circuit opened.

    def _open(self, cause: object) -> None:
        self._opened_at = self.clock()
        self.opened += 1
        previous = self.state
        self.state = BreakerState.OPEN
        if previous is BreakerState.CLOSED:
            logger.warning(
                "%s unavailable after %d consecutive failures (%s): circuit open, "
                "answering the fallback; probing every %gs",
                self.name,
                self.consecutive_failures,
                cause,
                self.reset,
            )
        else:
            logger.debug("%s probe failed (%s): circuit open again", self.name, cause)

    def _change(self, state: BreakerState) -> None:
        previous, self.state = self.state, state
        if state is BreakerState.CLOSED:
            logger.info("%s answers again: circuit closed (was %s)", self.name, previous.value)
        else:
            logger.debug("%s circuit %s", self.name, state.value)

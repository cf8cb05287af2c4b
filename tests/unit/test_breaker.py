"""The circuit breaker as pure logic: a fake clock, no store, no loop."""

from __future__ import annotations

import logging

import pytest

from policyd.stores.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def breaker(clock: FakeClock, failures: int = 3, reset: float = 2.0) -> CircuitBreaker:
    return CircuitBreaker(failures, reset, name="test store", clock=clock)


def test_opens_after_consecutive_failures_only(clock: FakeClock) -> None:
    b = breaker(clock)
    b.failure("x")
    b.failure("x")
    b.success()  # resets the run
    b.failure("x")
    b.failure("x")
    assert b.state is BreakerState.CLOSED and b.allow()
    b.failure("x")
    assert b.state is BreakerState.OPEN
    assert b.opened == 1


def test_open_refuses_until_reset_then_lets_one_probe(clock: FakeClock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure("refused")
    assert not b.allow() and not b.allow()
    assert b.rejected == 2
    assert b.retry_in() == pytest.approx(2.0)
    clock.now += 1.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()  # the probe
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # others keep failing fast while it is out
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()


def test_failed_probe_reopens_with_a_fresh_timer(clock: FakeClock) -> None:
    b = breaker(clock, failures=1, reset=5.0)
    b.failure("down")
    clock.now += 5
    assert b.allow()
    clock.now += 0.25
    b.failure("timeout")
    assert b.state is BreakerState.OPEN and b.opened == 2
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()


def test_abandoned_probe_frees_the_slot(clock: FakeClock) -> None:
    b = breaker(clock, failures=1, reset=1.0)
    b.failure("down")
    clock.now += 1
    assert b.allow()
    b.abandon()
    assert b.allow()  # another operation may probe


def test_late_failure_while_open_keeps_the_timer(clock: FakeClock) -> None:
    b = breaker(clock, failures=1, reset=1.0)
    b.failure("down")
    clock.now += 0.9
    b.failure("an operation started before the circuit opened")
    clock.now += 0.1
    assert b.allow()


def test_logs_once_per_state_change(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="policyd.stores.breaker")
    b = breaker(clock, failures=2, reset=1.0)
    for _ in range(10):
        b.failure("refused")
    for _ in range(3):  # failed probes: no new warning
        clock.now += 1
        assert b.allow()
        b.failure("refused")
    clock.now += 1
    assert b.allow()
    b.success()
    b.success()
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [level for level, _ in records] == [logging.WARNING, logging.INFO]
    assert "circuit open" in records[0][1] and "refused" in records[0][1]
    assert "circuit closed" in records[1][1]


def test_rejects_a_threshold_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CircuitBreaker(0, 1.0)

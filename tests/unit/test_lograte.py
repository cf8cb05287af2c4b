"""The rate limiter of repeated warnings: one line per kind per interval, with a count."""

from __future__ import annotations

import logging

import pytest

from policyd.lograte import LogLimiter

LOG = logging.getLogger("policyd.test.lograte")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG.name]


def test_one_line_per_kind_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOG.name)
    clock = Clock()
    limiter = LogLimiter(interval=10.0, clock=clock)
    assert limiter.warning(LOG, "deadline of %.1fs passed", 1.0)
    for _ in range(1234):
        clock.now += 0.005
        assert not limiter.warning(LOG, "deadline of %.1fs passed", 1.0)
    assert limiter.warning(LOG, "another kind %d", 7)  # kinds do not share a window
    clock.now = 1010.0
    assert limiter.warning(LOG, "deadline of %.1fs passed", 1.0)
    assert messages(caplog) == [
        "deadline of 1.0s passed",
        "another kind 7",
        "deadline of 1.0s passed (1,234 more in the last 10 s)",
    ]


def test_flush_writes_the_counts_of_ended_windows(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOG.name)
    clock = Clock()
    limiter = LogLimiter(interval=10.0, clock=clock)
    limiter.warning(LOG, "closed %s", "a")
    limiter.warning(LOG, "closed %s", "b")
    limiter.warning(LOG, "closed %s", "c")
    limiter.warning(LOG, "alone")
    assert limiter.flush() == 0  # the window is still open
    clock.now += 10.0
    assert limiter.flush() == 1  # "alone" had nothing suppressed: no line
    assert limiter.flush() == 0
    # The last suppressed line is written, standing for the one before it.
    assert messages(caplog) == ["closed a", "alone", "closed c (1 more in the last 10 s)"]
    assert limiter.warning(LOG, "closed %s", "d")  # a new window starts afresh


def test_flush_at_shutdown_writes_every_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOG.name)
    limiter = LogLimiter(interval=10.0, clock=Clock())
    limiter.warning(LOG, "x")
    limiter.warning(LOG, "x")
    assert limiter.flush(all_windows=True) == 1
    assert messages(caplog) == ["x", "x"]


def test_disabled_level_counts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, LOG.name)
    limiter = LogLimiter(interval=10.0, clock=Clock())
    assert not limiter.warning(LOG, "quiet")
    assert limiter.flush(all_windows=True) == 0
    assert messages(caplog) == []


def test_exception_lines_carry_the_traceback_and_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOG.name)
    limiter = LogLimiter(interval=10.0, clock=Clock())
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        limiter.exception(LOG, "check failed")
        limiter.exception(LOG, "check failed")
    [record] = [r for r in caplog.records if r.name == LOG.name]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert record.funcName == "test_exception_lines_carry_the_traceback_and_the_caller"

"""The age of a question (``t=``): fresh, stale (Exim gave up), or implausible; and the
rate-limited log line for bursts of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from policyd.stale import (
    CLOCK_SKEW_ALLOWANCE,
    EXIM_TIMEOUT,
    MAX_PLAUSIBLE_AGE,
    MICROSECONDS,
    Age,
    classify,
)

MACROS = Path(__file__).resolve().parents[2] / "exim-snippets" / "00_policyd"
NOW = 1_800_000_000.0


def asked(seconds_ago: float) -> int:
    """``t=`` as ``$tod_epoch_l`` writes it, ``seconds_ago`` before NOW."""
    return round((NOW - seconds_ago) * MICROSECONDS)


def test_the_timeout_is_the_one_the_fragments_give_exim() -> None:
    (value,) = re.findall(r"^POLICYD_TIMEOUT = ([0-9]+)s$", MACROS.read_text(), re.M)
    assert float(value) == EXIM_TIMEOUT


@pytest.mark.parametrize(
    ("seconds_ago", "age"),
    [
        (0.0, Age.FRESH),
        (0.001, Age.FRESH),
        (EXIM_TIMEOUT - 0.001, Age.FRESH),
        (EXIM_TIMEOUT + 0.001, Age.STALE),
        (30.0, Age.STALE),
        (MAX_PLAUSIBLE_AGE - 1, Age.STALE),
        (MAX_PLAUSIBLE_AGE + 1, Age.IMPLAUSIBLE),
        # Slightly ahead (clock slew): just asked. Further ahead: the clocks disagree.
        (-CLOCK_SKEW_ALLOWANCE + 0.001, Age.FRESH),
        (-CLOCK_SKEW_ALLOWANCE - 0.001, Age.IMPLAUSIBLE),
        (-3600.0, Age.IMPLAUSIBLE),
    ],
)
def test_classify(seconds_ago: float, age: Age) -> None:
    assert classify(asked(seconds_ago), NOW) is age


def test_no_time_sent_is_fresh() -> None:
    assert classify(0, NOW) is Age.FRESH


def test_a_time_in_the_wrong_unit_is_implausible_not_stale() -> None:
    # $tod_epoch (seconds) or milliseconds read as microseconds land in 1970: ignored, so a
    # fragment with the wrong variable does not turn every question into a fallback.
    assert classify(int(NOW), NOW) is Age.IMPLAUSIBLE
    assert classify(int(NOW * 1000), NOW) is Age.IMPLAUSIBLE


def test_the_timeout_can_be_given() -> None:
    assert classify(asked(3.0), NOW, timeout=5.0) is Age.FRESH
    assert classify(asked(6.0), NOW, timeout=5.0) is Age.STALE

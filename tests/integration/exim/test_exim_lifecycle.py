"""The daemon going away and coming back, as Exim sees it."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
from support.policyd_process import wait_until

from .conftest import (
    GREYLIST_DELAY,
    NO_ANSWER_LOG,
    TEMP_LOCAL_PROBLEM,
    BhResult,
    Exim,
    Policyd,
    retry_until,
    sleep_until,
)

pytestmark = pytest.mark.exim

Factory = Callable[[str], Policyd]


def test_stopped_daemon_fails_open_or_closed_as_configured(
    exim: Exim, policyd_factory: Factory
) -> None:
    daemon = policyd_factory("stopped")
    assert daemon.stop() == 0, daemon.log_text()
    body = "Subject: hello\n\n"

    result = exim.bh(
        "192.0.2.30", "a@example.org", ["b@test.example"], socket_path=daemon.socket, body=body
    )
    assert result.rcpt_codes == [250], result.describe()
    assert result.data.startswith("250 OK id="), result.describe()
    logged = [line for line in result.log_lines if NO_ANSWER_LOG in line]
    assert logged and "accepting (fail-open)" in logged[0], result.describe()
    assert TEMP_LOCAL_PROBLEM not in result.describe()

    result = exim.bh(
        "192.0.2.30",
        "a@example.org",
        ["b@test.example"],
        socket_path=daemon.socket,
        body=body,
        POLICYD_FAIL="closed",
    )
    assert result.rcpt == ["451 4.3.0 Policy service unavailable, please try again later"], (
        result.describe()
    )
    assert any(NO_ANSWER_LOG in line and "fail-closed" in line for line in result.log_lines)


def test_triplet_survives_a_restart(exim: Exim, policyd_factory: Factory) -> None:
    daemon = policyd_factory("restart")

    def attempt() -> BhResult:
        return exim.bh(
            "192.0.2.40", "restart@example.org", ["r@test.example"], socket_path=daemon.socket
        )

    first_seen = time.monotonic()
    first = attempt()
    assert first.rcpt_codes == [451], first.describe()

    assert daemon.stop() == 0, daemon.log_text()
    daemon.start()

    sleep_until(first_seen + GREYLIST_DELAY)
    later = retry_until(attempt, lambda r: r.rcpt_codes == [250], 3.0)
    assert later.rcpt_codes == [250], later.describe() + "\n" + daemon.log_text()
    assert not [line for line in later.log_lines if NO_ANSWER_LOG in line]


def test_a_stopped_daemon_does_not_decide_what_exim_gave_up_on(
    exim: Exim, policyd_factory: Factory
) -> None:
    daemon = policyd_factory("sigstop")
    assert daemon.process is not None
    sender = "stopped@example.org"
    daemon.process.send_signal(signal.SIGSTOP)  # by PID, our own child
    try:
        # The question waits in the daemon's backlog; Exim's 2 s timer fires: fail-open.
        result = exim.bh("192.0.2.50", sender, ["s@test.example"], socket_path=daemon.socket)
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    assert result.rcpt_codes == [250], result.describe()
    assert any(NO_ANSWER_LOG in line and "unreachable" in line for line in result.log_lines)

    # Read after SIGCONT, the question is older than Exim's timeout (t=): the fallback,
    # not a greylisting decision (which would say "defer" for a recipient Exim accepted).
    wait_until(lambda: "Exim gave up on" in daemon.log_text(), "the stale-question warning", 5)
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert f"sender={sender!r}" not in log, log
    stale = [line for line in log.splitlines() if "Exim gave up on" in line]
    assert len(stale) == 1 and "more in the last" not in stale[0], log  # this one, alone

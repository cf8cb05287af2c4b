"""Questions Exim gave up on (``t=``, docs/protocol.md): a real daemon process is stopped
(SIGSTOP) while questions queue in its listen backlog; after longer than Exim's timeout it
is continued (SIGCONT) and must answer them with the fallback, count them as
``policyd_fallbacks_total{cause="stale"}``, and neither decide nor log them as decisions;
questions asked afterwards are decided normally. The same through the dispatcher with an
injected clock: no store effect, and what an implausible ``t=`` does."""

from __future__ import annotations

import base64
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.exim_client import ask_blocking
from support.policyd_process import ANSWER_TIMEOUT, DaemonFactory
from test_metrics import metrics_port, moved, scrape, value

from policyd.checks.greylist import DEFER_CODE, DEFER_ECODE
from policyd.config import from_mapping
from policyd.dispatch import Dispatcher
from policyd.stale import CLOCK_SKEW_ALLOWANCE, EXIM_TIMEOUT, MICROSECONDS
from policyd.stores import Store, open_store

GREYLISTED = f"defer {DEFER_CODE} {DEFER_ECODE} ".encode()
STALE_FALLBACK = b"ok fallback stale"
#: Questions left in the backlog while the daemon is stopped.
QUEUED = 5
#: How much longer than Exim's timeout the daemon stays stopped.
MARGIN = 0.5


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def rcpt(recipient: str, asked: float | None) -> bytes:
    """An RCPT question from a greylisted client, as rcpt.acl writes it at ``asked``."""
    t = "" if asked is None else f" t={round(asked * MICROSECONDS)}"
    return (
        f"rcpt v=1 ip=198.51.100.7 port=25 helo_b64={b64('mx.example.net')} "
        f"from_b64={b64('alice@example.net')} rcpt_b64={b64(recipient)} auth_b64= "
        f"txn=stale-{recipient} nrcpt=1{t}\n"
    ).encode()


def send_without_reading(path: str, request: bytes) -> socket.socket:
    """Connect (the kernel queues the connection while the daemon is stopped), write the
    request and half-close, as Exim's readsocket does; the answer is read later."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(ANSWER_TIMEOUT)
    sock.connect(path)
    sock.sendall(request)
    sock.shutdown(socket.SHUT_WR)
    return sock


def read_answer(sock: socket.socket) -> bytes:
    with sock:
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


def test_questions_older_than_exim_timeout_get_the_fallback(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory(greylist={"delay": "1h", "whitelist_clients": []})
    daemon.start()
    port = metrics_port(daemon)
    before = scrape(port)

    daemon.send_signal(signal.SIGSTOP)
    try:
        queued = [
            send_without_reading(daemon.socket, rcpt(f"late{n}@test.example", time.time()))
            for n in range(QUEUED)
        ]
        time.sleep(EXIM_TIMEOUT + MARGIN)
    finally:
        daemon.send_signal(signal.SIGCONT)
    answers = [read_answer(sock) for sock in queued]
    assert answers == [STALE_FALLBACK] * QUEUED

    # Asked now: decided. The first stale recipient was never recorded: a new triplet.
    assert ask_blocking(daemon.socket, rcpt("late0@test.example", time.time())).startswith(
        GREYLISTED
    )
    # Without t= (older fragments), and slightly ahead of our clock: decided too.
    assert ask_blocking(daemon.socket, rcpt("old@test.example", None)).startswith(GREYLISTED)
    ahead = time.time() + CLOCK_SKEW_ALLOWANCE / 2
    assert ask_blocking(daemon.socket, rcpt("ahead@test.example", ahead)).startswith(GREYLISTED)

    after = scrape(port)
    assert moved(before, after, "policyd_fallbacks_total", cause="stale") == QUEUED
    assert moved(before, after, "policyd_questions_total", stage="rcpt") == 3
    labels = {"check": "greylist", "reason": "new", "action": "defer"}
    assert moved(before, after, "policyd_decisions_total", **labels) == 3
    assert value(after, "policyd_open_connections") == 0

    assert daemon.stop() == 0  # and the decision lines are flushed
    log = daemon.log_since_start()
    decided = [line for line in log.splitlines() if "decision stage=" in line]
    assert len(decided) == 3 and not any("late1@" in line for line in decided), decided
    assert all("reason=new" in line for line in decided), decided
    warnings = [line for line in log.splitlines() if "Exim gave up on" in line]
    # Rate-limited (policyd/lograte.py): the first line at once, the rest of the burst as a
    # count on the next line written (here at stop); every stale question accounted for.
    assert len(warnings) == 2, warnings
    counted = re.search(r"\((\d+) more in the last", warnings[1])
    assert counted and 2 + int(counted.group(1)) == 5, warnings  # two written, the rest counted


# --- through the dispatcher, with an injected clock -----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    config = from_mapping({"store": {"url": f"sqlite://{tmp_path / 'state.sqlite3'}"}})
    opened = await open_store(config.store)
    yield opened
    await opened.aclose()


@pytest.mark.parametrize("fallback", ["accept", "defer"])
async def test_a_stale_question_changes_no_state(store: Store, fallback: str) -> None:
    config = from_mapping(
        {"server": {"fallback": fallback}, "greylist": {"delay": "5m", "whitelist_clients": []}}
    )
    clock = Clock()
    dispatcher = Dispatcher(config, store, clock=clock, hostname="mx.test")
    stale = await dispatcher.answer(rcpt("b@test.example", clock.now - EXIM_TIMEOUT - 0.01))
    assert stale == dispatcher.fallback("stale")
    if fallback == "defer":
        assert stale.startswith(b"defer 451 4.3.0 ")
    # The triplet was not recorded: asked again in time, it is new, not an early retry.
    fresh = await dispatcher.answer(rcpt("b@test.example", clock.now - EXIM_TIMEOUT + 0.01))
    assert fresh.startswith(GREYLISTED)
    clock.now += 10
    again = await dispatcher.answer(rcpt("b@test.example", clock.now))
    assert again.startswith(GREYLISTED)
    shown = await store.admin.greylist_scan([None, None, None], 10)
    assert [triplet.attempts for _, triplet, _ in shown] == [2]


async def test_an_implausible_time_is_ignored_with_a_warning(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    config = from_mapping({"greylist": {"delay": "5m", "whitelist_clients": []}})
    clock = Clock()
    dispatcher = Dispatcher(config, store, clock=clock, hostname="mx.test")
    with caplog.at_level("WARNING", logger="policyd.dispatch"):
        for n, asked in enumerate([clock.now + 3600, clock.now - 30 * 86400, clock.now + 60]):
            answer = await dispatcher.answer(rcpt(f"r{n}@test.example", asked))
            assert answer.startswith(GREYLISTED), answer
    (warning,) = caplog.records  # rate-limited: one line for the three
    assert "implausible t=" in warning.getMessage()

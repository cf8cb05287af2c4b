"""Held-open connections cannot turn policy off for everyone (issue 16).

An adversary holds thousands of connections on the query socket without asking, and a few
more trickle a request one byte at a time. Real questions asked meanwhile must still get
real answers, quickly, and the log must not fill with a line per connection. The daemon
runs as operators run it (a subprocess with the default ``max_connections``); two settings:
the default ``request_timeout`` (idle connections are closed after 250 ms), and one so long
that only the eviction at ``max_connections`` protects the questions.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from typing import Any

import pytest
from support.exim_client import Question, ask
from support.policyd_process import ANSWER_TIMEOUT, DaemonFactory

from policyd.config import ServerConfig
from policyd.server import HARD_CONNECTION_FACTOR

IDLE = 2_000
SLOW = 20
QUESTIONS = 600
#: Share of questions that must get a real (non-fallback) answer, and their p99 latency.
ANSWERED_SHARE = 0.99
P99_SECONDS = 0.050
#: Warning lines the whole attack may cost (rate limited: one per kind per 10 s).
MAX_WARNING_LINES = 20
#: Pause between two bytes of a slow client.
TRICKLE = 0.01
#: Pause between two real questions: they span several request timeouts (250 ms), so some
#: are asked while the daemon closes hundreds of idle connections at once.
PACE = 0.002
POLICY: dict[str, Any] = {"greylist": {"whitelist_clients": ["192.0.2.0/24"]}}
QUESTION = (
    b"rcpt v=1 ip=192.0.2.7 port=25 helo_b64=bXguZXhhbXBsZS5uZXQ= "
    b"from_b64=YUBleGFtcGxlLm5ldA== rcpt_b64=YkBleGFtcGxlLm9yZw== auth_b64= nrcpt=1\n"
)
REAL_ANSWER = b"ok whitelisted-client"


def raise_file_limit(needed: int) -> None:
    """Room for our connections and the daemon's (it inherits the limit); tests run as
    root, so the hard limit can be raised too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        hard = hard if hard == resource.RLIM_INFINITY else max(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def hold(path: str, count: int) -> list[socket.socket]:
    """``count`` connections that never send a byte."""
    held = []
    for _ in range(count):
        question = await Question.connect(path)
        held.append(question.sock)
    return held


async def trickle(path: str, stop: asyncio.Event) -> int:
    """One slow client: a byte of the request at a time, reconnecting whenever the daemon
    closes; the number of connections it made."""
    made = 0
    while not stop.is_set() and made < 1_000:
        made += 1
        question = await Question.connect(path)
        try:
            for byte in QUESTION[:-1]:  # never the newline, never the half-close
                await asyncio.get_running_loop().sock_sendall(question.sock, bytes([byte]))
                await asyncio.sleep(TRICKLE)
                if stop.is_set():
                    break
        except OSError:
            pass  # closed by the daemon: its request time was up
        finally:
            question.close()
    return made


def still_open(sock: socket.socket) -> bool:
    """The daemon has neither closed nor answered this connection."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "server",
    [
        pytest.param({}, id="default-request-timeout"),
        pytest.param({"request_timeout": "30s", "deadline": "30s"}, id="eviction-only"),
    ],
)
async def test_held_connections_do_not_starve_real_questions(
    daemon_factory: DaemonFactory, server: dict[str, Any]
) -> None:
    max_connections = ServerConfig().max_connections
    raise_file_limit(IDLE + HARD_CONNECTION_FACTOR * max_connections + 512)
    daemon = daemon_factory(server=server, **POLICY)
    daemon.start()
    stop = asyncio.Event()
    slow = [asyncio.create_task(trickle(daemon.socket, stop)) for _ in range(SLOW)]
    held: list[socket.socket] = []
    try:
        async with asyncio.timeout(60):
            held = await hold(daemon.socket, IDLE)
            latencies: list[float] = []
            answers: list[bytes] = []
            for _ in range(QUESTIONS):
                started = time.perf_counter()
                answers.append(await ask(daemon.socket, QUESTION))
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(PACE)
            if not server:  # every idle connection's request time is up by now
                await asyncio.sleep(ServerConfig().request_timeout + 0.5)
            kept = sum(still_open(sock) for sock in held)
    finally:
        stop.set()
        made = await asyncio.gather(*slow)
        for sock in held:
            sock.close()
    real = sum(answer == REAL_ANSWER for answer in answers)
    assert real >= ANSWERED_SHARE * QUESTIONS, sorted(set(answers))
    p99 = sorted(latencies)[int(0.99 * len(latencies)) - 1]
    assert p99 <= P99_SECONDS, f"p99 {p99 * 1000:.1f} ms"
    if server:
        # The attack held: the daemon kept a full house of idle connections throughout.
        assert kept >= max_connections // 2, kept
    else:
        assert kept == 0, "idle connections outlived request_timeout"
        assert min(made) >= 2, "slow clients were not closed at request_timeout"
    daemon.stop()
    warnings = [line for line in daemon.log_since_start().splitlines() if " WARNING " in line]
    assert len(warnings) <= MAX_WARNING_LINES, "\n".join(warnings)


def test_a_slow_client_gets_the_fallback_at_the_request_timeout(
    daemon_factory: DaemonFactory,
) -> None:
    """What a slow client sees: the fallback answer, well before the deadline."""
    daemon = daemon_factory(server={"request_timeout": "100ms", "deadline": "5s"}, **POLICY)
    daemon.start()

    async def slow_question() -> tuple[bytes, float]:
        question = await Question.connect(daemon.socket)
        try:
            started = time.monotonic()
            await question.send(QUESTION[:10])
            async with asyncio.timeout(ANSWER_TIMEOUT):
                answer = await question.answer(half_close=False)
            return answer, time.monotonic() - started
        finally:
            with contextlib.suppress(OSError):
                question.close()

    answer, waited = asyncio.run(slow_question())
    assert answer == b"ok fallback request-timeout"
    assert waited < 2.0
    assert daemon.stop() == 0

"""The real server in-process, asked the way Exim asks: golden table at several write sizes,
the three limits (request size, deadline, connections) and their fallback answers, odd
clients, drain on stop, the TCP listener, and the same server on uvloop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    GOLDEN_CONFIG,
    GOLDEN_ROWS,
    WELL_FORMED,
    GoldenRow,
    ServerFactory,
    running_server,
)
from support.exim_client import Question, ask
from support.policyd_process import ANSWER_TIMEOUT

from policyd.dispatch import FALLBACK_DEFER
from policyd.protocol import format_answer
from policyd.server import HARD_CONNECTION_FACTOR

#: Short enough to keep the suite fast, long enough for a loaded CI machine to answer in.
DEADLINE = 0.3
WHITELISTED = next(row for row in GOLDEN_ROWS if row.answer == b"ok whitelisted-client")
GREYLISTED = next(row for row in GOLDEN_ROWS if row.answer.startswith(b"defer 451 4.7.1 "))


def answered_whole(row: GoldenRow) -> bool:
    """The server answers at the first newline, so a row with a newline before its end is
    answered for its first line only (see test_answers_the_first_line_only)."""
    return b"\n" not in row.request[:-1]


def newline_terminated(row: GoldenRow) -> bool:
    return row.request.endswith(b"\n") and answered_whole(row)


def fallback_answer(fallback: str, cause: str) -> bytes:
    """docs/protocol.md: ``ok fallback <cause>`` or the fixed 4.3.0 defer."""
    if fallback == "defer":
        return format_answer(FALLBACK_DEFER)
    return f"ok fallback {cause}".encode()


async def replay(
    address: Any, rows: list[GoldenRow], *, chunk: int | None = None, half_close: bool = True
) -> list[str]:
    """The rows whose answer differs from the table, described."""
    wrong = []
    for row in rows:
        got = await ask(address, row.request, chunk=chunk, half_close=half_close)
        if got != row.answer:
            wrong.append(f"{row}: got {got!r}, want {row.answer!r}")
    return wrong


# --- the golden table -----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 7, None], ids=["1", "2", "7", "all"])
async def test_golden_table_with_half_close(server_factory: ServerFactory, chunk: int) -> None:
    srv = await server_factory(**GOLDEN_CONFIG)
    rows = [row for row in GOLDEN_ROWS if answered_whole(row)]
    assert await replay(srv.socket, rows, chunk=chunk) == []


@pytest.mark.parametrize("chunk", [1, 7, None], ids=["1", "7", "all"])
async def test_golden_table_newline_without_half_close(
    server_factory: ServerFactory, chunk: int
) -> None:
    """A client that keeps its write side open still gets the answer and then EOF."""
    srv = await server_factory(**GOLDEN_CONFIG)
    rows = [row for row in GOLDEN_ROWS if newline_terminated(row)]
    assert len(rows) > 40
    assert await replay(srv.socket, rows, chunk=chunk, half_close=False) == []


async def test_golden_table_all_at_once(server_factory: ServerFactory) -> None:
    """Every row on its own connection, all in flight together (one group commit or more)."""
    srv = await server_factory(**GOLDEN_CONFIG)
    rows = [row for row in GOLDEN_ROWS if answered_whole(row)]
    answers = await asyncio.gather(*(ask(srv.socket, row.request) for row in rows))
    assert [(str(r), a) for r, a in zip(rows, answers, strict=True) if a != r.answer] == []


async def test_answers_the_first_line_only(server_factory: ServerFactory) -> None:
    """Two lines in one write: the answer is for the first, the rest is never read as a
    question (the codec alone refuses such a request; see golden.tsv)."""
    srv = await server_factory(**GOLDEN_CONFIG)
    got = await ask(srv.socket, WHITELISTED.request.rstrip(b"\r\n") + b"\n" + GREYLISTED.request)
    assert got == WHITELISTED.answer
    await srv.wait_idle()


# --- limits and fallbacks -------------------------------------------------------------------


@pytest.mark.parametrize("fallback", ["accept", "defer"])
async def test_request_over_the_limit_gets_the_fallback(
    server_factory: ServerFactory, fallback: str
) -> None:
    limit = 512
    srv = await server_factory(
        server={"max_request_bytes": limit, "fallback": fallback}, **GOLDEN_CONFIG
    )
    base = WHITELISTED.request.rstrip(b"\r\n") + b" pad="
    exact = base + b"x" * (limit - len(base) - 1) + b"\n"
    assert len(exact) == limit
    assert await ask(srv.socket, exact) == WHITELISTED.answer

    over = base + b"x" * (limit - len(base)) + b"\n"
    assert len(over) == limit + 1
    assert await ask(srv.socket, over) == fallback_answer(fallback, "request-too-large")
    huge = base + b"A" * (10 * limit)  # no newline, then half-close
    assert await ask(srv.socket, huge) == fallback_answer(fallback, "request-too-large")

    assert await ask(srv.socket, WHITELISTED.request) == WHITELISTED.answer
    await srv.wait_idle()


@pytest.mark.parametrize("fallback", ["accept", "defer"])
async def test_slow_client_gets_the_fallback_at_the_deadline(
    server_factory: ServerFactory, fallback: str
) -> None:
    srv = await server_factory(
        server={"deadline": DEADLINE, "request_timeout": "10s", "fallback": fallback},
        **GOLDEN_CONFIG,
    )
    question = await Question.connect(srv.socket)
    try:
        started = time.monotonic()
        await question.send(WHITELISTED.request[:20])  # ...and stall, write side open
        async with asyncio.timeout(DEADLINE + 2):
            got = await question.answer(half_close=False)  # returns only at EOF
        elapsed = time.monotonic() - started
    finally:
        question.close()
    assert got == fallback_answer(fallback, "deadline")
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + 1.5
    await srv.wait_idle()
    assert await ask(srv.socket, WHITELISTED.request) == WHITELISTED.answer


async def test_each_connection_gets_its_own_deadline(server_factory: ServerFactory) -> None:
    """One timer serves all deadlines: staggered slow clients are each answered at their own
    deadline, and a connection answered early does not move a later one's."""
    srv = await server_factory(
        server={"deadline": DEADLINE, "request_timeout": "10s"}, **GOLDEN_CONFIG
    )
    started = time.monotonic()
    answered_early = await Question.connect(srv.socket)  # the oldest: answered at once
    first = await Question.connect(srv.socket)
    await asyncio.sleep(DEADLINE / 2)
    second = await Question.connect(srv.socket)
    try:
        await answered_early.send(WHITELISTED.request)
        assert await answered_early.answer() == WHITELISTED.answer

        async def stall(question: Question) -> tuple[bytes, float]:
            await question.send(WHITELISTED.request[:20])
            async with asyncio.timeout(DEADLINE + 2):
                got = await question.answer(half_close=False)
            return got, time.monotonic() - started

        (got1, at1), (got2, at2) = await asyncio.gather(stall(first), stall(second))
    finally:
        for question in (answered_early, first, second):
            question.close()
    assert got1 == got2 == b"ok fallback deadline"
    assert DEADLINE * 0.9 <= at1 < DEADLINE * 1.4, at1
    # The second was accepted DEADLINE/2 later: answered that much later, not with the first.
    assert DEADLINE * 1.4 <= at2 < DEADLINE * 1.5 + 1.0, at2
    await srv.wait_idle()


async def test_garbage_gets_an_error_answer(server_factory: ServerFactory) -> None:
    srv = await server_factory(**GOLDEN_CONFIG)
    # No newline early in the garbage: the server would answer there and close on the rest.
    tls_hello = bytes.fromhex("160301020001000200fc0303") + bytes(range(0x80, 0x100))
    for garbage in (tls_hello, b"GET / HTTP/1.1\r\nHost: policyd\r\n\r\n", b"\x00" * 100):
        got = await ask(srv.socket, garbage)
        assert got.startswith(b"error bad request: "), garbage
        assert WELL_FORMED.fullmatch(got), got
    assert await ask(srv.socket, WHITELISTED.request) == WHITELISTED.answer


async def test_idle_connections_make_room_for_a_question(server_factory: ServerFactory) -> None:
    """At max_connections, the oldest connection that has asked nothing is closed to make
    room: a question still gets its real answer, however many idle clients hold the socket.
    Those kept get the deadline's fallback (request_timeout set above it here)."""
    allowed, deadline = 4, 0.5
    srv = await server_factory(
        server={"max_connections": allowed, "deadline": deadline, "request_timeout": "10s"},
        **GOLDEN_CONFIG,
    )
    idle_count = 3 * HARD_CONNECTION_FACTOR * allowed
    idle = [await Question.connect(srv.socket) for _ in range(idle_count)]
    try:
        await srv.wait_until_open(allowed)
        outcome = await _outcome(ask(srv.socket, WHITELISTED.request))
        idle_outcomes = await asyncio.gather(*(_outcome(q.answer(half_close=False)) for q in idle))
    finally:
        for question in idle:
            question.close()
    assert outcome == WHITELISTED.answer.decode()
    # The newest allowed - 1 idle ones stayed (one slot went to the question).
    assert idle_outcomes[-(allowed - 1) :] == ["ok fallback deadline"] * (allowed - 1)
    assert Counter(idle_outcomes[: -(allowed - 1)]) == Counter({"closed": idle_count - allowed + 1})
    await srv.wait_idle()


async def test_a_connection_that_asks_nothing_is_closed_at_the_request_timeout(
    server_factory: ServerFactory,
) -> None:
    """Idle or slow clients are closed at request_timeout, long before the deadline: with
    nothing asked, without an answer; with part of a request, with the fallback."""
    request_timeout = 0.1
    srv = await server_factory(
        server={"deadline": "5s", "request_timeout": request_timeout}, **GOLDEN_CONFIG
    )
    started = time.monotonic()
    idle = await Question.connect(srv.socket)
    slow = await Question.connect(srv.socket)
    try:
        await slow.send(WHITELISTED.request[:20])
        outcomes = await asyncio.gather(
            _outcome(idle.answer(half_close=False)), _outcome(slow.answer(half_close=False))
        )
        elapsed = time.monotonic() - started
    finally:
        idle.close()
        slow.close()
    assert outcomes == ["closed", "ok fallback request-timeout"]
    assert request_timeout * 0.9 <= elapsed < 2.0
    assert await ask(srv.socket, WHITELISTED.request) == WHITELISTED.answer
    await srv.wait_idle()


async def test_more_questions_than_allowed(tmp_path: Path) -> None:
    """With max_connections questions being answered, one more gets the fallback at once.
    Nothing hangs, and the server serves normally afterwards."""
    from policyd.config import from_mapping
    from policyd.server import PolicyServer

    allowed, extra = 4, 2
    release = asyncio.Event()

    async def answerer(request: bytes) -> bytes:
        if request.startswith(b"hold"):
            await release.wait()
        return b"ok answered"

    path = str(tmp_path / "busy.sock")
    config = from_mapping({"server": {"socket": path, "max_connections": allowed}}).server
    server = PolicyServer(config, answerer, lambda cause: b"ok fallback " + cause.encode())
    await server.start()
    held: list[Question] = []
    try:
        for count in range(1, allowed + 1):
            question = await Question.connect(path)
            held.append(question)
            await question.send(b"hold\n")
            async with asyncio.timeout(ANSWER_TIMEOUT):  # asked, not merely connected
                while len(server.open_connections) - len(server.unasked) < count:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
        outcomes = [await _outcome(ask(path, b"rcpt\n")) for _ in range(extra)]
        release.set()
        held_outcomes = await asyncio.gather(*(_outcome(q.answer(half_close=False)) for q in held))
        assert outcomes == ["ok fallback too-many-connections"] * extra
        assert held_outcomes == ["ok answered"] * allowed
        assert await ask(path, b"rcpt\n") == b"ok answered"
    finally:
        for question in held:
            question.close()
        await server.stop(drain_timeout=1.0)


async def _outcome(answer: Awaitable[bytes]) -> str:
    """The answer; "closed" for EOF without one; "reset" for a reset connection."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            got = await answer
    except ConnectionError:
        return "reset"
    if not got:
        return "closed"
    assert WELL_FORMED.fullmatch(got), got
    return got.decode()


async def test_clients_that_close_early_break_nothing(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    srv = await server_factory(server={"deadline": DEADLINE}, **GOLDEN_CONFIG)
    for partial in (b"", b"rcpt v=1 ip=", WHITELISTED.request):
        for _ in range(5):
            question = await Question.connect(srv.socket)
            await question.send(partial)
            question.close()  # without reading the answer, maybe before it is written
    await srv.wait_idle()
    assert await ask(srv.socket, WHITELISTED.request) == WHITELISTED.answer
    assert loop_errors == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- stop, TCP, uvloop ----------------------------------------------------------------------


async def test_stop_drains_a_question_in_flight(server_factory: ServerFactory) -> None:
    srv = await server_factory(server={"deadline": "5s"}, **GOLDEN_CONFIG)
    question = await Question.connect(srv.socket)
    try:
        await question.send(WHITELISTED.request[:20])
        await srv.wait_until_open(1)
        stopping = asyncio.create_task(srv.server.stop(drain_timeout=5))
        await asyncio.sleep(0.05)
        assert not stopping.done(), "stop() returned with a question in flight"
        assert not Path(srv.socket).exists(), "stop() keeps the socket file while draining"
        await question.send(WHITELISTED.request[20:])
        async with asyncio.timeout(2):
            assert await question.answer() == WHITELISTED.answer
            await stopping
    finally:
        question.close()


async def test_stop_cuts_questions_after_the_drain_timeout(server_factory: ServerFactory) -> None:
    srv = await server_factory(server={"deadline": "5s"}, **GOLDEN_CONFIG)
    question = await Question.connect(srv.socket)
    try:
        await question.send(WHITELISTED.request[:20])
        await srv.wait_until_open(1)
        async with asyncio.timeout(2):
            await srv.server.stop(drain_timeout=0.1)
            assert await question.answer(half_close=False) == b"ok fallback shutdown"
    finally:
        question.close()


async def test_tcp_listener_on_port_zero(server_factory: ServerFactory) -> None:
    srv = await server_factory(server={"socket": "", "tcp": "127.0.0.1:0"}, **GOLDEN_CONFIG)
    assert srv.server.tcp_port() not in (None, 0)
    rows = [row for row in GOLDEN_ROWS if answered_whole(row)]
    assert await replay(srv.tcp, rows[:20], chunk=7) == []
    assert await replay(srv.tcp, rows) == []


def test_same_server_on_uvloop(tmp_path: Path) -> None:
    """The daemon runs on uvloop when installed: its transports must behave the same."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[str]:
        sections = {**GOLDEN_CONFIG, "server": {"deadline": DEADLINE}}
        async with running_server(tmp_path, **sections) as srv:
            rows = [row for row in GOLDEN_ROWS if answered_whole(row)]
            wrong = await replay(srv.socket, rows, chunk=1)
            wrong += await replay(srv.socket, rows)
            wrong += await replay(
                srv.socket, [r for r in rows if newline_terminated(r)], half_close=False
            )
            question = await Question.connect(srv.socket)
            try:
                await question.send(b"rcpt v=1")
                got = await question.answer(half_close=False)
            finally:
                question.close()
            # request_timeout (250 ms by default) comes before the deadline (300 ms).
            if got != b"ok fallback request-timeout":
                wrong.append(f"request timeout: got {got!r}")
            return wrong

    assert uvloop.run(scenario()) == []


async def test_connect_and_close_probe_gets_no_answer_and_no_warning(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A health probe (connect, half-close without a byte) is not a malformed question."""
    caplog.set_level(logging.WARNING)
    srv = await server_factory(**GOLDEN_CONFIG)
    assert await ask(srv.socket, b"") == b""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert await ask(srv.socket, WHITELISTED.request) == WHITELISTED.answer
    await srv.wait_idle()


@pytest.mark.parametrize("failing", [False, True])
async def test_eager_answering_survives_a_check_that_suspends(
    tmp_path: Path, failing: bool
) -> None:
    """The question's first step runs inside the read callback; a check that suspends after
    all (a bare yield, then a DNS wait, say) is resumed by a Task when what it awaits is
    done, and a failure inside it still reaches the coroutine, which answers."""
    from policyd.config import from_mapping
    from policyd.server import PolicyServer

    async def answerer(request: bytes) -> bytes:
        await asyncio.sleep(0)  # a bare yield
        waiter = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, waiter.set_result, b"late")
        if failing:
            broken = asyncio.get_running_loop().create_future()
            broken.set_exception(RuntimeError("store trouble"))
            try:
                await broken
            except RuntimeError:
                return b"ok fallback internal-error"
        return b"ok " + await waiter

    config = from_mapping({"server": {"socket": str(tmp_path / "eager.sock")}}).server
    server = PolicyServer(config, answerer, lambda cause: b"ok fallback " + cause.encode())
    await server.start()
    try:
        expected = b"ok fallback internal-error" if failing else b"ok late"
        assert await ask(str(tmp_path / "eager.sock"), b"rcpt ip=192.0.2.1\n") == expected
    finally:
        await server.stop(drain_timeout=1.0)


async def test_deadline_cancels_a_suspended_question_like_a_task(tmp_path: Path) -> None:
    """A question suspended outside any task when the deadline passes: the client gets the
    fallback at the deadline, the future it awaited is cancelled and the coroutine gets
    CancelledError at its await (its cleanup runs), as Task.cancel would do."""
    from policyd.config import from_mapping
    from policyd.server import PolicyServer

    seen: list[str] = []
    awaited: list[asyncio.Future[bytes]] = []

    async def answerer(request: bytes) -> bytes:
        never = asyncio.get_running_loop().create_future()
        awaited.append(never)
        try:
            return await never
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    config = from_mapping(
        {"server": {"socket": str(tmp_path / "slow.sock"), "deadline": "0.2s"}}
    ).server
    server = PolicyServer(config, answerer, lambda cause: b"ok fallback " + cause.encode())
    await server.start()
    try:
        started = asyncio.get_running_loop().time()
        answer = await ask(str(tmp_path / "slow.sock"), b"rcpt ip=192.0.2.1\n")
        waited = asyncio.get_running_loop().time() - started
        assert answer == b"ok fallback deadline"
        assert 0.15 < waited < 1.0
        assert seen == ["cancelled"]
        assert awaited[0].cancelled()
    finally:
        await server.stop(drain_timeout=1.0)


async def test_a_question_cut_before_its_task_ran_is_cancelled_at_its_await() -> None:
    """The deadline (or shutdown) can come between a question's first step in the read
    callback and its Task's first step: the question is then cancelled there, as the Task
    would have done — the future it waits on cancelled, CancelledError at its await."""
    from policyd.server import _Resumed

    seen: list[str] = []
    never = asyncio.get_running_loop().create_future()

    async def question() -> bytes:
        try:
            return await never
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleanup")

    answering = question()
    rest = _Resumed(answering, answering.send(None))
    assert not rest.started
    rest.abandon()
    assert never.cancelled()
    assert seen == ["cancelled", "cleanup"]
    assert rest.started  # nothing left for a Task to take over


async def test_a_question_failing_after_it_suspended_gets_the_fallback(tmp_path: Path) -> None:
    """The dispatcher answers its own errors; should one escape after the question
    suspended (in its Task), the client still gets the fallback at once, not a hang."""
    from policyd.config import from_mapping
    from policyd.server import PolicyServer

    async def answerer(request: bytes) -> bytes:
        waiter = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(waiter.set_result, None)
        await waiter
        raise RuntimeError("a bug")

    config = from_mapping({"server": {"socket": str(tmp_path / "bug.sock")}}).server
    server = PolicyServer(config, answerer, lambda cause: b"ok fallback " + cause.encode())
    await server.start()
    try:
        started = asyncio.get_running_loop().time()
        answer = await ask(str(tmp_path / "bug.sock"), b"rcpt ip=192.0.2.1\n")
        assert answer == b"ok fallback internal-error"
        assert asyncio.get_running_loop().time() - started < 0.5  # not the 1 s deadline
    finally:
        await server.stop(drain_timeout=1.0)

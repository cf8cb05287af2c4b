"""Listeners: connection-per-question as Exim's ``${readsocket}`` does it.

A connection delivers one request, ended by the client's half-close (Exim) or by a newline
(interactive tools); the daemon writes the answer and closes. Four named limits protect it:
``max_request_bytes``, ``request_timeout`` (accept → request complete), ``deadline``
(accept → answer written) and ``max_connections``. A question over a limit still gets a
well-formed fallback answer, never a hang.

Connections that have not sent a complete request ("unasked") cannot starve real ones:
Exim writes its whole request right after connecting, so one that is still unasked after
``request_timeout`` is closed, and at ``max_connections`` the oldest unasked connection
makes room for a new one instead of the newcomer being refused (docs/decisions.md).

Uses the Protocol API rather than streams: per the design's measurements the streams layer
alone costs more than the whole question. A question's first step runs in the read callback
(``QuestionProtocol._start``; measured in docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from .config import ServerConfig
from .lograte import LogLimiter
from .sockets import (
    bind_error,
    prepare_directory,
    raise_file_limit,
    remove_stale_socket,
    set_group,
)

logger = logging.getLogger(__name__)

#: Connections beyond max_connections × this are closed on accept instead of answered.
HARD_CONNECTION_FACTOR = 2
#: How socket errors name the setting, e.g. "[server] socket_group".
SOCKET_KEY = "[server] socket"
#: A deadline this close (seconds) counts as passed when the deadline timer fires.
TIMER_SLACK = 0.001
#: File descriptors kept free beyond the connections (store, logs, admin and metrics
#: listeners, DNS sockets).
SPARE_FILES = 64

Answerer = Callable[[bytes], Coroutine[Any, Any, bytes]]
Fallback = Callable[[str], bytes]


@dataclass(slots=True)
class Limits:
    """The named per-connection limits, from ``[server]``."""

    deadline: float
    max_request_bytes: int
    max_connections: int
    request_timeout: float

    @classmethod
    def from_config(cls, config: ServerConfig) -> Limits:
        return cls(
            config.deadline,
            config.max_request_bytes,
            config.max_connections,
            config.request_timeout,
        )


class QuestionProtocol(asyncio.Protocol):
    """One connection, one question, one answer."""

    __slots__ = ("_buffer", "_done", "_rest", "_server", "_task", "_transport")

    def __init__(self, server: PolicyServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        #: The Task answering a question that suspended, and what it runs.
        self._task: asyncio.Task[None] | None = None
        self._rest: _Resumed | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self._transport = cast(asyncio.Transport, transport)
        server = self._server
        crowd = len(server.open_connections)
        if crowd >= server.limits.max_connections and server.unasked:
            # Full, partly with connections that have asked nothing yet: the oldest of
            # them makes room. Exim asks at once, so an unasked one is idle or slow.
            server.evict_oldest_unasked()
        elif crowd >= HARD_CONNECTION_FACTOR * server.limits.max_connections:
            # Far over the limit: shed at once so memory stays bounded; Exim then uses its
            # FAIL string (fail-open by default in our snippets).
            self._transport.close()
            return
        server.watch(self)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        limit = self._server.limits.max_request_bytes
        if not self._buffer:  # the usual case: the whole request in the first read
            newline = data.find(b"\n", 0, limit)
            if newline >= 0:
                self._start(data if newline == len(data) - 1 else data[: newline + 1])
                return
        self._buffer += data
        # The request is the first line; whatever follows its newline is ignored, so the
        # answer never depends on how the bytes were split into reads.
        newline = self._buffer.find(b"\n", 0, limit)
        if newline >= 0:
            self._start(bytes(self._buffer[: newline + 1]))
        elif len(self._buffer) > limit:
            self._server.warnings.warning(
                logger, "request over %d bytes; answering fallback", limit
            )
            self._finish_with(self._server.fallback("request-too-large"))

    def eof_received(self) -> bool:
        if not self._done:
            if not self._buffer:
                # Connect and close (a health probe): nothing was asked, nothing to answer.
                self._finish_with(b"")
                return True
            self._start(bytes(self._buffer))
        return True  # keep our write side open until the answer is out

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._server.connection_closed(self)

    def _start(self, request: bytes) -> None:
        self._done = True
        server = self._server
        server.unasked.pop(self, None)
        if len(server.open_connections) > server.limits.max_connections:
            self._write_close(server.fallback("too-many-connections"))
            return
        answering = server.answerer(request)
        # The question's first step runs here, in the read callback: with the embedded
        # store and cached DNS it completes without suspending and the answer is written
        # at once, without a Task or another loop turn. A Task per question cost 6-12 %
        # more CPU per question and 3-7 % fewer questions/s at 16 askers (docs/decisions.md,
        # "Questions start in the read callback"; bench/ab.py). Only the public coroutine
        # protocol is used. The one rule it imposes: up to its first suspension, nothing on
        # the question path may need asyncio.current_task() (no asyncio.timeout there).
        try:
            suspended_on = answering.send(None)
        except StopIteration as done:
            self._write_close(done.value)
            return
        except (Exception, asyncio.CancelledError):  # the dispatcher answers every error
            server.warnings.exception(logger, "question coroutine failed; answering fallback")
            self._write_close(server.fallback("internal-error"))
            return
        # Suspended (a Redis round trip, a DNS query): a Task runs the rest.
        self._rest = _Resumed(answering, suspended_on)
        self._task = server.loop.create_task(self._answer(self._rest))

    async def _answer(self, rest: _Resumed) -> None:
        try:
            answer = await rest
        except Exception:  # the dispatcher answers every error; a fallback if it did not
            self._server.warnings.exception(logger, "question coroutine failed; answering fallback")
            answer = self._server.fallback("internal-error")
        self._write_close(answer)

    def on_deadline(self) -> None:
        """The server's deadline check found this connection past its deadline."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # answered already; connection_lost is on its way
        server = self._server
        server.warnings.warning(
            logger, "deadline of %.3fs passed; answering fallback", server.limits.deadline
        )
        self._finish_with(server.fallback("deadline"))

    def drop_unasked(self, cause: str) -> None:
        """Close a connection that has not sent a complete request (request timeout, or
        evicted at max_connections). A partial request gets the fallback answer, so a
        client that was merely slow still reads a well-formed one; nothing asked, nothing
        answered."""
        transport = self._transport
        if self._done or transport is None or transport.is_closing():
            return
        self._finish_with(self._server.fallback(cause) if self._buffer else b"")

    def _finish_with(self, answer: bytes) -> None:
        self._done = True
        self._server.unasked.pop(self, None)
        task, rest = self._task, self._rest
        if task is not None and not task.done():
            task.cancel()  # reaches the question at its await, as for any Task
            if rest is not None and not rest.started:
                rest.abandon()  # the Task has not run yet: cancel the question here
        self._write_close(answer)

    def _write_close(self, answer: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(answer)
        transport.close()


class PolicyServer:
    """The listening sockets and the set of open connections, with start and drain."""

    def __init__(
        self,
        config: ServerConfig,
        answerer: Answerer,
        fallback: Fallback,
    ) -> None:
        self.config = config
        self.limits = Limits.from_config(config)
        self.answerer = answerer
        self.fallback = fallback
        #: Open connections → their deadline (loop time), in accept order: the deadline is
        #: the same for all, so the first entry is always the next one due.
        self.open_connections: dict[QuestionProtocol, float] = {}
        #: The open connections without a complete request yet → when their request time
        #: is up, in accept order too (so the first is also the oldest, evicted first).
        self.unasked: dict[QuestionProtocol, float] = {}
        #: Per-connection warnings, one line per kind per interval (policyd/lograte.py).
        self.warnings = LogLimiter()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bound_path = ""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _protocol(self) -> QuestionProtocol:
        self._idle.clear()
        return QuestionProtocol(self)

    def watch(self, proto: QuestionProtocol) -> None:
        """Start a connection's request time and deadline. One timer serves every
        connection: it is set for the earliest of the oldest unasked connection's request
        time and the oldest connection's deadline and, when it fires, handles those due and
        is set again for the next (a timer per connection costs more than the question)."""
        now = self.loop.time()
        due = now + self.limits.deadline
        self.open_connections[proto] = due
        asked_by = now + self.limits.request_timeout
        self.unasked[proto] = asked_by
        timer = self._deadline_timer
        if timer is None:
            self._deadline_timer = self.loop.call_at(min(due, asked_by), self._check_deadlines)
        elif asked_by < timer.when():
            # Set for a deadline while nothing was unasked: this request time comes first.
            # At most once per quiet spell: then the timer is at an earlier request time.
            timer.cancel()
            self._deadline_timer = self.loop.call_at(asked_by, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._deadline_timer = None
        # uvloop's timers count whole milliseconds and may fire up to one early.
        now = self.loop.time() + TIMER_SLACK
        for proto in _due(self.unasked, now):
            self._forget(proto)
            self.warnings.warning(
                logger,
                "connection sent no complete request within %.3fs; closed",
                self.limits.request_timeout,
            )
            proto.drop_unasked("request-timeout")
        for proto in _due(self.open_connections, now):
            proto.on_deadline()
        nexts = [next(iter(d.values())) for d in (self.unasked, self.open_connections) if d]
        if nexts:
            self._deadline_timer = self.loop.call_at(min(nexts), self._check_deadlines)

    def evict_oldest_unasked(self) -> None:
        """Close the oldest connection without a complete request, to make room."""
        proto = next(iter(self.unasked))
        self._forget(proto)
        self.warnings.warning(
            logger,
            "max_connections (%d) reached; closing the oldest connection that asked nothing",
            self.limits.max_connections,
        )
        proto.drop_unasked("too-many-connections")

    def _forget(self, proto: QuestionProtocol) -> None:
        """Stop counting a connection we are closing (its connection_lost comes later)."""
        self.unasked.pop(proto, None)
        self.connection_closed(proto)

    def connection_closed(self, proto: QuestionProtocol) -> None:
        self.open_connections.pop(proto, None)
        self.unasked.pop(proto, None)
        if not self.open_connections:
            self._idle.set()

    async def start(self, inherited: list[socket.socket] | None = None) -> None:
        """Bind (or adopt systemd's sockets) and start accepting."""
        self._loop = asyncio.get_running_loop()
        loop = self._loop
        raise_file_limit(HARD_CONNECTION_FACTOR * self.config.max_connections + SPARE_FILES)
        # The kernel backlog holds connections beyond max_connections until we can answer.
        backlog = max(128, self.config.max_connections)
        for sock in inherited or []:
            if sock.family == socket.AF_UNIX:
                srv = await loop.create_unix_server(self._protocol, sock=sock, backlog=backlog)
            else:
                srv = await loop.create_server(self._protocol, sock=sock, backlog=backlog)
            self._servers.append(srv)
        if not inherited and self.config.socket:
            self._servers.append(await self._bind_unix(Path(self.config.socket), backlog))
            self._bound_path = self.config.socket
        if not inherited and self.config.tcp:
            host, _, port = self.config.tcp.rpartition(":")
            srv = await loop.create_server(
                self._protocol, host.strip("[]"), int(port), backlog=backlog, reuse_address=True
            )
            self._servers.append(srv)
        for srv in self._servers:
            for sock in srv.sockets:
                logger.info("listening on %s", sock.getsockname() or self.config.socket)

    async def _bind_unix(self, path: Path, backlog: int) -> asyncio.Server:
        prepare_directory(path, self.config.socket_group, SOCKET_KEY)
        remove_stale_socket(path)
        try:
            srv = await self.loop.create_unix_server(self._protocol, str(path), backlog=backlog)
        except PermissionError as exc:
            raise bind_error(path, exc, SOCKET_KEY) from None
        os.chmod(path, self.config.socket_mode)
        if self.config.socket_group:
            set_group(path, self.config.socket_group, SOCKET_KEY)
        return srv

    def tcp_port(self) -> int | None:
        """The bound TCP port (useful when configured as port 0)."""
        for srv in self._servers:
            for sock in srv.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return None

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let open questions finish for ``drain_timeout``, then cut them."""
        for srv in self._servers:
            srv.close()
        # Only a socket we bound ourselves: an inherited (systemd) socket outlives us.
        if self._bound_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._bound_path)
        try:
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        except TimeoutError:
            logger.warning(
                "%d connections still open after drain; closing them", len(self.open_connections)
            )
            for proto in list(self.open_connections):
                proto._finish_with(self.fallback("shutdown"))  # own class: cut it short
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self.warnings.flush(all_windows=True)


#: ``_Resumed`` has handed its first value to the Task.
_TAKEN: Final = object()


class _Resumed(Generator[Any, Any, bytes]):
    """A question's coroutine after its first step ran in the read callback, as an
    awaitable for the Task that runs the rest. The Task first gets what the coroutine is
    suspended on (a future, or None for a bare yield), as if it had run that step itself,
    and waits for it; every later send or throw goes to the coroutine, so a cancel reaches
    the question at its await. Plain coroutine protocol (``send``/``throw``/``close``)."""

    __slots__ = ("_first", "coroutine")

    def __init__(self, coroutine: Coroutine[Any, Any, bytes], first: Any) -> None:
        self.coroutine = coroutine
        self._first = first

    @property
    def started(self) -> bool:
        """Has the Task taken over (received what the first step suspended on)?"""
        return self._first is _TAKEN

    def __await__(self) -> _Resumed:
        return self

    def send(self, value: Any) -> Any:
        first = self._first
        if first is _TAKEN:
            return self.coroutine.send(value)
        self._first = _TAKEN
        return first

    def throw(self, typ: Any, val: Any = None, _tb: Any = None) -> Any:
        self._first = _TAKEN
        return self.coroutine.throw(typ if val is None else val)

    def close(self) -> None:
        self.coroutine.close()

    def abandon(self) -> None:
        """Cancel the question before its Task ran, as ``Task.cancel`` would: the future
        it waits on is cancelled, the coroutine gets CancelledError at its await (its
        cleanup runs), then it is closed."""
        first, self._first = self._first, _TAKEN
        if asyncio.isfuture(first):
            first.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            self.coroutine.throw(asyncio.CancelledError())
        self.coroutine.close()


def _due(connections: dict[QuestionProtocol, float], now: float) -> list[QuestionProtocol]:
    """The connections due by ``now``: a prefix, since entries are in order of their time."""
    due = []
    for proto, when in connections.items():
        if when > now:
            break
        due.append(proto)
    return due

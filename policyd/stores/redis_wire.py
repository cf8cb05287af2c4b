"""The Redis store's own connection for its pipelines: RESP out, hiredis' public ``Reader`` in.

One single-node connection (TCP, TLS or Unix socket; for Sentinel, to the master the
sentinels name), opened here with asyncio and driven by callbacks: a pipeline goes out in
one ``transport.write``, ``data_received`` parses the replies with ``hiredis.Reader`` and
hands each pipeline its replies, in order, when the last one is in. No Task, stream or
await per pipeline or reply: that is what made the store ~10 % faster than redis-py's own
pipeline (docs/redis.md, measured side by side), and it needs nothing private of redis-py.

The handshake is what redis-py's connection sends for the URLs the store supports, in
RESP2 (which every Redis speaks, so no ``HELLO``): ``AUTH [user] password`` when the URL
has credentials, ``SELECT db`` when db is not 0. TLS: the same context redis-py builds
(the system's CAs plus ``[store] tls_ca_file``, the server's certificate checked against
the host name, an optional client certificate). Error replies become redis-py's public
exception classes by their first word (``ERROR_CLASSES``), so the store tells outages from
bad commands the same way whichever path (this one, or redis-py's for Cluster and admin
work) carried the command.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import hiredis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    InvalidResponse,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

if TYPE_CHECKING:
    from ..config import StoreConfig
    from .redis_url import RedisTarget

#: Error replies by their first word (the Redis error code), as redis-py's parsers map them,
#: for the codes a single node sends that the store tells apart (``is_outage``, NOSCRIPT);
#: any other code is a plain ResponseError. The message is kept whole, code included.
ERROR_CLASSES: Final[dict[str, type[Exception]]] = {
    "NOSCRIPT": NoScriptError,
    "READONLY": ReadOnlyError,
    "LOADING": BusyLoadingError,
    "MASTERDOWN": MasterDownError,
    "OOM": OutOfMemoryError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
    "NOPERM": NoPermissionError,
}

#: hiredis' "no complete reply buffered yet" (a reply may itself be None).
_MORE: Final = object()

#: Called with the wire, the token a pipeline was sent with, and its replies in order.
OnReplies = Callable[["RedisWire", Any, list[Any]], None]
#: Called once when the connection is lost (Redis closed it, or it broke).
OnLost = Callable[["RedisWire", BaseException], None]


def error_reply(message: str) -> Exception:
    """An error reply (``-CODE text``) as redis-py's exception for its code."""
    cls: type[Exception] = ERROR_CLASSES.get(message.split(" ", 1)[0], ResponseError)
    return cls(message)


def pack(commands: Sequence[tuple[str | bytes, ...]]) -> bytes:
    """Commands in RESP (``*N``, then ``$LEN`` and the bytes of each argument), all in one
    buffer for one write. Our arguments are only ``str`` (UTF-8) and ``bytes``; redis-py's
    general ``pack_commands`` costs about twice as much per batch."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg.encode() if isinstance(arg, str) else arg
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Pending:
    """A pipeline on the wire: how many replies it waits for, and those in so far."""

    __slots__ = ("count", "replies", "token")

    def __init__(self, token: Any, count: int) -> None:
        self.token = token
        self.count = count
        self.replies: list[Any] = []


class RedisWire(asyncio.Protocol):
    """One Redis connection: pipelines out, their replies handed back in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=error_reply, notEnoughData=_MORE
        )
        self.pending: deque[_Pending] = deque()
        #: False once closed or lost: nothing more is written to it.
        self.usable = True
        self._on_replies: OnReplies = _unexpected
        self._on_lost: OnLost = _ignore

    def attach(self, on_replies: OnReplies, on_lost: OnLost) -> None:
        """Hand the connection (past its handshake) to its user."""
        self._on_replies = on_replies
        self._on_lost = on_lost

    def send(self, token: Any, data: bytes, count: int) -> None:
        """Write ``count`` commands (``data``, in RESP); their replies go to ``on_replies``
        with ``token``."""
        assert self.transport is not None
        self.pending.append(_Pending(token, count))
        self.transport.write(data)

    def close(self) -> None:
        """Close at once (what is on the wire is abandoned: see ``tokens``)."""
        self.usable = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    def tokens(self) -> list[Any]:
        """The tokens of the pipelines still waiting for replies, oldest first; forgotten."""
        tokens = [pending.token for pending in self.pending]
        self.pending.clear()
        return tokens

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.usable:
            return
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        try:
            while (reply := reader.gets()) is not _MORE:
                if not pending:
                    raise InvalidResponse(f"reply with no command waiting: {reply!r:.80}")
                oldest = pending[0]
                oldest.replies.append(reply)
                if len(oldest.replies) == oldest.count:
                    pending.popleft()
                    self._on_replies(self, oldest.token, oldest.replies)
                    if not self.usable:  # closed on that pipeline's replies
                        return
        except InvalidResponse as exc:
            self._lost(exc)

    def eof_received(self) -> bool:
        return False  # Redis closed its side: close ours (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc or RedisConnectionError("connection closed by redis"))

    def _lost(self, cause: BaseException) -> None:
        was_usable = self.usable
        self.close()
        if was_usable or self.pending:
            self._on_lost(self, cause)

    # --- handshake ----------------------------------------------------------------------

    async def request(self, commands: Sequence[tuple[str | bytes, ...]]) -> list[Any]:
        """Send commands and wait for their replies (the handshake, before ``attach``)."""
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def replied(_wire: RedisWire, _token: Any, replies: list[Any]) -> None:
            if not done.done():
                done.set_result(replies)

        def lost(_wire: RedisWire, cause: BaseException) -> None:
            if not done.done():
                done.set_exception(cause)

        self.attach(replied, lost)
        self.send(None, pack(commands), len(commands))
        try:
            return await done
        finally:
            self.attach(_unexpected, _ignore)


def _unexpected(wire: RedisWire, _token: Any, replies: list[Any]) -> None:
    wire._lost(InvalidResponse(f"replies with no command waiting: {replies!r:.80}"))


def _ignore(_wire: RedisWire, _cause: BaseException) -> None:
    pass


def tls_context(config: StoreConfig) -> ssl.SSLContext:
    """What redis-py builds for ``rediss://`` with ``ssl_ca_certs``/``ssl_certfile``/
    ``ssl_keyfile``: the system's CAs plus ours, the host name checked, CERT_REQUIRED."""
    context = ssl.create_default_context()
    if config.tls_cert_file or config.tls_key_file:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file or None)
    if config.tls_ca_file:
        context.load_verify_locations(cafile=config.tls_ca_file)
    return context


def handshake(target: RedisTarget) -> list[tuple[str, ...]]:
    """The commands a new connection sends before any pipeline (redis-py's, in RESP2)."""
    commands: list[tuple[str, ...]] = []
    if target.username or target.password is not None:
        credentials = (target.username,) if target.username else ()
        commands.append(("AUTH", *credentials, target.password or ""))
    if target.db:
        commands.append(("SELECT", str(target.db)))
    return commands


async def open_wire(
    target: RedisTarget,
    address: str | tuple[str, int],
    tls: ssl.SSLContext | None,
    on_replies: OnReplies,
    on_lost: OnLost,
) -> RedisWire:
    """A connection to ``address`` (a Unix socket path, or host and port), past its
    handshake; the caller bounds the time it may take."""
    loop = asyncio.get_running_loop()
    if isinstance(address, str):
        _, wire = await loop.create_unix_connection(RedisWire, address)
    else:
        host, port = address
        _, wire = await loop.create_connection(RedisWire, host, port, ssl=tls)
    try:
        commands = handshake(target)
        if commands:
            for command, reply in zip(commands, await wire.request(commands), strict=True):
                if isinstance(reply, Exception):  # as redis-py: both end the connection
                    refused = AuthenticationError if command[0] == "AUTH" else RedisConnectionError
                    raise refused(f"{command[0]} refused: {reply}")
    except BaseException:
        wire.close()
        raise
    wire.attach(on_replies, on_lost)
    return wire

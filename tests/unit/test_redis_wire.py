"""The Redis store's own connection, without a server: the handshake each URL form sends,
and error replies as redis-py's exception classes (which tell an outage from a bad command).
The connection itself runs against a real redis-server in tests/integration/redis_store/."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from policyd.stores.redis_store import is_outage
from policyd.stores.redis_url import parse_url
from policyd.stores.redis_wire import RedisWire, error_reply, handshake, pack


@pytest.mark.parametrize(
    ("reply", "cls", "outage"),
    [
        ("NOSCRIPT No matching script. Please use EVAL.", NoScriptError, False),
        ("READONLY You can't write against a read only replica.", ReadOnlyError, True),
        ("LOADING Redis is loading the dataset in memory", BusyLoadingError, True),
        (
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            MasterDownError,
            True,
        ),
        ("OOM command not allowed when used memory > 'maxmemory'.", OutOfMemoryError, True),
        ("BUSY Redis is busy running a script.", ResponseError, True),
        ("NOAUTH Authentication required.", AuthenticationError, True),
        (
            "WRONGPASS invalid username-password pair or user is disabled.",
            AuthenticationError,
            True,
        ),
        ("NOPERM User mx has no permissions to run the 'select' command", NoPermissionError, False),
        ("ERR user_script:1: Script attempted to access nonexistent global", ResponseError, False),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", ResponseError, False),
        ("", ResponseError, False),
    ],
)
def test_error_replies_become_redis_py_exceptions(
    reply: str, cls: type[Exception], outage: bool
) -> None:
    error = error_reply(reply)
    assert type(error) is cls
    assert str(error) == reply  # the whole reply, its code included, for the logs
    assert is_outage(error) is outage


@pytest.mark.parametrize(
    ("url", "commands"),
    [
        ("unix:///run/redis/redis.sock", []),
        ("redis://127.0.0.1", []),
        ("redis://127.0.0.1/0", []),
        ("unix:///run/redis.sock?db=4", [("SELECT", "4")]),
        ("redis://:s3cret@127.0.0.1/2", [("AUTH", "s3cret"), ("SELECT", "2")]),
        ("rediss://mx:p%40ss@127.0.0.1", [("AUTH", "mx", "p@ss")]),
        (
            "redis+sentinel://mx:pw@127.0.0.1/svc/1?sentinel_password=x",
            [("AUTH", "mx", "pw"), ("SELECT", "1")],
        ),
    ],
)
def test_the_handshake_is_redis_py_s_in_resp2(url: str, commands: list[tuple[str, ...]]) -> None:
    """AUTH [user] password when the URL has credentials, SELECT when db is not 0 (the
    sentinels' own password is redis-py's business, not this connection's)."""
    assert handshake(parse_url(url)) == commands


async def test_replies_go_to_their_pipeline_in_order_across_reads() -> None:
    """Replies split anywhere between reads still reach the pipeline they answer, each when
    its last reply is in; an error reply is one reply, not a failure of the connection."""
    got: list[tuple[object, list[object]]] = []
    lost: list[BaseException] = []
    ours, theirs = socket.socketpair()
    _, wire = await asyncio.get_running_loop().create_unix_connection(RedisWire, sock=ours)
    try:
        wire.attach(lambda _w, token, replies: got.append((token, replies)), lost_to(lost))
        wire.send("first", pack([("EVALSHA", "x", "0"), ("EVALSHA", "y", "0")]), 2)
        wire.send("second", pack([("GET", "a"), ("GET", "b")]), 2)
        stream = b"*2\r\n:1\r\n$1\r\nx\r\n-NOSCRIPT gone\r\n:7\r\n$-1\r\n"
        first_done = stream.index(b"gone\r\n") + 5  # the first pipeline's last byte
        for i in range(len(stream) - 1):  # one byte per read
            wire.data_received(stream[i : i + 1])
            assert len(got) == (i >= first_done)
        wire.data_received(stream[-1:])
        assert [token for token, _ in got] == ["first", "second"]
        assert got[0][1][0] == [1, b"x"]
        assert isinstance(got[0][1][1], NoScriptError)
        assert got[1][1] == [7, None]
        # A reply nobody asked for: the connection is dropped, its user told once.
        wire.data_received(b":1\r\n")
        assert not wire.usable and len(lost) == 1
    finally:
        wire.close()
        theirs.close()


def lost_to(seen: list[BaseException]) -> Callable[[RedisWire, BaseException], None]:
    return lambda _wire, cause: seen.append(cause)

"""The Redis store in-process against a private redis-server: key layout and TTLs, batching,
script reload, hashing, credentials and TLS, and failure behaviour with the breaker."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from support.redis_server import free_port, make_certificates

from policyd.checks.greylist import Status, Timing
from policyd.checks.ratelimit import Charge, Limit
from policyd.stores import StoreUnavailable, open_store
from policyd.stores.breaker import BreakerState
from policyd.stores.keys import HashedStore
from policyd.stores.redis_scripts import GREYLIST_STEP
from policyd.stores.redis_store import (
    GATHER_BATCH,
    GATHER_WAIT,
    RedisStore,
    _timing_arguments,
    greylist_resp,
    is_outage,
    pack,
)
from policyd.whitelist import ListEntry

from .conftest import RedisLab, StoreOpener, store_config

pytestmark = pytest.mark.redis

#: The commands docs/redis.md says a restricted ACL user needs.
ACL_COMMANDS = tuple(
    f"+{c}"
    for c in [
        "evalsha",
        "eval",
        "script|load",
        "hmget",
        "hset",
        "hdel",
        "hgetall",
        "mget",
        "set",
        "pexpire",
        "scan",
        "del",
        "incrby",
        "get",
    ]
)
T = Timing(delay=300, retry_window=2 * 86400, max_age=35 * 86400, auto_whitelist_after=2)
T0 = 1_700_000_000.0
NET = "192.0.2.0/24"


def key(rcpt: str, net: str = NET, sender: str = "a@example.net") -> str:
    return f"{net}|{sender}|{rcpt}"


async def test_every_key_has_a_ttl_and_the_documented_layout(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    server = redis_lab.server()
    store = await open_redis_store(server.url, prefix="mx")
    k = key("b@example.org")
    await store.greylist_step(k, NET, T0, T, False)
    await store.greylist_step(k, NET, T0 + 301, T, False)
    await store.ratelimit_step([Charge("r", "r|192.0.2.1", 1, Limit(10, 60, 10), False)], T0)
    await store.admin.list_add(ListEntry("client", "203.0.113.0/24"))
    with server.client() as client:
        keys = sorted(k.decode() for k in client.keys("*"))
        assert keys == [
            "mx:c:{192.0.2.0/24}",
            "mx:r:{rate}r|192.0.2.1",
            "mx:t:{192.0.2.0/24}|a@example.net|b@example.org",
            "mx:{wl}",
            "mx:{wl}:version",
        ]
        ttls = {k: client.pttl(k) for k in keys}
    assert ttls.pop("mx:{wl}") == -1  # the whitelist: entries carry their own expiry
    assert ttls.pop("mx:{wl}:version") == -1
    max_age_ms = T.max_age * 1000
    assert max_age_ms - 1000 < ttls["mx:t:{192.0.2.0/24}|a@example.net|b@example.org"] <= max_age_ms
    assert max_age_ms - 1000 < ttls["mx:c:{192.0.2.0/24}"] <= max_age_ms
    assert 0 < ttls["mx:r:{rate}r|192.0.2.1"] <= 6000


async def counting_pipelines(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> tuple[RedisStore, list[int]]:
    """A connected store on a server of its own, and the questions per pipeline it writes
    from now on."""
    server = redis_lab.server()
    store = await open_redis_store(server.url)
    assert isinstance(store, RedisStore)
    await store.greylist_step(key("warm@example.org"), NET, T0, T, False)  # connected
    sent: list[int] = []
    write = store._write

    def counting(wire: Any, batch: Any) -> None:
        sent.append(len(batch.calls))
        write(wire, batch)

    store._write = counting  # type: ignore[method-assign]
    return store, sent


async def test_questions_in_one_tick_share_a_pipeline(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    store, sent = await counting_pipelines(redis_lab, open_redis_store)
    results = await asyncio.gather(
        *(store.greylist_step(key(f"r{i}@example.org"), NET, T0, T, False) for i in range(300))
    )
    assert all(r.status is Status.NEW for r in results)
    assert sum(sent) == 300
    assert len(sent) <= 2  # 256 per pipeline at most
    assert store.pending == 0


async def test_questions_still_coming_are_gathered_into_one_pipeline(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    store, sent = await counting_pipelines(redis_lab, open_redis_store)
    # One new question per loop turn, as they come from separate connections.
    tasks = []
    for i in range(GATHER_BATCH):
        tasks.append(asyncio.ensure_future(store.greylist_step(key(f"g{i}"), NET, T0, T, False)))
        await asyncio.sleep(0)
    assert all(r.status is Status.NEW for r in await asyncio.gather(*tasks))
    assert sent == [GATHER_BATCH]
    # A lone question is not held back for company that never comes.
    sent.clear()
    started = time.perf_counter()
    await store.greylist_step(key("alone@example.org"), NET, T0, T, False)
    assert sent == [1]
    assert time.perf_counter() - started < GATHER_WAIT + 0.05


async def test_a_late_reply_is_never_taken_for_a_later_question(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    server = redis_lab.server()
    store = await open_redis_store(server.url, timeout="400ms", breaker_failures=5)
    seen = key("seen@example.org")
    assert (await store.greylist_step(seen, NET, T0, T, False)).status is Status.NEW
    sleeper = threading.Thread(
        target=lambda: server.client().execute_command("DEBUG", "SLEEP", "0.6"), daemon=True
    )
    sleeper.start()
    for attempt in range(100):  # until a question meets the sleeping Redis
        try:
            await store.greylist_step(key(f"fresh{attempt}@example.org"), NET, T0, T, False)
        except StoreUnavailable as exc:
            assert "no reply within" in str(exc)
            break
        await asyncio.sleep(0.01)
    # Asked at once, before Redis wakes: the timed-out question's reply (a fresh key,
    # nothing found: NEW) comes first, but this question must get its own: EARLY.
    assert (await store.greylist_step(seen, NET, T0 + 10, T, False)).status is Status.EARLY
    assert store.pending == 0
    sleeper.join()


async def test_script_cache_flush_is_transparent(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    server = redis_lab.server()
    store = await open_redis_store(server.url)
    await store.greylist_step(key("b@example.org"), NET, T0, T, False)
    with server.client() as client:
        client.script_flush()
    early = await store.greylist_step(key("b@example.org"), NET, T0 + 10, T, False)
    assert early.status is Status.EARLY
    with server.client() as client:
        assert client.script_exists(GREYLIST_STEP.sha) == [True]  # cached again by the EVAL


async def test_hashed_keys_reveal_nothing_and_admin_still_works(
    redis_lab: RedisLab, open_redis_store: StoreOpener, tmp_path: Path
) -> None:
    server = redis_lab.server()
    secret = tmp_path / "secret"
    secret.write_text("a site secret of some length\n")
    store = await open_redis_store(server.url, hash_secret_file=str(secret))
    assert isinstance(store, HashedStore)
    k = key("bob@example.org", sender="alice@example.net")
    await store.greylist_step(k, NET, T0, T, False)
    assert (await store.greylist_step(k, NET, T0 + 301, T, False)).status is Status.PASSED
    with server.client() as client:
        dump = b" ".join(client.keys("*"))
    assert b"example" not in dump and b"192.0.2" not in dump
    rows = await store.admin.greylist_scan([NET, "alice@example.net", None], 10)
    assert len(rows) == 1 and rows[0][1].passed
    assert await store.admin.greylist_delete([rows[0][0]]) == 1
    triplet, client_state = await store.admin.greylist_peek(k, NET)
    assert triplet is None and client_state is not None and client_state.passes == 1


async def test_sqlite_hashes_keys_too(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = await open_store(
        store_config(f"sqlite://{path}", hash_secret="a site secret of some length")
    )
    try:
        await store.greylist_step(key("bob@example.org"), NET, T0, T, False)
    finally:
        await store.aclose()
    assert b"example.org" not in path.read_bytes()


async def test_acl_user_and_password(
    redis_lab: RedisLab, open_redis_store: StoreOpener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = redis_lab.server(
        tcp=True,
        # The test harness keeps the password-less default user; the store logs in as mx,
        # with the keys and commands docs/redis.md lists and nothing more.
        options=("--user", "mx", "on", ">s3cret-pw", "~policyd:*", "-@all", *ACL_COMMANDS),
    )
    good = f"redis://mx:s3cret-pw@127.0.0.1:{server.port}/0"
    store = await open_redis_store(good)
    assert (await store.greylist_step(key("b@x.org"), NET, T0, T, False)).status is Status.NEW
    await store.admin.list_add(ListEntry("client", "203.0.113.0/24"))
    assert len(await store.admin.list_entries()) == 1
    assert len(await store.admin.greylist_scan([NET, None, None], 10)) == 1
    assert await store.admin.greylist_delete([key("b@x.org")]) == 1
    await store.ratelimit_step([Charge("r", "r|k", 1, Limit(10, 60, 10), False)], T0)
    assert await store.admin.ratelimit_peek(["r|k"]) != [None]
    with pytest.raises(StoreUnavailable):
        await open_redis_store(f"redis://mx:wrong-pw@127.0.0.1:{server.port}/0")
    assert "s3cret-pw" not in caplog.text and "wrong-pw" not in caplog.text
    assert "mx:***@" in caplog.text


async def test_tls_with_a_private_ca(
    redis_lab: RedisLab, open_redis_store: StoreOpener, tmp_path: Path
) -> None:
    tls = make_certificates(tmp_path)
    port = free_port()
    server = redis_lab.server("tls", options=tls.server_options(port))
    assert server.answers()
    store = await open_redis_store(f"rediss://127.0.0.1:{port}", tls_ca_file=str(tls.ca))
    assert (await store.greylist_step(key("b@x.org"), NET, T0, T, False)).status is Status.NEW
    with pytest.raises(StoreUnavailable):  # not trusted without the CA
        await open_redis_store(f"rediss://127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (RedisConnectionError("Error 111 connecting"), True),
        (RedisTimeoutError("Timeout reading"), True),
        (BusyLoadingError("Redis is loading the dataset in memory"), True),
        (ReadOnlyError("You can't write against a read only replica."), True),
        (ClusterDownError("The cluster is down"), True),
        (ResponseError("BUSY Redis is busy running a script."), True),
        (ResponseError("MASTERDOWN Link with MASTER is down"), True),
        (TimeoutError(), True),
        (ResponseError("ERR user_script:1: Script attempted to access nonexistent global"), False),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
    ],
)
def test_outage_errors_are_told_from_bad_commands(error: Exception, outage: bool) -> None:
    assert is_outage(error) is outage


def test_pipeline_packing_matches_redis_py() -> None:
    """The store packs its pipelines itself (cheaper); the bytes are redis-py's."""
    from redis.asyncio.connection import Connection

    commands: list[tuple[str | bytes, ...]] = [
        ("EVALSHA", GREYLIST_STEP.sha, "2", b"p:t:{192.0.2.0/24}|a@b|c@d", b"p:c:{x}", "0.5"),
        ("EVAL", "return 1", "1", "p:t:{\u00e9\u6f22}|\u00fc@b|", ""),
        ("PING",),
    ]
    expected = b"".join(Connection().pack_commands(commands))
    assert pack(commands) == expected
    # A greylisting call, encoded with its fixed parts prepared once, is the same bytes.
    keys = (b"p:t:{192.0.2.0/24}|a@b|\xc3\xa9@d", b"p:c:{192.0.2.0/24}")
    timing_args, timing_resp = _timing_arguments(T)
    for force in ("0", "1"):
        command = ("EVALSHA", GREYLIST_STEP.sha, "2", *keys, "1700000000.25", *timing_args, force)
        assert greylist_resp(keys, "1700000000.25", timing_resp, force) == b"".join(
            Connection().pack_commands([command])
        )


async def test_redis_killed_fails_fast_then_recovers(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    server = redis_lab.server()
    store = await open_redis_store(server.url, timeout="200ms", breaker_reset="300ms")
    assert isinstance(store, RedisStore)
    server.kill()
    failures = 0
    started = time.perf_counter()
    for round_ in range(20):
        outcomes = await asyncio.gather(
            *(
                store.greylist_step(key(f"r{round_}-{i}@x.org"), NET, T0, T, False)
                for i in range(50)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(o, StoreUnavailable) for o in outcomes)
        failures += len(outcomes)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{failures} questions took {elapsed:.3f}s against a dead Redis"
    assert store.breaker.state is BreakerState.OPEN
    assert store.unavailable == failures
    assert store.pending == 0  # nothing queued behind a dead server
    # While open, a question is refused without any I/O.
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="circuit open"):
        await store.greylist_step(key("x@x.org"), NET, T0, T, False)
    assert time.perf_counter() - started < 0.001
    server.start()
    deadline = time.monotonic() + 5
    while True:
        try:
            result = await store.greylist_step(key("back@x.org"), NET, T0, T, False)
        except StoreUnavailable:
            assert time.monotonic() < deadline, "no recovery within 5 s"
            await asyncio.sleep(0.05)
        else:
            break
    assert result.status is Status.NEW
    assert store.breaker.state is BreakerState.CLOSED


async def test_a_sleeping_redis_costs_one_timeout_then_the_breaker_answers(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    server = redis_lab.server()
    store = await open_redis_store(
        server.url, timeout="150ms", breaker_failures=1, breaker_reset="5s"
    )
    sleeper = threading.Thread(
        target=lambda: server.client().execute_command("DEBUG", "SLEEP", "1"), daemon=True
    )
    sleeper.start()
    await asyncio.sleep(0.1)
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable):
        await store.greylist_step(key("b@x.org"), NET, T0, T, False)
    assert 0.1 < time.perf_counter() - started < 0.3
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="circuit open"):
        await store.greylist_step(key("c@x.org"), NET, T0, T, False)
    assert time.perf_counter() - started < 0.005
    sleeper.join()


async def test_busy_script_is_an_outage(redis_lab: RedisLab, open_redis_store: StoreOpener) -> None:
    server = redis_lab.server(options=("--busy-reply-threshold", "50"))
    store = await open_redis_store(server.url, timeout="400ms")
    # Spins for up to 5 s; SCRIPT KILL below ends it.
    spin = "local s = redis.call('TIME')[1]; while redis.call('TIME')[1] - s < 5 do end"
    outcome: list[BaseException] = []

    def busy() -> None:
        with server.client() as client:
            try:
                client.eval(spin, 0)
            except redis.RedisError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    await asyncio.sleep(0.15)
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="BUSY"):
        await store.greylist_step(key("b@x.org"), NET, T0, T, False)
    # The BUSY reply is the answer (the match above), not the 400 ms budget running out:
    # well under it, though a new connection's handshake meets Redis answering other
    # clients only between slices of the running script (130 ms seen on a loaded machine).
    assert time.perf_counter() - started < 0.3
    with server.client() as client:
        client.script_kill()
    thread.join()
    assert outcome and "killed" in str(outcome[0]).lower()
    assert (await store.greylist_step(key("b@x.org"), NET, T0, T, False)).status is Status.NEW


async def test_questions_go_to_the_database_the_url_names(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    """The store's own connection selects the URL's database, as redis-py's does."""
    server = redis_lab.server()
    store = await open_redis_store(f"{server.url}?db=3")
    assert (await store.greylist_step(key("b@x.org"), NET, T0, T, False)).status is Status.NEW
    with server.client(db=3) as client:
        assert client.exists(f"policyd:t:{{{NET}}}|a@example.net|b@x.org") == 1
    with server.client() as client:
        assert client.dbsize() == 0


async def test_a_login_refused_on_reconnect_is_an_outage(
    redis_lab: RedisLab, open_redis_store: StoreOpener
) -> None:
    """The password changed under a running daemon: its next connection is refused at AUTH,
    which is answered like Redis being down (the fallback, the breaker), never as a bad
    command, and the password is not in the error."""
    server = redis_lab.server(
        tcp=True, options=("--user", "mx", "on", ">s3cret-pw", "~policyd:*", "-@all", *ACL_COMMANDS)
    )
    store = await open_redis_store(f"redis://mx:s3cret-pw@127.0.0.1:{server.port}")
    assert isinstance(store, RedisStore)
    assert (await store.greylist_step(key("b@x.org"), NET, T0, T, False)).status is Status.NEW
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "mx", "resetpass", ">another-pw")
        admin.execute_command("CLIENT", "KILL", "USER", "mx")
    await asyncio.sleep(0.05)  # the store sees its connection closed
    with pytest.raises(StoreUnavailable, match="AUTH refused: WRONGPASS") as refused:
        await store.greylist_step(key("c@x.org"), NET, T0, T, False)
    assert "s3cret-pw" not in str(refused.value)
    assert store.breaker.consecutive_failures == 1

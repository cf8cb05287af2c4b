"""The Redis store: greylist and rate state shared by several MX hosts (docs/redis.md).

One class for every deployment: a single server (TCP, TLS or Unix socket), Sentinel or
Cluster, as its URL says (``redis_url``). Each question is one EVALSHA of a Lua script
(``redis_scripts``), so a read-modify-write is atomic and costs one round trip.

Auto-batching: questions that arrive in the same loop iteration are queued, and a
``call_soon`` callback sends them as one pipeline (like the embedded store's group commit).
One pipeline is on the wire at a time (``MAX_IN_FLIGHT``); while it is, new questions
gather into the next one, so under load batches grow instead of round trips multiplying.
That is what the daemon's CPU, not Redis, limits: at 16 concurrent askers one pipeline in
flight gave ~30% more questions/s than four (docs/redis.md). The queue is bounded by the
questions the server admits (``[server] max_connections``).

Failure: every round trip has a budget (``[store] timeout``); connection refused, timeouts,
``-BUSY``/``-LOADING``/``-READONLY``/``-MASTERDOWN``/``-CLUSTERDOWN`` become
``StoreUnavailable`` (the dispatcher answers the fallback). After ``breaker_failures``
failed round trips in a row the circuit opens and questions fail in microseconds; a probe
goes through every ``breaker_reset`` seconds and closes it when Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Final, TypeVar

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..checks.greylist import Step, Timing, step
from ..checks.ratelimit import Charge, Decision, decide_all
from ..config import StoreConfig
from ..memo import IdentityMemo
from . import StoreUnavailable
from .breaker import CircuitBreaker
from .redis_admin import RedisAdmin, client_of, triplet_of
from .redis_scripts import GREYLIST_STEP, RATELIMIT_STEP, SCRIPTS, KeyLayout, Script
from .redis_url import RedisTarget, build_client, mask_url, parse_url

logger = logging.getLogger(__name__)

#: Pipelines on the wire at once (one connection each); more only made batches smaller.
MAX_IN_FLIGHT: Final = 1
#: Distinct Timing objects whose script arguments are kept (few exist; a bound all the same).
MAX_TIMINGS_CACHED: Final = 64
#: Questions in one pipeline at most; more wait for the next one.
MAX_BATCH: Final = 256
#: Errors that mean "Redis cannot serve now" (not "this command is wrong"): unreachable,
#: timing out, loading (-LOADING is a ConnectionError in redis-py), a replica or a master
#: without its link during failover, a cluster reconfiguring, memory full.
OUTAGE_ERRORS: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    OSError,
    RedisClusterException,
    ReadOnlyError,
    MasterDownError,
    ClusterDownError,
    TryAgainError,
    MovedError,
    AskError,
    OutOfMemoryError,
)
#: Error replies redis-py leaves as plain ResponseError, told by their first word.
OUTAGE_REPLIES: Final = ("BUSY", "NOREPLICAS", "MASTERDOWN", "LOADING", "READONLY")
_T = TypeVar("_T")


def is_outage(exc: BaseException) -> bool:
    """Does this error say Redis is unreachable or not serving (vs. a bad command)?"""
    if isinstance(exc, OUTAGE_ERRORS):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(OUTAGE_REPLIES)


class _Call:
    """One queued script call and the future its question awaits."""

    __slots__ = ("args", "future", "keys", "queued", "script")

    def __init__(
        self, script: Script, keys: Sequence[bytes], args: Sequence[str], loop: Any
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.future: asyncio.Future[Any] = loop.create_future()
        #: Loop time it was queued: its time budget runs from here, queueing included.
        self.queued: float = loop.time()

    def command(self, by_body: bool = False) -> tuple[str | bytes, ...]:
        name, ref = ("EVAL", self.script.body) if by_body else ("EVALSHA", self.script.sha)
        return (name, ref, str(len(self.keys)), *self.keys, *self.args)


def _timing_arguments(timing: Timing) -> tuple[str, ...]:
    """GREYLIST_STEP's ARGV[2..5]: the delays and the auto-whitelist threshold."""
    return (
        repr(float(timing.delay)),
        repr(float(timing.retry_window)),
        repr(float(timing.max_age)),
        str(int(timing.auto_whitelist_after)),
    )


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


class RedisStore(RedisAdmin):
    """Greylist, rate and whitelist state in Redis (single, TLS, Unix, Sentinel, Cluster)."""

    def __init__(
        self,
        target: RedisTarget,
        config: StoreConfig,
        *,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.target = target
        self.config = config
        self.timeout = config.timeout
        self.layout = KeyLayout(config.prefix)
        self.name = f"redis store {mask_url(config.url)}"
        self.breaker = breaker or CircuitBreaker(
            config.breaker_failures, config.breaker_reset, name=self.name
        )
        #: Questions refused with StoreUnavailable (each answered with the fallback).
        self.unavailable = 0
        self.client: Any = None
        self._pending: list[_Call] = []
        # The same few Timing objects come every time (greylisting's own, one per SPF
        # softfail delay): their script arguments are formatted once.
        self._timing_args = IdentityMemo(_timing_arguments, MAX_TIMINGS_CACHED)
        self._flush_scheduled = False
        self._in_flight = 0
        self._sending = 0
        self._idle: list[Any] = []  # connections of finished batches (not for Cluster)
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, config: StoreConfig) -> RedisStore:
        return cls(parse_url(config.url), config)

    @property
    def pending(self) -> int:
        """Questions queued or on the wire (bounded; exposed for tests and metrics)."""
        return len(self._pending) + self._sending

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, load the scripts (on every Cluster master) and prove Redis answers."""
        self.client = build_client(self.target, self.config)
        try:
            async with asyncio.timeout(max(self.timeout, 1.0) * 4):
                for script in SCRIPTS:
                    sha = await self.client.script_load(script.body)
                    loaded = sha.decode() if isinstance(sha, bytes) else str(sha)
                    if loaded != script.sha:
                        raise StoreUnavailable(f"{script.name}: Redis computed SHA {loaded}")
        except StoreUnavailable:
            await self.aclose()
            raise
        except Exception as exc:
            await self.aclose()
            raise StoreUnavailable(f"{self.name}: {exc}") from exc
        logger.info("%s ready (%s)", self.name, self.target.mode)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail(self._pending, "redis store closed")
        self._pending = []
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()
            # Sentinel: the connections to the sentinels themselves.
            manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                await sentinel.aclose()

    # --- questions ----------------------------------------------------------------------

    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step:
        timing_args = self._timing_args(timing)
        found = await self._eval(
            GREYLIST_STEP,
            (self.layout.triplet(triplet_key), self.layout.client(client_key)),
            (repr(float(now)), *timing_args, "1" if force_pass else "0"),
        )
        return step(triplet_of(found[:4]), client_of(found[4:]), now, timing, force_pass=force_pass)

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]:
        """All charges of one question in one script: admitted together or not at all."""
        if not charges:
            return []
        args = [repr(float(now))]
        for c in charges:
            limit = c.limit
            args += [str(c.cost), repr(limit.interval), str(limit.burst), "1" if c.dry_run else "0"]
        found = await self._eval(RATELIMIT_STEP, [self.layout.rate(c.key) for c in charges], args)
        states = [None if v is None else float(v) for v in found]
        decisions, _ = decide_all(states, charges, now)
        return decisions

    async def stats(self, auto_whitelist_after: int) -> dict[str, float]:
        """Cheap figures only: counting clients would need a scan of the whole keyspace."""
        breaker = self.breaker
        return {
            "unavailable": float(self.unavailable),
            "breaker_open": float(not breaker.is_closed),
            "breaker_opened": float(breaker.opened),
            "breaker_rejected": float(breaker.rejected),
        }

    # --- batching -----------------------------------------------------------------------

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Queue one script call for the next pipeline and wait for its reply."""
        if self.client is None:
            raise StoreUnavailable("redis store is not started")
        if not self.breaker.allow():
            self.unavailable += 1
            raise StoreUnavailable(f"circuit open, next probe in {self.breaker.retry_in():.2f}s")
        loop = asyncio.get_running_loop()
        # Encoded here, so a key that cannot be encoded fails its own question, not a batch.
        encoded = [key.encode() for key in keys]
        call = _Call(script, encoded, args, loop)
        self._pending.append(call)
        if not self._flush_scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            return await call.future
        except StoreUnavailable:
            self.unavailable += 1
            raise

    def _flush(self) -> None:
        """Send queued calls, one pipeline per free slot."""
        self._flush_scheduled = False
        loop = asyncio.get_running_loop()
        while self._pending and self._in_flight < MAX_IN_FLIGHT:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._in_flight += 1
            self._sending += len(batch)
            task = loop.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _run(self, batch: list[_Call]) -> None:
        try:
            await self._exchange(batch)
        finally:
            self._sending -= len(batch)

    async def _exchange(self, batch: list[_Call]) -> None:
        """One pipeline: send, deliver every reply, tell the breaker how it went. The time
        budget runs from when the oldest question was queued, so no question waits longer
        than ``timeout`` in all, however long the pipeline before it took."""
        try:
            async with asyncio.timeout_at(batch[0].queued + self.timeout):
                replies = await self._send([call.command() for call in batch])
                retry = [i for i, r in enumerate(replies) if _is_noscript(r)]
                if retry:  # script cache flushed, or a new master after failover
                    again = await self._send([batch[i].command(by_body=True) for i in retry])
                    for i, reply in zip(retry, again, strict=True):
                        replies[i] = reply
        except asyncio.CancelledError:
            self._fail(batch, "redis store closing")
            self.breaker.abandon()
            raise
        except Exception as exc:
            if not is_outage(exc):
                logger.exception("%s: unexpected error", self.name)
            self.breaker.failure(_describe(exc))
            self._fail(batch, f"redis: {_describe(exc)}")
            return
        answered = False
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                answered = answered or not is_outage(reply)
                if not call.future.done():
                    call.future.set_exception(StoreUnavailable(f"redis: {reply}"))
            else:
                answered = True
                if not call.future.done():
                    call.future.set_result(reply)
        if answered:
            self.breaker.success()
        else:
            self.breaker.failure(_describe(replies[0]))

    async def _send(self, commands: list[tuple[str | bytes, ...]]) -> list[Any]:
        """Commands out in one write, replies in; an error reply is returned in place."""
        if self.target.mode == "cluster":
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies
        # A connection of our own per batch, without the pool's per-call bookkeeping: the
        # pipeline is the hot path. Any error or cancellation drops the connection, so a
        # half-read reply can never be taken for the next batch's.
        conn = self._idle.pop() if self._idle else self._connection()
        try:
            if not conn.is_connected:
                await conn.connect()  # Sentinel's connection asks the sentinels where to go
            await conn.send_packed_command(pack(commands), check_health=False)
            out: list[Any] = []
            for _ in commands:
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
            return out
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            self._idle.append(conn)

    def _connection(self) -> Any:
        """A new connection for batches, without redis-py's per-call socket timeout: it
        would wrap every write in ``wait_for`` and every reply read in a timeout context,
        while ``_exchange`` already bounds the whole batch (connecting keeps its own
        ``socket_connect_timeout``)."""
        conn = self.client.connection_pool.make_connection()
        conn.socket_timeout = None
        return conn

    def _fail(self, calls: Sequence[_Call], cause: str) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(StoreUnavailable(cause))

    async def _guard(self, operation: Awaitable[_T], budget: float | None = None) -> _T:
        """An admin operation under the breaker and a time budget, errors as
        StoreUnavailable (never on the question path)."""
        if self.client is None or not self.breaker.allow():
            if asyncio.iscoroutine(operation):
                operation.close()
            raise StoreUnavailable("redis store unavailable (circuit open)")
        try:
            async with asyncio.timeout(budget or self.timeout):
                result = await operation
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except Exception as exc:
            if is_outage(exc):
                self.breaker.failure(_describe(exc))
            else:
                self.breaker.success()
            raise StoreUnavailable(f"redis: {_describe(exc)}") from exc
        self.breaker.success()
        return result


def _is_noscript(reply: object) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")
    )


def _describe(exc: BaseException) -> str:
    """A short cause for logs (redis-py's messages name host and port, never a password)."""
    return str(exc) or exc.__class__.__name__

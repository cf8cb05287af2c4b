"""The Redis store: greylist and rate state shared by several MX hosts (docs/redis.md).

One class for every deployment: a single server (TCP, TLS or Unix socket), Sentinel or
Cluster, as its URL says (``redis_url``). Each question is one EVALSHA of a Lua script
(``redis_scripts``), so a read-modify-write is atomic and costs one round trip.

Auto-batching: questions are queued, and a ``call_soon`` callback sends them as one
pipeline (like the embedded store's group commit), after gathering while more keep coming
(``GATHER_BATCH``, ``GATHER_WAIT``). One pipeline is on the wire at a time
(``MAX_IN_FLIGHT``); while it is, new questions gather into the next one, so under load
batches grow instead of round trips multiplying. That is what the daemon's CPU, not Redis,
limits: at 16 concurrent askers one pipeline in flight gave ~30% more questions/s than four
(docs/redis.md). The queue is bounded by the questions the server admits (``[server]
max_connections``). Pipelines to a single node (or Sentinel's master) go over the store's own
connection (``redis_wire``), driven by callbacks, without a Task or stream per batch; Cluster
pipelines through redis-py's cluster client, which routes each call to its slot's master.

Failure: every round trip has a budget (``[store] timeout``; when it runs out, the connection
is dropped with it, so a late reply is never taken for another's); connection refused, timeouts,
``-BUSY``/``-LOADING``/``-READONLY``/``-MASTERDOWN``/``-CLUSTERDOWN`` become
``StoreUnavailable`` (the dispatcher answers the fallback). After ``breaker_failures``
failed round trips in a row the circuit opens and questions fail in microseconds; a probe
goes through every ``breaker_reset`` seconds and closes it when Redis answers.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Coroutine, Sequence
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
from ..identity_memo import IdentityMemo
from .base import StoreUnavailable
from .breaker import CircuitBreaker
from .redis_admin import RedisAdmin, client_of, triplet_of
from .redis_scripts import GREYLIST_STEP, RATELIMIT_STEP, SCRIPTS, KeyLayout, Script
from .redis_url import RedisTarget, build_client, mask_url, parse_url
from .redis_wire import RedisWire, open_wire, pack, tls_context

logger = logging.getLogger(__name__)

#: Pipelines on the wire at once (one connection each); more only made batches smaller.
MAX_IN_FLIGHT: Final = 1
#: Distinct Timing objects whose script arguments are kept (few exist; a bound all the same).
MAX_TIMINGS_CACHED: Final = 64
#: Questions in one pipeline at most; more wait for the next one.
MAX_BATCH: Final = 256
#: While questions keep arriving, a pipeline waits for more, up to this many questions or
#: this long (seconds, from its oldest question): at 16 askers this took batches from ~2
#: to ~7 questions and cut the daemon's and Redis's CPU per question by ~23 % and ~33 %.
GATHER_BATCH: Final = 8
GATHER_WAIT: Final = 0.002
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

    __slots__ = ("args", "future", "keys", "queued", "resp", "script")

    def __init__(
        self,
        script: Script,
        keys: Sequence[bytes],
        args: Sequence[str],
        loop: Any,
        resp: bytes | None = None,
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        #: The EVALSHA command in RESP, as it goes into a pipeline.
        self.resp = resp if resp is not None else pack((self.command(),))
        self.future: asyncio.Future[Any] = loop.create_future()
        #: Loop time it was queued: its time budget runs from here, queueing included.
        self.queued: float = loop.time()

    def command(self, by_body: bool = False) -> tuple[str | bytes, ...]:
        name, ref = ("EVAL", self.script.body) if by_body else ("EVALSHA", self.script.sha)
        return (name, ref, str(len(self.keys)), *self.keys, *self.args)


class _Batch:
    """Calls sent as one pipeline, and their replies as they come in."""

    __slots__ = ("by_body", "calls", "deadline", "origin", "replies", "timer")

    def __init__(
        self,
        calls: list[_Call],
        deadline: float,
        *,
        origin: tuple[_Batch, list[int]] | None = None,
    ) -> None:
        self.calls = calls
        #: Loop time by which every reply must be in: the oldest call's queued + timeout.
        self.deadline = deadline
        #: For a re-send by script body after NOSCRIPT: the batch and the indices it fills.
        self.origin = origin
        self.by_body = origin is not None
        #: One per call, in order, once all are in.
        self.replies: list[Any] = []
        self.timer: asyncio.TimerHandle | None = None


def _timing_arguments(timing: Timing) -> tuple[tuple[str, ...], bytes]:
    """GREYLIST_STEP's ARGV[2..5] (the delays and the auto-whitelist threshold), as text
    and in RESP."""
    args = (
        repr(float(timing.delay)),
        repr(float(timing.retry_window)),
        repr(float(timing.max_age)),
        str(int(timing.auto_whitelist_after)),
    )
    return args, b"".join(b"$%d\r\n%b\r\n" % (len(a), a.encode()) for a in args)


def greylist_resp(keys: Sequence[bytes], now: str, timing_resp: bytes, force: str) -> bytes:
    """One GREYLIST_STEP call by EVALSHA in RESP, what ``pack`` would make of it, but with
    the fixed parts encoded once (the command, the SHA, the timing arguments)."""
    triplet, client = keys
    return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b$1\r\n%b\r\n" % (
        _GREYLIST_HEAD,
        len(triplet),
        triplet,
        len(client),
        client,
        len(now),
        now.encode(),
        timing_resp,
        force.encode(),
    )


#: The start of every GREYLIST_STEP call: 11 parts, EVALSHA, the SHA, two keys.
_GREYLIST_HEAD: Final = b"*11\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$1\r\n2\r\n" % (
    GREYLIST_STEP.sha.encode()
)


class RedisStore:
    """Greylist, rate and whitelist state in Redis (single, TLS, Unix, Sentinel, Cluster).
    Its administrative side is ``admin`` (policyd/stores/redis_admin.py)."""

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
        self._gathered = 0  # queue length at the last look while gathering
        self._in_flight = 0
        self._sending = 0
        self._wire: RedisWire | None = None  # the connection batches go out on (not Cluster)
        self._tls: ssl.SSLContext | None = None  # for rediss://, built at the first connect
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.admin = RedisAdmin(self)

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
        self._loop = asyncio.get_running_loop()
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
        if self._wire is not None:
            self._drop(self._wire, None)
        while unfinished := [task for task in self._tasks if not task.done()]:
            await asyncio.gather(*unfinished, return_exceptions=True)
        self._fail(self._pending, "redis store closed")
        self._pending = []
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
        timing_args, timing_resp = self._timing_args(timing)
        keys = (self.layout.triplet(triplet_key).encode(), self.layout.client(client_key).encode())
        now_text = repr(float(now))
        force = "1" if force_pass else "0"
        found = await self._submit(
            GREYLIST_STEP,
            keys,
            (now_text, *timing_args, force),
            greylist_resp(keys, now_text, timing_resp, force),
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
        keys = [self.layout.rate(c.key).encode() for c in charges]
        found = await self._submit(RATELIMIT_STEP, keys, args)
        states = [None if v is None else float(v) for v in found]
        decisions, _ = decide_all(states, charges, now)
        return decisions

    # --- for the administrative side (RedisAdmin) ---------------------------------------

    async def guard(self, operation: Awaitable[_T], budget: float | None = None) -> _T:
        """An admin operation under the store's budget and circuit breaker."""
        return await self._guard(operation, budget)

    async def eval_script(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        """A script call queued with the questions' calls (one pipeline)."""
        return await self._eval(script, keys, args)

    # --- batching -----------------------------------------------------------------------

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Queue one script call for the next pipeline and wait for its reply. The keys are
        encoded here, so a key that cannot be encoded fails its own question, not a batch."""
        return await self._submit(script, [key.encode() for key in keys], args)

    def _submit(
        self,
        script: Script,
        keys: Sequence[bytes],
        args: Sequence[str],
        resp: bytes | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a call for the next pipeline; the future gets its reply. ``keys`` encoded,
        ``resp`` the call already in RESP when the caller has it. A plain function, not a
        coroutine: the question awaits the future itself, one frame less.

        ``unavailable`` counts every call refused here or failed with StoreUnavailable."""
        loop = self._loop
        if self.client is None or loop is None:
            raise StoreUnavailable("redis store is not started")
        if not self.breaker.allow():
            self.unavailable += 1
            raise StoreUnavailable(f"circuit open, next probe in {self.breaker.retry_in():.2f}s")
        call = _Call(script, keys, args, loop, resp)
        self._pending.append(call)
        if not self._flush_scheduled and self._in_flight < MAX_IN_FLIGHT:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return call.future

    def _flush(self) -> None:
        """Send queued calls, one pipeline per free slot; but while questions keep coming
        (the queue grew since the last loop turn), gather them a turn longer, up to
        ``GATHER_BATCH`` or ``GATHER_WAIT``. A lone question waits one loop turn."""
        assert self._loop is not None
        pending = self._pending
        queued = len(pending)
        if (
            self._gathered < queued < GATHER_BATCH
            and self._loop.time() - pending[0].queued < GATHER_WAIT
        ):
            self._gathered = queued
            self._loop.call_soon(self._flush)
            return
        self._gathered = 0
        self._flush_scheduled = False
        while self._pending and self._in_flight < MAX_IN_FLIGHT:
            calls, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._in_flight += 1
            self._sending += len(calls)
            batch = _Batch(calls, calls[0].queued + self.timeout)
            wire = self._wire
            if self.target.mode == "cluster":
                self._spawn(self._cluster_exchange(batch))
            elif wire is not None and wire.usable:
                self._write(wire, batch)
            else:  # not connected yet, or the connection was dropped: connect first
                self._spawn(self._connect_and_write(batch))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _write(self, wire: RedisWire, batch: _Batch) -> None:
        assert self._loop is not None
        batch.timer = self._loop.call_at(batch.deadline, self._expired, wire)
        if batch.by_body:
            data = pack([call.command(by_body=True) for call in batch.calls])
        else:
            data = b"".join([call.resp for call in batch.calls])
        try:
            wire.send(batch, data, len(batch.calls))
        except Exception as exc:  # the transport closed under us (connection_lost pending)
            self._drop(wire, RedisConnectionError(f"write failed: {exc}"))

    def _expired(self, wire: RedisWire) -> None:
        """The oldest batch on the wire ran out of time. The connection goes with it: a
        late reply must never be taken for a later batch's."""
        self._drop(wire, RedisTimeoutError(f"no reply within {self.timeout:g}s"))

    def _replied(self, wire: RedisWire, batch: _Batch, replies: list[Any]) -> None:
        """Every reply of a batch is in (called from ``RedisWire.data_received``)."""
        batch.replies = replies
        if batch.timer is not None:
            batch.timer.cancel()
        origin = batch.origin
        if origin is not None:  # the re-send after NOSCRIPT: fill in the originals
            again, (batch, indices) = batch, origin
            for i, reply in zip(indices, again.replies, strict=True):
                batch.replies[i] = reply
        else:
            retry = [i for i, reply in enumerate(batch.replies) if _is_noscript(reply)]
            if retry:  # script cache flushed, or a new master after failover
                calls = [batch.calls[i] for i in retry]
                self._write(wire, _Batch(calls, batch.deadline, origin=(batch, retry)))
                return
        if not self._deliver(batch, batch.replies):
            # Not serving (e.g. -READONLY: the master was demoted in a failover): a new
            # connection asks again where to go (Sentinel) or finds the server restarted.
            self._drop(wire, None)
        self._done(batch)

    def _drop(self, wire: RedisWire, cause: BaseException | None) -> None:
        """Close a connection; fail the batches still on it (a breaker failure each when
        ``cause`` says why; ``None`` is a deliberate close). Also the wire's ``on_lost``."""
        if self._wire is wire:
            self._wire = None
        wire.close()
        for sent in wire.tokens():
            if sent.timer is not None:
                sent.timer.cancel()
            batch = sent if sent.origin is None else sent.origin[0]
            if cause is None:
                self._fail(batch.calls, "redis store closed")
            else:
                self._failed(batch, cause)
            self._done(batch)

    def _done(self, batch: _Batch) -> None:
        """A batch is over, answered or failed: its slot is free."""
        self._in_flight -= 1
        self._sending -= len(batch.calls)
        if self._pending and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    async def _connect_and_write(self, batch: _Batch) -> None:
        try:
            async with asyncio.timeout_at(batch.deadline):
                wire = await self._connect()
        except asyncio.CancelledError:
            self._fail(batch.calls, "redis store closing")
            self.breaker.abandon()
            self._done(batch)
            raise
        except Exception as exc:
            self._failed(batch, exc)
            self._done(batch)
            return
        self._write(wire, batch)

    async def _connect(self) -> RedisWire:
        """A new connection for batches, to the one server, or to the master the sentinels
        name now (redis-py's Sentinel client asks them). The batch's budget bounds it all."""
        target = self.target
        address: str | tuple[str, int]
        if target.mode == "sentinel":
            host, port = await self.client.connection_pool.get_master_address()
            address = (host, int(port))
        else:
            address = target.unix_path or target.hosts[0]
        if target.tls and self._tls is None:
            self._tls = tls_context(self.config)
        wire = await open_wire(target, address, self._tls, self._replied, self._drop)
        current = self._wire
        if current is not None and current.usable:  # another batch connected meanwhile
            wire.close()
            return current
        self._wire = wire
        return wire

    async def _cluster_exchange(self, batch: _Batch) -> None:
        """Cluster: redis-py's cluster pipeline routes each call to its slot's master."""
        calls = batch.calls
        try:
            async with asyncio.timeout_at(batch.deadline):
                replies = await self._cluster_send([call.command() for call in calls])
                retry = [i for i, reply in enumerate(replies) if _is_noscript(reply)]
                if retry:
                    again = await self._cluster_send([calls[i].command(True) for i in retry])
                    for i, reply in zip(retry, again, strict=True):
                        replies[i] = reply
        except asyncio.CancelledError:
            self._fail(calls, "redis store closing")
            self.breaker.abandon()
            raise
        except Exception as exc:
            self._failed(batch, exc)
        else:
            self._deliver(batch, replies)
        finally:
            self._done(batch)

    async def _cluster_send(self, commands: list[tuple[str | bytes, ...]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _deliver(self, batch: _Batch, replies: Sequence[Any]) -> bool:
        """Hand each question its reply and tell the breaker. True when Redis served the
        batch (some reply other than an outage error)."""
        answered = False
        for call, reply in zip(batch.calls, replies, strict=True):
            if isinstance(reply, Exception):
                answered = answered or not is_outage(reply)
                if not call.future.done():
                    self.unavailable += 1
                    call.future.set_exception(StoreUnavailable(f"redis: {reply}"))
            else:
                answered = True
                if not call.future.done():
                    call.future.set_result(reply)
        if answered:
            self.breaker.success()
        else:
            self.breaker.failure(_describe(replies[0]))
        return answered

    def _failed(self, batch: _Batch, exc: BaseException) -> None:
        """The batch got no replies: Redis unreachable, too slow, or talking nonsense."""
        if not is_outage(exc):
            logger.error("%s: unexpected error: %r", self.name, exc)
        self.breaker.failure(_describe(exc))
        self._fail(batch.calls, f"redis: {_describe(exc)}")

    def _fail(self, calls: Sequence[_Call], cause: str) -> None:
        for call in calls:
            if not call.future.done():
                self.unavailable += 1
                call.future.set_exception(StoreUnavailable(cause))

    async def _guard(self, operation: Awaitable[_T], budget: float | None = None) -> _T:
        """An admin operation under the breaker and a time budget, errors as
        StoreUnavailable (never on the question path).

        Its outages count as failures, but its successes do not close the circuit nor reset
        the failure count: admin reads (the whitelist version polled every 0.25 s) succeed
        while writes are refused (``CLIENT PAUSE … WRITE``, a read-only replica), and only
        the questions' scripts, which all write, tell whether the question path works."""
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
                self.breaker.abandon()
            raise StoreUnavailable(f"redis: {_describe(exc)}") from exc
        self.breaker.abandon()  # no verdict on the question path (see above)
        return result


def _is_noscript(reply: object) -> bool:
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")
    )


def _describe(exc: BaseException) -> str:
    """A short cause for logs (redis-py's messages name host and port, never a password)."""
    return str(exc) or exc.__class__.__name__

"""Asynchronous, caching DNS lookups for SPF: aiodns (c-ares) under a bounded TTL cache.

One ``Resolver`` is shared by every question. It answers from its cache while an entry's TTL
lasts, remembers "no such record" (NXDOMAIN and NODATA) for a bounded time, and asks DNS at
most once at a time per (name, type): concurrent askers share the one query in flight. The
cache is an LRU bounded by a number of entries, so memory does not grow with the number of
domains seen. Every query has its own timeout; a slow name never holds up another one, since
nothing here blocks the event loop (c-ares multiplexes all queries on its own event thread
and reports back through ``call_soon_threadsafe``).

The answer distinguishes a *void* lookup (the name or the record does not exist: an SPF "void
lookup", RFC 7208 §4.6.4) from a *temporary* failure (timeout, SERVFAIL, refused, no server):
only the latter becomes an SPF temperror. Truncated UDP answers are retried over TCP by c-ares
itself. c-ares's own query cache (on by default since c-ares 1.23) is switched off: its size is
bounded only by TTLs, and it would hide queries from this cache's accounting.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import aiodns
import pycares

logger = logging.getLogger(__name__)

#: Record types SPF needs (RFC 7208 §5: a, mx, ptr, exists, include/redirect; §4.4 TXT).
RTYPES: Final = frozenset({"A", "AAAA", "MX", "PTR", "TXT"})
#: Entries kept at once (answers for one name and type); ~0.4 KiB each, so ~2 MiB at most.
DEFAULT_CACHE_SIZE: Final = 5_000
#: Per query, c-ares retries included. RFC 7208 §4.6.4 allows 20 s for a whole check; we are
#: inside Exim's 2 s readsocket timeout, so a query gets a fraction of a second.
DEFAULT_QUERY_TIMEOUT: Final = 0.5
#: c-ares tries per server within the timeout (a lost UDP packet gets a second chance).
DEFAULT_TRIES: Final = 2
#: NXDOMAIN/NODATA are cached this long. c-ares reports them as errors without the SOA, so
#: the RFC 2308 §5 negative TTL is not available; this is the bound instead.
DEFAULT_NEGATIVE_TTL: Final = 300.0
#: Positive TTLs are capped (RFC 2181 §8 allows 68 years; BIND caps at 1 week by default).
MAX_TTL: Final = 86_400.0
#: A temporary failure is remembered this briefly, so a dead server costs one timeout per
#: name every few seconds instead of one per question (RFC 2308 §7.1 allows up to 5 min).
FAILURE_TTL: Final = 5.0
#: ``ARES_OPT_QUERY_CACHE`` from ares.h (c-ares ≥ 1.23); pycares does not export it.
_ARES_OPT_QUERY_CACHE: Final = 1 << 21

_TYPE_CODES: Final = {"A": 1, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}
_MAX_LABEL: Final = 63  # RFC 1035 §2.3.4
_MAX_NAME: Final = 253


class Status(enum.Enum):
    """How a lookup ended."""

    OK = "ok"
    #: The name does not exist (RCODE 3) or is not a valid domain name.
    NXDOMAIN = "nxdomain"
    #: The name exists but has no record of this type.
    NODATA = "nodata"
    #: Timeout, SERVFAIL, refused, no usable server: try again later.
    TEMPFAIL = "tempfail"


#: TXT: each record's strings joined (RFC 7208 §3.3); A/AAAA/PTR: text; MX: (preference, host).
Value = bytes | str | tuple[int, str]


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of one (name, type) lookup; ``values`` is empty unless ``status`` is OK."""

    status: Status
    values: tuple[Value, ...] = ()
    #: Resolver clock time after which this answer must be asked again.
    expires: float = 0.0
    error: str = ""

    @property
    def void(self) -> bool:
        """No such record: counts as an SPF void lookup (RFC 7208 §4.6.4)."""
        return self.status in (Status.NXDOMAIN, Status.NODATA)

    @property
    def temporary(self) -> bool:
        return self.status is Status.TEMPFAIL


Key = tuple[str, str]


def normalise_name(name: str) -> str:
    """Lower case, without the trailing dot: the cache key's name."""
    return name.rstrip(".").lower()


def valid_name(name: str) -> bool:
    """An ASCII name DNS can carry: 1–63 octet labels, ≤ 253 octets (RFC 1035 §2.3.4)."""
    if not name or len(name) > _MAX_NAME or not name.isascii():
        return False
    return all(0 < len(label) <= _MAX_LABEL for label in name.split("."))


def nameserver_csv(nameservers: Iterable[str]) -> list[str]:
    """``host:port`` entries as c-ares takes them (``[v6]:port``, bare addresses too)."""
    return [entry.strip() for entry in nameservers if entry.strip()]


class Resolver:
    """Cached async lookups of A, AAAA, MX, PTR and TXT records through c-ares.

    ``peek`` answers from the cache only (synchronous, no I/O); ``fetch`` starts (or joins)
    the query for a key and returns its task, which never raises and always ends within the
    query timeout; ``lookup`` is both. ``clock`` (monotonic seconds) is injectable so tests
    can age the cache without sleeping.
    """

    def __init__(
        self,
        nameservers: Iterable[str] = (),
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        tries: int = DEFAULT_TRIES,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nameservers = nameserver_csv(nameservers)
        self.cache_size = max(1, cache_size)
        self.query_timeout = query_timeout
        self.tries = max(1, tries)
        self.negative_ttl = negative_ttl
        self.clock = clock
        self._cache: OrderedDict[Key, Answer] = OrderedDict()
        self._inflight: dict[Key, asyncio.Task[Answer]] = {}
        self._dns: Any = None
        #: Counters for tests, metrics and the benchmark.
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._cache)

    # -- cache ----------------------------------------------------------------------------------

    def peek(self, name: str, rtype: str) -> Answer | None:
        """The cached, unexpired answer, or None; a hit refreshes the entry's LRU position."""
        key = (normalise_name(name), rtype)
        answer = self._cache.get(key)
        if answer is None:
            return None
        if answer.expires <= self.clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        self.hits += 1
        return answer

    def store(self, name: str, rtype: str, answer: Answer) -> None:
        """Put an answer in the cache (evicting the least recently used beyond the bound)."""
        if answer.expires <= self.clock():
            return  # TTL 0: usable by the asker, never cached (RFC 1035 §3.2.1)
        key = (normalise_name(name), rtype)
        self._cache[key] = answer
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear(self) -> None:
        self._cache.clear()

    # -- network --------------------------------------------------------------------------------

    def fetch(self, name: str, rtype: str) -> asyncio.Task[Answer]:
        """The task resolving (name, rtype): joined if already in flight, else started."""
        if rtype not in RTYPES:
            raise ValueError(f"unsupported record type {rtype!r}")
        key = (normalise_name(name), rtype)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(key))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._landed, key))
        return task

    def _landed(self, key: Key, task: asyncio.Task[Answer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def lookup(self, name: str, rtype: str) -> Answer:
        """Cached answer, or one from DNS; never raises for DNS trouble (see Status)."""
        cached = self.peek(name, rtype)
        if cached is not None:
            return cached
        return await asyncio.shield(self.fetch(name, rtype))

    async def _query(self, key: Key) -> Answer:
        name, rtype = key
        if not valid_name(name):
            answer = Answer(Status.NXDOMAIN, (), self.clock() + self.negative_ttl, "bad name")
            self.store(name, rtype, answer)
            return answer
        self.queries += 1
        try:
            result = await asyncio.wait_for(
                self._resolver().query_dns(name, rtype), self.query_timeout
            )
        except TimeoutError:
            answer = self._failure("timeout")
        except (aiodns.error.DNSError, pycares.AresError, UnicodeError, ValueError) as exc:
            answer = self._from_error(exc)
        else:
            answer = self._from_result(result, rtype)
        self.store(name, rtype, answer)
        return answer

    def _failure(self, error: str) -> Answer:
        return Answer(Status.TEMPFAIL, (), self.clock() + FAILURE_TTL, error)

    def _from_error(self, exc: Exception) -> Answer:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else -1
        errno = pycares.errno
        if code in (errno.ARES_ENOTFOUND, errno.ARES_EBADNAME):
            return Answer(Status.NXDOMAIN, (), self.clock() + self.negative_ttl)
        if code == errno.ARES_ENODATA:
            return Answer(Status.NODATA, (), self.clock() + self.negative_ttl)
        text = errno.errorcode.get(code, "") if code >= 0 else ""
        return self._failure(text or f"{type(exc).__name__}: {exc}")

    def _from_result(self, result: Any, rtype: str) -> Answer:
        wanted = _TYPE_CODES[rtype]
        values: list[Value] = []
        ttl = MAX_TTL
        for record in result.answer:
            ttl = min(ttl, float(record.ttl))  # CNAMEs on the way count too
            if record.type != wanted:
                continue
            data = record.data
            if rtype == "TXT":
                values.append(bytes(data.data))
            elif rtype == "MX":
                values.append((int(data.priority), normalise_name(data.exchange)))
            elif rtype == "PTR":
                values.append(normalise_name(data.dname))
            else:
                values.append(str(data.addr))
        if not values:
            return Answer(Status.NODATA, (), self.clock() + self.negative_ttl)
        return Answer(Status.OK, tuple(values), self.clock() + ttl)

    def _resolver(self) -> Any:
        if self._dns is None:
            self._dns = _make_resolver(self.nameservers, self.query_timeout, self.tries)
        return self._dns

    async def close(self) -> None:
        """Cancel queries in flight and release the c-ares channel."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._dns is not None:
            dns, self._dns = self._dns, None
            await dns.close()


def _make_resolver(nameservers: list[str], query_timeout: float, tries: int) -> Any:
    """An aiodns resolver on the running loop, its c-ares query cache switched off."""
    per_try = query_timeout / tries
    resolver = aiodns.DNSResolver(timeout=per_try, tries=tries)
    _disable_ares_query_cache(resolver, per_try, tries)
    if nameservers:
        resolver.nameservers = nameservers
    return resolver


def _disable_ares_query_cache(resolver: Any, per_try: float, tries: int) -> None:
    """Replace the fresh channel by one built with ``qcache_max_ttl = 0``.

    pycares 5 builds its ``ares_options`` without ``ARES_OPT_QUERY_CACHE`` and c-ares then
    caches every answer for its TTL with no bound on the number of entries. There is no
    public way to switch it off: pycares 5.2.1 (the latest) has no such ``Channel`` argument,
    aiodns passes only ``Channel``'s own, and c-ares reads no such option from resolv.conf or
    ``RES_OPTIONS``. The reason is memory: 20,000 distinct TXT names with a 1 h TTL grew the
    process by 28.6 MiB with c-ares' cache on and by 0.8 MiB with it off (this resolver's own
    LRU at 100 entries; docs/spf.md) — the daemon's whole budget is 64 MiB. Canary:
    ``test_pycares_cffi_layer``, ``test_aiodns_resolver_channel``.

    The replacement is made with the same options pycares uses for aiodns's default
    (event-thread) channel. Should pycares' internals change, the check still works, with
    c-ares caching too: logged.
    """
    try:
        from pycares import _ffi, _lib  # the cffi layer (private)

        channel = resolver._channel
        if not getattr(resolver, "_event_thread", False):
            raise RuntimeError("aiodns is not using the c-ares event thread")
        new = _ffi.new("ares_channel *")
        options = _ffi.new("struct ares_options *")
        options.timeout = max(1, int(per_try * 1000))
        options.tries = tries
        options.qcache_max_ttl = 0
        options.evsys = _lib.ARES_EVSYS_DEFAULT
        mask = (
            _lib.ARES_OPT_TIMEOUTMS
            | _lib.ARES_OPT_TRIES
            | _lib.ARES_OPT_EVENT_THREAD
            | _ARES_OPT_QUERY_CACHE
        )
        status = _lib.ares_init_options(new, options, mask)
        if status != _lib.ARES_SUCCESS:
            raise RuntimeError(f"ares_init_options failed with status {status}")
        with channel._lock:
            old, channel._channel = channel._channel, new
        _lib.ares_destroy(old[0])
    except Exception as exc:  # the resolver still works, only with c-ares's own cache on
        logger.warning("could not switch off the c-ares query cache: %s", exc)

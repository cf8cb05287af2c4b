"""Greylisting (design.md §3): a pure state machine over one triplet and its client, and the
thin async shell that applies skips and whitelists (static and runtime, in one defined order:
``Greylist.exemption``) and asks the store to run the machine atomically.

Nothing here reads a clock: ``now`` is always passed in.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Final, Protocol

from ..addresses import (
    AddressPatterns,
    NetworkSet,
    client_network,
    normalise_recipient,
    normalise_sender,
)
from ..config import GreylistConfig
from ..model import Action, Query, Verdict
from ..whitelist import KINDS, ListEntry, Whitelist

CHECK: Final = "greylist"
#: RFC 3463 "4.7.1 delivery not authorized" — the de-facto greylisting enhanced code.
DEFER_CODE: Final = 451
DEFER_ECODE: Final = "4.7.1"
KEY_SEPARATOR: Final = "|"
#: Distinct cached answers at most (status × worded wait; a few hundred at most in practice).
VERDICT_CACHE_ENTRIES: Final = 1024


class Status(enum.Enum):
    """What the state machine found; also the ``reason`` in logs and metrics."""

    NEW = "new"
    EARLY = "early-retry"
    PASSED = "passed"
    KNOWN = "known"
    AUTO = "auto-whitelisted"


@dataclass(frozen=True, slots=True)
class Timing:
    """The durations and threshold the machine needs (seconds; 0 disables auto-whitelisting)."""

    delay: float
    retry_window: float
    max_age: float
    auto_whitelist_after: int

    @classmethod
    def from_config(cls, config: GreylistConfig) -> Timing:
        return cls(config.delay, config.retry_window, config.max_age, config.auto_whitelist_after)


@dataclass(slots=True)  # not frozen: built per question (see model.Query)
class Triplet:
    """Stored state of one (client network, sender, recipient) triplet."""

    first_seen: float
    last_seen: float
    passed: bool
    attempts: int


@dataclass(slots=True)  # not frozen: built per question (see model.Query)
class Client:
    """Stored state of one client key: distinct triplets passed, for auto-whitelisting."""

    passes: int
    last_seen: float


@dataclass(slots=True)  # not frozen: built per question (see model.Query)
class Step:
    """One transition: the status, and the records to store with their absolute expiry.

    ``triplet``/``client`` are None when that record is left unchanged.
    """

    status: Status
    triplet: Triplet | None
    triplet_expires: float
    client: Client | None
    client_expires: float
    #: first-seen → pass, for a first pass (the delay actually imposed); else 0.
    delayed: float
    #: seconds until a retry can pass, for NEW/EARLY; else 0.
    retry_in: float


def _is_whitelisted(client: Client | None, now: float, timing: Timing) -> bool:
    return (
        client is not None
        and timing.auto_whitelist_after > 0
        and client.passes >= timing.auto_whitelist_after
        and now - client.last_seen <= timing.max_age
    )


def _unexpired(triplet: Triplet | None, now: float, timing: Timing) -> Triplet | None:
    """The stored triplet, or None when it has expired (an unpassed one not retried within
    the retry window, a passed one unused for max_age) or was first seen in the future (the
    clock stepped back)."""
    if triplet is None or now < triplet.first_seen:
        return None
    if triplet.passed:
        expired = now - triplet.last_seen > timing.max_age
    else:
        expired = now - triplet.first_seen > timing.retry_window
    return None if expired else triplet


def step(
    triplet: Triplet | None,
    client: Client | None,
    now: float,
    timing: Timing,
    *,
    force_pass: bool = False,
) -> Step:
    """Advance one triplet. ``force_pass`` accepts an unknown triplet as if it had retried
    (used when an earlier recipient of the same transaction already passed)."""
    if _is_whitelisted(client, now, timing):
        assert client is not None
        refreshed = Client(client.passes, now)
        return Step(Status.AUTO, None, 0.0, refreshed, now + timing.max_age, 0.0, 0.0)
    live = _unexpired(triplet, now, timing)
    if live is None and not force_pass:
        fresh = Triplet(now, now, False, 1)
        expires = now + timing.retry_window
        return Step(Status.NEW, fresh, expires, None, 0.0, 0.0, timing.delay)
    if live is not None and live.passed:
        kept = Triplet(live.first_seen, now, True, live.attempts + 1)
        return Step(Status.KNOWN, kept, now + timing.max_age, None, 0.0, 0.0, 0.0)
    first_seen = live.first_seen if live is not None else now
    attempts = live.attempts + 1 if live is not None else 1
    waited = now - first_seen
    if waited < timing.delay and not force_pass:
        early = Triplet(first_seen, now, False, attempts)
        expires = first_seen + timing.retry_window
        return Step(Status.EARLY, early, expires, None, 0.0, 0.0, timing.delay - waited)
    passed = Triplet(first_seen, now, True, attempts)
    old_passes = (
        client.passes if client is not None and now - client.last_seen <= timing.max_age else 0
    )
    counted = Client(old_passes + 1, now)
    return Step(
        Status.PASSED, passed, now + timing.max_age, counted, now + timing.max_age, waited, 0.0
    )


class GreylistStore(Protocol):
    """What greylisting needs from a store: one atomic transition per question."""

    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step: ...


def triplet_key(network: str, sender: str, recipient: str) -> str:
    return KEY_SEPARATOR.join((network, sender, recipient))


def human_duration(seconds: float) -> str:
    """``5 minutes``, ``90 seconds``, ``2 hours`` — for texts a human reads in a bounce."""
    seconds = max(0, round(seconds))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if (seconds >= size and seconds % size == 0) or seconds >= 2 * size:
            value = round(seconds / size)
            return f"{value} {unit}{'s' if value != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


#: human_duration by whole seconds (all it looks at): a new triplet's wait is always the
#: delay, so the words are made once, not per question.
_worded_wait: Final = functools.lru_cache(maxsize=VERDICT_CACHE_ENTRIES)(human_duration)


@dataclass(frozen=True, slots=True)
class GreylistResult:
    """The verdict plus what the transaction memory and metrics need.

    ``status`` is None when the question was not greylisted (a skip or a whitelist);
    ``entry`` is the runtime whitelist entry that let it skip, if one did."""

    verdict: Verdict
    status: Status | None
    delayed: float = 0.0
    entry: ListEntry | None = None


class Greylist:
    """The async shell: skips and whitelists, then one store call, then the verdict."""

    def __init__(self, config: GreylistConfig, store: GreylistStore) -> None:
        self.config = config
        self.timing = Timing.from_config(config)
        self.store = store
        self.whitelist_clients = NetworkSet(config.whitelist_clients)
        self.whitelist_recipients = AddressPatterns(config.whitelist_recipients)
        # Shared answers, by status and worded wait (see verdict()), per skip reason, and per
        # kind of runtime whitelist entry.
        self._verdicts: dict[tuple[str, str], Verdict] = {}
        self._skipped: dict[str, GreylistResult] = {}
        self._whitelisted = {
            kind: Verdict(Action.ACCEPT, check=CHECK, reason=f"whitelist-{kind}") for kind in KINDS
        }

    def exemption(
        self, query: Query, now: float, whitelist: Whitelist, spf_pass_domain: str, recipient: str
    ) -> GreylistResult | None:
        """Why this question is not greylisted at all, or None when it is: the one place that
        decides skips and whitelists (docs/greylisting.md, "Skips and whitelists"). In order:
        greylisting disabled; a runtime whitelist entry (``policyctl whitelist``;
        ``spf_pass_domain`` is the MAIL FROM domain when SPF passed for it, else '');
        the static ``whitelist_clients`` and ``whitelist_recipients``; an authenticated
        sender or a relay client. ``recipient`` is the normalised recipient."""
        config = self.config
        if not config.enabled:
            return self._skipped_for("disabled")
        entry = whitelist.match(query, now, spf_pass_domain)
        if entry is not None:
            return GreylistResult(self._whitelisted[entry.kind], None, entry=entry)
        if query.client in self.whitelist_clients:
            return self._skipped_for("whitelisted-client")
        if self.whitelist_recipients.match(recipient):
            return self._skipped_for("whitelisted-recipient")
        if query.auth and config.skip_authenticated:
            return self._skipped_for("authenticated")
        if query.relay and config.skip_relay:
            return self._skipped_for("relay-client")
        return None

    def _skipped_for(self, reason: str) -> GreylistResult:
        """The shared result for a skip ``reason`` (few reasons: made once each)."""
        skipped = self._skipped.get(reason)
        if skipped is None:
            skipped = self._skipped[reason] = GreylistResult(
                Verdict(Action.ACCEPT, check=CHECK, reason=reason), None
            )
        return skipped

    def keys(
        self, query: Query, spf_domain: str | None = None, recipient: str | None = None
    ) -> tuple[str, str]:
        """(triplet key, client key) for a question. With an SPF-validated sender domain
        the domain replaces the client network, so a provider retrying from another host of
        its own pool is recognised (design.md §3)."""
        config = self.config
        client = spf_domain or client_network(query.client, config.ipv4_prefix, config.ipv6_prefix)
        if recipient is None:
            recipient = normalise_recipient(query.recipient)
        return triplet_key(client, normalise_sender(query.sender), recipient), client

    def timing_for(self, extra_delay: float) -> Timing:
        """The timings, with a longer delay (e.g. for an SPF softfail)."""
        if extra_delay <= 0:
            return self.timing
        t = self.timing
        return Timing(
            t.delay + extra_delay,
            max(t.retry_window, t.delay + extra_delay + 1),
            t.max_age,
            t.auto_whitelist_after,
        )

    def verdict(self, status: Status, retry_in: float) -> Verdict:
        """The answer for a state-machine status (learn mode never defers).

        Answers are shared objects, cached by status and by the wait as the text words it
        ("4 minutes"): few distinct keys (bounded by ``VERDICT_CACHE_ENTRIES``)."""
        wait = ""
        if status is Status.NEW or status is Status.EARLY:
            wait = _worded_wait(round(retry_in))
        key = (status._value_, wait)  # _value_: an enum member hashes in Python code
        cached = self._verdicts.get(key)
        if cached is None:
            if len(self._verdicts) >= VERDICT_CACHE_ENTRIES:
                self._verdicts.clear()
            cached = self._verdicts[key] = self._verdict(status, wait)
        return cached

    def _verdict(self, status: Status, wait: str) -> Verdict:
        config = self.config
        if status in (Status.NEW, Status.EARLY) and not config.learn:
            text = config.message.replace("{delay}", wait)
            return Verdict(
                Action.DEFER, DEFER_CODE, DEFER_ECODE, text, check=CHECK, reason=status.value
            )
        reason = status.value if not config.learn else f"learn-{status.value}"
        return Verdict(Action.ACCEPT, check=CHECK, reason=reason)

    async def check(
        self,
        query: Query,
        now: float,
        whitelist: Whitelist,
        *,
        spf_pass_domain: str = "",
        force_pass: bool = False,
        spf_domain: str | None = None,
        extra_delay: float = 0.0,
    ) -> GreylistResult:
        """Skips and whitelists (``exemption``), else one store step and its verdict."""
        recipient = normalise_recipient(query.recipient)
        skipped = self.exemption(query, now, whitelist, spf_pass_domain, recipient)
        if skipped is not None:
            return skipped
        key, client = self.keys(query, spf_domain, recipient)
        timing = self.timing_for(extra_delay)
        result = await self.store.greylist_step(key, client, now, timing, force_pass)
        verdict = self.verdict(result.status, result.retry_in)
        return GreylistResult(verdict, result.status, result.delayed)

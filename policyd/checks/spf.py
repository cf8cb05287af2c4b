"""SPF (RFC 7208) for MAIL FROM and HELO: a pure result → policy mapping with header text, and
the thin async shell that evaluates through the shared DNS cache within a time budget.

API for the dispatcher (docs/spf.md):

    check = SpfCheck(config.spf, resolver, hostname=...)   # resolver: policyd.dns.Resolver
    outcome = await check.check(query, now)                  # at RCPT, once per transaction
    outcome.verdict          # ACCEPT, DEFER 451 4.4.3, or REJECT 550 5.7.23 / 5.7.24
    outcome.headers          # "Received-SPF: …", "Authentication-Results: …" for DATA
    outcome.greylist_domain  # SPF-pass domain safe to key greylisting on, else None
    outcome.extra_greylist_delay  # softfail_greylist_delay for softfail, else 0
    await check.close()      # only if the check owns its resolver (built without one)

``check`` never raises for DNS trouble (that is temperror) and returns within the configured
``timeout`` plus scheduling noise. ``now`` (wall-clock seconds) drives the temperror give-up
memory and the %{t} macro; nothing here reads a clock.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Final

from ..addresses import NetworkSet, ip_text, normalise_sender
from ..config import SpfConfig
from ..dns import Resolver
from ..model import Action, Query, Verdict
from .spf_eval import (
    NO_EXPIRY,
    Evaluation,
    Timeout,
    View,
    authorised_breadth,
    drive,
    evaluate_once,
    identity_domain,
    without_record,
)
from .spf_headers import (
    Checked,
    Identity,
    Result,
    authentication_results,
    comment_text,
    quote_token,
    quote_value,
    received_spf,
)

__all__ = [
    "CHECK",
    "Checked",
    "Identity",
    "Result",
    "SpfCheck",
    "SpfOutcome",
    "TempErrorMemory",
    "authentication_results",
    "comment_text",
    "decide",
    "is_checkable",
    "quote_token",
    "quote_value",
    "received_spf",
    "wide_open",
]

logger = logging.getLogger(__name__)

CHECK: Final = "spf"
#: RFC 7372 §3.2 "X.7.23 SPF validation failed"; RFC 7208 §8.4 reply code 550.
FAIL_CODE: Final = 550
FAIL_ECODE: Final = "5.7.23"
#: RFC 7372 §3.2 "X.7.24 SPF validation error" (RFC 7208 §8.7: 550).
PERMERROR_CODE: Final = 550
PERMERROR_ECODE: Final = "5.7.24"
#: RFC 7208 §8.6: "451 4.4.3" for a temperror.
TEMPERROR_CODE: Final = 451
TEMPERROR_ECODE: Final = "4.4.3"
#: (client IP, sender) pairs remembered for the temperror give-up rule (~150 bytes each).
MAX_TEMPERROR_ENTRIES: Final = 10_000
#: A give-up entry older than temperror_max_time plus this is forgotten: a new outage weeks
#: later starts deferring again.
TEMPERROR_FORGET_AFTER: Final = 86_400.0


@dataclass(slots=True)  # not frozen: one per check (see model.Query); treated as immutable
class SpfOutcome:
    """Everything the dispatcher needs from one check.

    The header text is formatted when asked for (at DATA), not at RCPT, and is not kept in
    the result cache: ``received_spf``, ``authentication_results`` and ``headers`` are
    properties."""

    verdict: Verdict
    #: The deciding identity's result; None when skipped.
    result: Result | None = None
    identity: Identity | None = None
    domain: str = ""
    explanation: str = ""
    #: Every identity evaluated, in order (HELO first in ``helo = "first"`` mode).
    checked: tuple[Checked, ...] = ()
    greylist_domain: str | None = None
    extra_greylist_delay: float = 0.0
    skipped: str = ""
    #: The receiver / authserv-id named in the headers, and which headers to give.
    receiver: str = ""
    with_received_spf: bool = True
    with_authentication_results: bool = True

    @property
    def received_spf(self) -> tuple[str, ...]:
        """One ``Received-SPF:`` header line per identity checked (RFC 7208 §9.1)."""
        if not self.with_received_spf:
            return ()
        return tuple(received_spf(one, self.receiver) for one in self.checked)

    @property
    def authentication_results(self) -> str:
        """One ``Authentication-Results:`` header line (RFC 8601), or "" for none."""
        if not self.with_authentication_results or not self.checked:
            return ""
        return authentication_results(self.checked, self.receiver)

    @property
    def headers(self) -> tuple[str, ...]:
        """Complete header lines for the DATA ACL, Received-SPF first (RFC 7208 §9.1)."""
        ar = self.authentication_results
        return (*self.received_spf, ar) if ar else self.received_spf


# -- pure mapping ------------------------------------------------------------------------------


def decide(checked: Checked, config: SpfConfig, *, give_up: bool = False) -> Verdict:
    """The policy verdict for one SPF result (``give_up``: the temperror give-up rule hit)."""
    result = checked.result
    if result is Result.FAIL and config.fail_action == "reject":
        return Verdict(
            Action.REJECT, FAIL_CODE, FAIL_ECODE, reject_text(checked), CHECK, result.value
        )
    if result is Result.PERMERROR and config.permerror_action == "reject":
        text = f"SPF permanent error for {checked.domain}: {checked.problem or 'bad record'}"
        return Verdict(Action.REJECT, PERMERROR_CODE, PERMERROR_ECODE, text, CHECK, result.value)
    if result is Result.TEMPERROR and config.temperror_action == "defer":
        if give_up:
            return Verdict(Action.ACCEPT, check=CHECK, reason="temperror-give-up")
        text = f"SPF temporary error looking up {checked.domain}; please try again later"
        return Verdict(Action.DEFER, TEMPERROR_CODE, TEMPERROR_ECODE, text, CHECK, result.value)
    reason = "fail-tagged" if result is Result.FAIL else result.value
    return Verdict(Action.ACCEPT, check=CHECK, reason=reason)


def reject_text(checked: Checked) -> str:
    """RFC 7208 §8.4: the reply should say why; the domain's exp= text when it gave one."""
    base = f"SPF fail: {checked.domain} does not authorise {checked.client_ip} to send its mail"
    return f"{base}: {checked.explanation}" if checked.explanation else base


def wide_open(ipv4: int, ipv6: int, config: SpfConfig) -> bool:
    """True when the authorised address counts exceed the configured prefix sizes."""
    return ipv4 > 1 << (32 - config.greylist_max_ipv4_prefix) or ipv6 > 1 << (
        128 - config.greylist_max_ipv6_prefix
    )


def is_checkable(domain: str) -> bool:
    """RFC 7208 §4.3: check_host() gives ``none`` without DNS for a domain that is not a
    multi-label name (``foo@localmx``), and §2.3 for an address literal (``[192.0.2.1]``);
    the same rule for the MAIL FROM domain and the HELO name."""
    name = domain.strip().rstrip(".")
    return "." in name and not name.startswith("[") and all(name.split("."))


def helo_is_checkable(helo: str) -> bool:
    """RFC 7208 §2.3/§4.3: only a multi-label domain name, not an address literal."""
    return is_checkable(helo)


# -- temperror give-up memory ------------------------------------------------------------------


@dataclass(slots=True)
class _Deferrals:
    first: float
    count: int = 0


@dataclass(slots=True)
class TempErrorMemory:
    """Per (client IP, sender): deferrals for temperror so far. Bounded, oldest first out."""

    max_defers: int
    max_time: float
    max_entries: int = MAX_TEMPERROR_ENTRIES
    _entries: OrderedDict[tuple[str, str], _Deferrals] = field(default_factory=OrderedDict)
    #: False in a read-only view (``read_only``): ``give_up`` answers and records nothing.
    recording: bool = True

    def __len__(self) -> int:
        return len(self._entries)

    def read_only(self) -> TempErrorMemory:
        """A view over the same entries whose ``give_up`` records nothing (explain)."""
        return replace(self, recording=False)

    def give_up(self, client: str, sender: str, now: float) -> bool:
        """Record one more temperror; True when the rule says accept instead of defer."""
        key = (client, normalise_sender(sender))
        entry = self._entries.get(key)
        if entry is None or now - entry.first > self.max_time + TEMPERROR_FORGET_AFTER:
            entry = _Deferrals(now)
            if self.recording:
                self._entries[key] = entry
        if not self.recording:
            return self._exhausted(entry, now)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if self._exhausted(entry, now):
            return True
        entry.count += 1
        return False

    def _exhausted(self, entry: _Deferrals, now: float) -> bool:
        return entry.count >= self.max_defers or now - entry.first >= self.max_time


# -- async shell -------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: one per check; treated as immutable
class _Evaluated:
    """What a check derives from DNS alone; reused until its first DNS answer expires."""

    checked: tuple[Checked, ...]
    greylist_domain: str | None
    expires: float


class SpfCheck:
    """Evaluates SPF for a query within the budget and maps the result to policy.

    Results are cached per (client IP, sender, HELO) until the first DNS answer they rest on
    expires (the resolver's clock), in an LRU of ``result_cache_size`` entries: a warm check is a
    dictionary look-up, not a pyspf run."""

    def __init__(
        self, config: SpfConfig, resolver: Resolver | None = None, *, hostname: str | None = None
    ) -> None:
        self.config = config
        self._owns_resolver = resolver is None
        self.resolver = resolver if resolver is not None else resolver_from_config(config)
        self.skip_clients = NetworkSet(config.skip_clients)
        self.receiver = config.authserv_id or hostname or socket.gethostname()
        self.temperrors = TempErrorMemory(config.temperror_max_defers, config.temperror_max_time)
        self._results: OrderedDict[tuple[str, str, str], _Evaluated] = OrderedDict()
        self._guards: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._accepts: dict[str, Verdict] = {}

    async def close(self) -> None:
        if self._owns_resolver:
            await self.resolver.close()

    def read_only(self) -> SpfCheck:
        """This check with its caches and resolver shared and its temperror give-up memory
        only read (explain): it decides as this one would, and changes no decision later."""
        view = copy.copy(self)
        view.temperrors = self.temperrors.read_only()
        view._owns_resolver = False
        return view

    def skip_reason(self, query: Query) -> str:
        if not self.config.enabled:
            return "disabled"
        if query.auth and self.config.skip_authenticated:
            return "authenticated"
        if query.client in self.skip_clients:
            return "skipped-client"
        return ""

    async def check(self, query: Query, now: float) -> SpfOutcome:
        skip = self.skip_reason(query)
        if skip:
            return SpfOutcome(Verdict(Action.ACCEPT, check=CHECK, reason=skip), skipped=skip)
        sender = query.sender.strip().strip("<>")
        client_ip, helo = ip_text(query.client), query.helo.strip()
        key = (client_ip, sender, helo)
        evaluated = self._cached(key) or self._without_records(client_ip, sender, helo)
        if evaluated is None:
            evaluated = await self._evaluate(client_ip, sender, helo, now)
            self._remember(key, evaluated)
        deciding = evaluated.checked[-1]
        give_up = False
        if deciding.result is Result.TEMPERROR and self.config.temperror_action == "defer":
            give_up = self.temperrors.give_up(client_ip, sender, now)
        softfail = deciding.result is Result.SOFTFAIL
        return SpfOutcome(
            verdict=self._decide(deciding, give_up),
            result=deciding.result,
            identity=deciding.identity,
            domain=deciding.domain,
            explanation=deciding.explanation,
            checked=evaluated.checked,
            receiver=self.receiver,
            with_received_spf=self.config.received_spf_header,
            with_authentication_results=self.config.authentication_results_header,
            greylist_domain=evaluated.greylist_domain,
            extra_greylist_delay=self.config.softfail_greylist_delay if softfail else 0.0,
        )

    def _decide(self, checked: Checked, give_up: bool) -> Verdict:
        """``decide``, with its accepting verdicts (which depend on the result alone) made
        once per result instead of once per check."""
        key = checked.result._value_  # an enum member hashes in Python code
        verdict = self._accepts.get(key)
        if verdict is None:
            verdict = decide(checked, self.config, give_up=give_up)
            if verdict.action is Action.ACCEPT and verdict.reason == key:
                self._accepts[key] = verdict
        return verdict

    def _without_records(self, client_ip: str, sender: str, helo: str) -> _Evaluated | None:
        """The check's outcome when no identity it evaluates publishes an SPF record
        (``without_record``: exactly pyspf's ``none``), from the DNS cache alone; None when
        pyspf has to run. Not kept in the result cache: this is about as cheap as a hit, and
        would only push out results that cost a pyspf run."""
        expires = NO_EXPIRY
        checked: list[Checked] = []
        if not sender or self.config.helo == "first":
            if helo_is_checkable(helo):
                no_record = without_record(self.resolver, "", helo)
                if no_record is None:
                    return None
                expires = no_record[1]
                checked.append(
                    Checked(Identity.HELO, Result.NONE, no_record[0], client_ip, "", helo)
                )
            else:
                checked.append(
                    Checked(Identity.HELO, Result.NONE, helo.lower(), client_ip, "", helo)
                )
        if sender and not is_checkable(identity_domain(sender, helo)):
            domain = identity_domain(sender, helo).lower()
            checked.append(Checked(Identity.MAILFROM, Result.NONE, domain, client_ip, sender, helo))
        elif sender:  # a HELO "none" never decides alone (only a HELO fail does)
            no_record = without_record(self.resolver, sender, helo)
            if no_record is None:
                return None
            expires = min(expires, no_record[1])
            checked.append(
                Checked(Identity.MAILFROM, Result.NONE, no_record[0], client_ip, sender, helo)
            )
        return _Evaluated(tuple(checked), None, expires)

    def _cached(self, key: tuple[str, str, str]) -> _Evaluated | None:
        evaluated = self._results.get(key)
        if evaluated is None:
            return None
        if evaluated.expires <= self.resolver.clock():
            del self._results[key]
            return None
        self._results.move_to_end(key)
        return evaluated

    def _remember(self, key: tuple[str, str, str], evaluated: _Evaluated) -> None:
        if evaluated.expires <= self.resolver.clock():
            return
        self._results[key] = evaluated
        while len(self._results) > self.config.result_cache_size:
            self._results.popitem(last=False)

    async def _evaluate(self, client_ip: str, sender: str, helo: str, now: float) -> _Evaluated:
        deadline = asyncio.get_running_loop().time() + self.config.timeout
        expires = NO_EXPIRY
        checked: list[Checked] = []
        if not sender or self.config.helo == "first":
            one, expires = await self._identity(client_ip, "", helo, deadline, now)
            checked.append(one)
        if sender and (not checked or checked[0].result is not Result.FAIL):
            one, until = await self._identity(client_ip, sender, helo, deadline, now)
            checked.append(one)
            expires = min(expires, until)
        deciding = checked[-1]
        greylist_domain = None
        if deciding.result is Result.PASS:
            greylist_domain, until = await self._greylist_domain(deciding.domain, deadline)
            expires = min(expires, until)
        return _Evaluated(tuple(checked), greylist_domain, expires)

    async def _identity(
        self, client_ip: str, sender: str, helo: str, deadline: float, now: float
    ) -> tuple[Checked, float]:
        """One identity's result, and until when it holds (resolver clock)."""
        identity = Identity.MAILFROM if sender else Identity.HELO
        domain = identity_domain(sender, helo).lower()
        if not is_checkable(domain):
            return Checked(identity, Result.NONE, domain, client_ip, sender, helo), NO_EXPIRY
        view = View(self.resolver)
        try:
            evaluation: Evaluation = await drive(
                view,
                lambda: evaluate_once(
                    view, client_ip, sender, helo, receiver=self.receiver, now=now
                ),
                deadline,
            )
        except Timeout:
            logger.info("SPF budget exhausted for %r from %s", sender or helo, client_ip)
            problem = "DNS lookups exceeded the time budget"
            timed_out = Checked(
                identity, Result.TEMPERROR, domain, client_ip, sender, helo, problem=problem
            )
            return timed_out, 0.0  # never cached: the next attempt asks again
        return Checked(
            identity,
            Result(evaluation.result),
            evaluation.domain,
            client_ip,
            sender,
            helo,
            evaluation.explanation,
            evaluation.mechanism,
            evaluation.problem,
        ), view.expires

    async def _greylist_domain(self, domain: str, deadline: float) -> tuple[str | None, float]:
        """``domain`` when its record is not wide open (see authorised_breadth), else None;
        and until when that holds. Kept per domain like results (same bound)."""
        known = self._guards.get(domain)
        if known is not None and known[1] > self.resolver.clock():
            self._guards.move_to_end(domain)
            return known
        answer = await self._guard(domain, deadline)
        if answer[1] > self.resolver.clock():
            self._guards[domain] = answer
            self._guards.move_to_end(domain)
            while len(self._guards) > self.config.result_cache_size:
                self._guards.popitem(last=False)
        return answer

    async def _guard(self, domain: str, deadline: float) -> tuple[str | None, float]:
        view = View(self.resolver)
        try:
            breadth = await drive(view, lambda: authorised_breadth(view, domain), deadline)
        except Timeout:
            return None, 0.0
        if breadth.unbounded:
            logger.debug("SPF record of %s not used as greylist key: %s", domain, breadth.unbounded)
            return None, view.expires
        if wide_open(breadth.ipv4, breadth.ipv6, self.config):
            logger.debug("SPF record of %s too wide for a greylist key", domain)
            return None, view.expires
        return domain, view.expires


def resolver_from_config(config: SpfConfig) -> Resolver:
    """The shared resolver as ``[spf]`` describes it."""
    return Resolver(
        config.nameservers,
        cache_size=config.cache_size,
        query_timeout=config.query_timeout,
        negative_ttl=config.negative_ttl,
    )

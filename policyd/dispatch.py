"""Routes one question through the checks: the daemon's one fail-safe boundary.

Whatever goes wrong below (a store down, a bug), the answer is a well-formed fallback and a
log line; never an exception into the server, never a 5xx for a temporary reason.
``asyncio.CancelledError`` always propagates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from . import __version__
from .addresses import NetworkSet
from .checks.greylist import Greylist, GreylistResult, Status
from .checks.ratelimit import Decision, RateLimiter
from .checks.spf_headers import Identity, Result
from .config import Config
from .decision_log import DecisionLog, HashedFields
from .identity_memo import IdentityMemo
from .lograte import LogLimiter
from .metrics import Metrics
from .model import Action, Query, Stage, Verdict
from .protocol import ProtocolError, error_answer, format_answer, parse_request
from .stale import MICROSECONDS, Age, classify
from .stores import QuestionStore, StoreUnavailable
from .stores.keys import HashedStore
from .stores.timed import TimedStore
from .transactions import Transaction, TransactionMemory
from .whitelist import Whitelist

if TYPE_CHECKING:  # SPF needs aiodns and pyspf: imported only when [spf] is enabled
    from .checks.spf import SpfCheck, SpfOutcome
    from .dns import Resolver

logger = logging.getLogger(__name__)

#: RFC 3463 4.3.0 "other or undefined mail system status": our own trouble, retry later.
FALLBACK_DEFER: Final = Verdict(
    Action.DEFER, 451, "4.3.0", "policy service busy, try again later", check="fallback"
)
#: Requests are logged with %r and cut to this length so a hostile one cannot flood the log.
LOGGED_REQUEST_BYTES: Final = 300
#: Shared RCPT verdicts (greylisting's, the whitelists') with ``skip_data`` set, kept once.
SKIP_DATA_MEMO_ENTRIES: Final = 256


def spf_pass_domain(outcome: SpfOutcome | None) -> str:
    """The MAIL FROM domain when SPF passed for it ('' otherwise): what a sender_domain
    whitelist entry may match (design.md §3: only when SPF passes)."""
    if outcome is None or outcome.result is not Result.PASS:
        return ""
    if outcome.identity is not Identity.MAILFROM:
        return ""
    return outcome.domain.lower()


@dataclass(slots=True)
class Trace:
    """What the dispatcher found for one question, filled only by a dispatcher given one
    (``policyctl explain``, policyd/admin/explain.py): the findings come from the one decision
    path instead of a second copy of it. A check it did not reach stays None (or empty)."""

    spf: SpfOutcome | None = None
    greylist: GreylistResult | None = None
    ratelimit: tuple[Decision, ...] = ()


def fallback_verdict(config: Config, cause: str) -> Verdict:
    """The configured answer when the daemon cannot decide (``[server] fallback``)."""
    if config.server.fallback == "defer":
        return dataclasses.replace(FALLBACK_DEFER, reason=cause)
    return Verdict(Action.ACCEPT, check="fallback", reason=f"fallback {cause}")


class Dispatcher:
    """Decides answers; holds the policy (swapped on reload) and the transaction memory."""

    def __init__(
        self,
        config: Config,
        store: QuestionStore,
        *,
        clock: Callable[[], float] = time.time,
        hostname: str | None = None,
        metrics: Metrics | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.metrics = metrics or Metrics(enabled=False)
        self.resolver = resolver
        self.spf: SpfCheck | None = None
        self.raw_store = store
        self.store: QuestionStore = (
            TimedStore(store, self.metrics) if self.metrics.registry else store
        )
        self.whitelist = Whitelist([])
        self.decisions = DecisionLog()
        #: Per-question warnings, one line per kind per interval (policyd/lograte.py).
        self.warnings = LogLimiter()
        # Label children looked up once: labels() costs more than the increment itself.
        self._per_stage = tuple(
            (
                self.metrics.questions.labels(stage.value),
                self.metrics.latency.labels(stage.value),
            )
            for stage in (Stage.RCPT, Stage.DATA)
        )
        self._decision_counters: dict[tuple[str, str, str], Any] = {}
        self._spf_counters: dict[tuple[str, str], Any] = {}
        self._ratelimit_counters: dict[tuple[str, str], Any] = {}
        self.clock = clock
        self.hostname = hostname or socket.gethostname()
        self.txns = TransactionMemory()
        self.conns = TransactionMemory()
        self._skipping = IdentityMemo(_skip_data, SKIP_DATA_MEMO_ENTRIES)
        #: Filled with the findings when set (a read-only view's; see ``read_only``).
        self.trace: Trace | None = None
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Apply a (re)loaded policy; the store and listeners stay as they are."""
        self.config = config
        self.greylist = Greylist(config.greylist, self.store)
        store = self.raw_store
        hashed = None
        if isinstance(store, HashedStore):  # hash_secret: the log keys people as the store
            grey = config.greylist
            hashed = HashedFields(store.hasher, grey.ipv4_prefix, grey.ipv6_prefix)
        self.decisions.configure(config.server.log_decisions, hashed)
        previous = self.spf
        self.spf = None
        if config.spf.enabled:
            from .checks.spf import SpfCheck, resolver_from_config

            if self.resolver is None:
                # One resolver (and DNS cache) for the daemon's life; its settings
                # (nameservers, cache size) take effect at start.
                self.resolver = resolver_from_config(config.spf)
            self.spf = SpfCheck(config.spf, self.resolver, hostname=self.hostname)
            if previous is not None:  # keep the temperror give-up counts across reloads
                self.spf.temperrors = previous.temperrors
        rules = config.ratelimit.rule if config.ratelimit.enabled else ()
        #: Whether the DATA question decides anything (a rate rule at stage data); if not,
        #: RCPT answers tell fragments that sent skipdata=1 not to ask it.
        self.data_question_needed = any(rule.stage == Stage.DATA.value for rule in rules)
        self.ratelimit = RateLimiter(rules, NetworkSet(config.ratelimit.exempt_clients), self.store)
        for name, tally in self.ratelimit.counters.items():
            self.metrics.ratelimit_fill.labels(name).set_function(tally.take_peak_fill)

    def read_only(self, store: QuestionStore) -> Dispatcher:
        """A dispatcher deciding as this one does, over ``store`` (explain's read-only view,
        policyd/stores/readonly.py), with a trace to fill: same policy and runtime whitelist,
        the SPF check's caches shared but its temperror give-up memory only read, a new
        transaction memory (the question is the first recipient of a new message), and
        metrics and the decision log of its own, never exported or written. State that a
        decision depends on and that is added here must be shared or read-only there too."""
        view = Dispatcher(
            self.config, store, clock=self.clock, hostname=self.hostname, resolver=self.resolver
        )
        view.whitelist = self.whitelist
        view.spf = self.spf.read_only() if self.spf is not None else None
        view.trace = Trace()
        return view

    async def decide(self, query: Query, now: float) -> Verdict:
        """The verdict for a decoded RCPT question, without the fail-safe boundary, the
        decision log or the question metrics (``answer`` has them; explain uses this)."""
        if query.stage is not Stage.RCPT:
            raise ValueError("only RCPT questions are decided here")
        return await self._rcpt(query, now)

    async def aclose(self) -> None:
        """Release what the checks hold (the DNS resolver); write the warnings' counts."""
        self.warnings.flush(all_windows=True)
        if self.resolver is not None:
            await self.resolver.close()
            self.resolver = None

    def fallback(self, cause: str) -> bytes:
        """The fallback answer for a question the server could not hand over (busy, deadline)."""
        return format_answer(self._fallback_verdict(cause))

    async def answer(self, request: bytes) -> bytes:
        """Answer bytes for request bytes. Never raises except on cancellation."""
        started = time.perf_counter()
        try:
            query = parse_request(request)
        except ProtocolError as exc:
            self.warnings.warning(
                logger, "bad request: %s; request=%r", exc, request[:LOGGED_REQUEST_BYTES]
            )
            self.metrics.bad_requests.inc()
            return error_answer(f"bad request: {exc}")
        try:
            now = self.clock()
            if query.asked and self._gave_up(query, now):
                # Not decided, not logged or counted as a decision: only as a fallback.
                return self.fallback("stale")
            # The stage's coroutine directly: one frame less than a shared decide().
            if query.stage is Stage.RCPT:
                verdict = await self._rcpt(query, now)
                if (
                    query.skip_data
                    and verdict.action is Action.ACCEPT
                    and verdict.check != "fallback"
                ):
                    verdict = self._carry_to_data(query, verdict, now)
            else:
                verdict = await self._data(query, now)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:
            # DEBUG: the store logs its outage once per state change (the breaker); a line
            # per question here would flood the log at thousands per second.
            logger.debug("store unavailable, answering fallback: %s", exc)
            verdict = self._fallback_verdict("store-unavailable")
        except Exception:
            self.warnings.exception(
                logger, "check failed; answering fallback for %r", request[:LOGGED_REQUEST_BYTES]
            )
            verdict = self._fallback_verdict("internal-error")
        self.decisions.record(query, verdict)
        self._count(query.stage, verdict, time.perf_counter() - started)
        return format_answer(verdict)

    def _gave_up(self, query: Query, now: float) -> bool:
        """Whether Exim stopped waiting for this question before we read it (``t=``;
        policyd/stale.py); an implausible ``t=`` is ignored with a rate-limited warning."""
        age = classify(query.asked, now)
        if age is Age.FRESH:
            return False
        detail = (
            f"{query.stage._value_} client={query.client} txn={query.txn!r} "
            f"age={now - query.asked / MICROSECONDS:.3f}s"
        )
        if age is Age.STALE:
            self.warnings.warning(
                logger, "answered the fallback to a question Exim gave up on: %s", detail
            )
            return True
        self.warnings.warning(logger, "ignored an implausible t= (clocks disagree?): %s", detail)
        return False

    def _fallback_verdict(self, cause: str) -> Verdict:
        self.metrics.fallbacks.labels(cause).inc()
        return fallback_verdict(self.config, cause)

    def _count(self, stage: Stage, verdict: Verdict, seconds: float) -> None:
        # Identity tests and ``_value_``: hashing an enum member (a dict key) and its
        # ``.value`` descriptor both run Python code.
        questions, latency = self._per_stage[0 if stage is Stage.RCPT else 1]
        questions.inc()
        latency.observe(seconds)
        labels = (verdict.check or "-", verdict.reason or "-", verdict.action._value_)
        _child(self._decision_counters, self.metrics.decisions, labels).inc()

    async def _rcpt(self, query: Query, now: float) -> Verdict:
        txn = self.txns.setdefault(query.txn, now)
        # Each step is awaited only when it has work: a coroutine started for nothing costs.
        spf = None
        if self.spf is not None and not query.relay:
            spf = await self._spf(query, txn, now)
            if spf.verdict.is_final:
                if spf.verdict.action is Action.DEFER:
                    await self._start_greylist_clock(query, now, spf)
                return spf.verdict
        # Greylisting before rate limits: a deferred attempt will come back, and must not be
        # counted against a flood limit twice.
        grey = await self._greylist(query, txn, now, spf)
        if grey.is_final or not self.ratelimit.rules:
            return grey
        return await self._ratelimit(query, txn, now) or grey

    async def _spf(self, query: Query, txn: Transaction, now: float) -> SpfOutcome:
        """SPF once per transaction (the sender is the same for every recipient); only
        when SPF is on and the client is not a relay."""
        assert self.spf is not None
        if txn.spf is None:
            txn.spf = await self.spf.check(query, now)
            outcome = txn.spf
            if outcome.result is not None and outcome.identity is not None:
                labels = (outcome.identity._value_, outcome.result._value_)
                _child(self._spf_counters, self.metrics.spf, labels).inc()
        if self.trace is not None:
            self.trace.spf = txn.spf
        return txn.spf

    async def _start_greylist_clock(self, query: Query, now: float, spf: SpfOutcome) -> None:
        """An SPF deferral (temperror) counts as the greylisting attempt it stands in for, so
        that a sender is not delayed twice (docs/greylisting.md, "SPF deferrals"): the attempt
        is recorded under the client-network triplet and under the SPF-domain triplet that a
        later pass keys on. Both clocks keep the first attempt's time; the greylist verdict is
        not used (the answer is SPF's deferral), and a store failure only costs the head start.
        """
        try:
            await self.greylist.check(query, now, self.whitelist)
            if spf.domain:
                await self.greylist.check(query, now, self.whitelist, spf_domain=spf.domain)
        except StoreUnavailable as exc:
            logger.debug("greylist clock not started for an SPF deferral: %s", exc)

    async def _greylist(
        self, query: Query, txn: Transaction, now: float, spf: SpfOutcome | None
    ) -> Verdict:
        together = self.config.greylist.multi_recipient == "first"
        earlier = txn.greylist if together else None
        result = await self.greylist.check(
            query,
            now,
            self.whitelist,
            spf_pass_domain=spf_pass_domain(spf),
            force_pass=earlier is Action.ACCEPT,
            spf_domain=spf.greylist_domain if spf is not None else None,
            extra_delay=spf.extra_greylist_delay if spf is not None else 0.0,
        )
        if self.trace is not None:
            self.trace.greylist = result
        if result.status is None:  # skipped: whitelists do not decide for the others
            return result.verdict
        txn.delayed = max(txn.delayed, result.delayed)
        if result.status is Status.PASSED:
            self.metrics.greylist_delay.observe(result.delayed)
        if earlier is None:
            txn.greylist = result.verdict.action
            return result.verdict
        if earlier is Action.DEFER and result.verdict.action is Action.ACCEPT:
            # The message was already deferred for an earlier recipient: defer this one too,
            # so the whole message comes back at once (its triplet is now recorded).
            text = "Greylisted together with the other recipients of this message"
            return Verdict(Action.DEFER, 451, "4.7.1", text, check="greylist", reason="together")
        return result.verdict

    async def _ratelimit(self, query: Query, txn: Transaction, now: float) -> Verdict | None:
        """Flood limits; per-message and per-connection rules are charged once."""
        limiter = self.ratelimit
        if not limiter.rules:
            return None
        if txn.rate_refused is not None:
            return txn.rate_refused
        conn = self.conns.setdefault(query.conn, now)
        result = await limiter.check(query, now, txn.rate_charged | conn.rate_charged)
        if self.trace is not None:
            self.trace.ratelimit = result.decisions
        for decision in result.decisions:
            outcome = "allowed" if decision.outcome.allowed else "limited"
            if not decision.outcome.allowed and decision.charge.dry_run:
                outcome = "would_limit"
            labels = (decision.charge.rule, outcome)
            _child(self._ratelimit_counters, self.metrics.ratelimit, labels).inc()
        if result.verdict is not None:
            if limiter.once_per_message(result.verdict.reason):
                txn.rate_refused = result.verdict
            return result.verdict
        for name in result.charged:
            # Frozensets: the empty default is shared, no allocation per transaction.
            holder = conn if limiter.per_connection(name) else txn
            holder.rate_charged = holder.rate_charged | {name}
        return None

    def _carry_to_data(self, query: Query, verdict: Verdict, now: float) -> Verdict:
        """An accepted recipient's answer for a fragment that can skip its DATA question:
        ``skipdata`` and the message's header lines so far, unless DATA decides something
        (then the fragment asks, and the DATA answer carries the headers)."""
        if self.data_question_needed:
            return verdict
        txn = self.txns.get(query.txn, now)
        headers = self._headers(txn, now) if txn is not None else ()
        if not headers:
            return self._skipping(verdict)
        return dataclasses.replace(verdict, skip_data=True, headers=headers)

    async def _data(self, query: Query, now: float) -> Verdict:
        txn = self.txns.setdefault(query.txn, now)
        limited = await self._ratelimit(query, txn, now)
        if limited is not None:
            return limited
        return Verdict(Action.ACCEPT, check="data", headers=self._headers(txn, now))

    def _headers(self, txn: Transaction, now: float) -> tuple[str, ...]:
        """The header lines for the message: SPF's, and X-Greylist if it was delayed."""
        headers: list[str] = list(txn.spf.headers) if txn.spf is not None else []
        if txn.delayed > 0 and self.config.greylist.add_header:
            date = email.utils.formatdate(now, usegmt=True)
            headers.append(
                f"X-Greylist: delayed {round(txn.delayed)} seconds by policyd-{__version__} "
                f"at {self.hostname}; {date}"
            )
        return tuple(headers)


def _skip_data(verdict: Verdict) -> Verdict:
    return dataclasses.replace(verdict, skip_data=True)


def _child(children: dict[Any, Any], family: Any, labels: tuple[str, ...]) -> Any:
    """A metric family's child for ``labels``, looked up once: ``labels()`` costs more than
    the increment itself. Few label sets exist (checks × reasons × actions)."""
    child = children.get(labels)
    if child is None:
        child = children[labels] = family.labels(*labels)
    return child

"""Flood protection: exact rate limits with GCRA, and the shell that builds keys from rules.

GCRA (the generic cell rate algorithm) keeps one number per key, the theoretical arrival
time (TAT). With emission interval ``T = period / count`` and a burst of ``B`` units, a
request of cost ``n`` at time ``now`` is admitted when ``max(TAT, now) + n·T - now <= B·T``,
and then ``TAT := max(TAT, now) + n·T``. Over any interval of length ``t`` at most
``B + t/T`` units are admitted, a refused request changes nothing (a flood cannot extend its
own block), and the exact retry-after of a refused request is known.

Nothing here reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from ..addresses import AddressPatterns, NetworkSet, client_network, domain_of, normalise_sender
from ..config import RateRule
from ..model import Action, Query, Stage, Verdict

logger = logging.getLogger(__name__)

CHECK: Final = "ratelimit"
#: RFC 3463 4.7.1: refused by policy; temporary unless the rule says reject.
DEFER_CODE: Final = 451
DEFER_ECODE: Final = "4.7.1"
REJECT_CODE: Final = 550
REJECT_ECODE: Final = "5.7.1"
KEY_SEPARATOR: Final = "|"


@dataclass(frozen=True, slots=True)
class Limit:
    """``count`` units per ``period`` seconds, at most ``burst`` at once."""

    count: int
    period: float
    burst: int

    @property
    def interval(self) -> float:
        """Emission interval T: seconds 'paid back' per admitted unit."""
        return self.period / self.count


@dataclass(frozen=True, slots=True)
class Outcome:
    """One rule's answer for one request: admitted or not, and the state to store."""

    allowed: bool
    tat: float
    #: seconds until the same request would be admitted (0 when allowed)
    retry_after: float
    #: fraction of the burst in use after this request, 0..1 (for "how close to the limit")
    fill: float


def gcra(tat: float | None, now: float, cost: int, limit: Limit) -> Outcome:
    """One GCRA decision. ``tat`` None means a fresh key."""
    interval = limit.interval
    base = now if tat is None or tat < now else tat
    new_tat = base + cost * interval
    allow_until = now + limit.burst * interval
    if new_tat <= allow_until + 1e-9:
        return Outcome(True, new_tat, 0.0, min(1.0, (new_tat - now) / (limit.burst * interval)))
    previous = base if tat is not None else now
    fill = min(1.0, (previous - now) / (limit.burst * interval))
    if cost > limit.burst:
        return Outcome(False, previous, math.inf, fill)
    return Outcome(False, previous, new_tat - allow_until, fill)


def state_ttl(tat: float, now: float) -> float:
    """After TAT the key is indistinguishable from a fresh one: keep it that long."""
    return max(0.0, tat - now)


class Counted(enum.Enum):
    """What a rule counts; the cost of one question depends on it and on the stage."""

    CONNECTIONS = "connections"
    MESSAGES = "messages"
    RECIPIENTS = "recipients"
    BYTES = "bytes"


@dataclass(frozen=True, slots=True)
class Charge:
    """One rule applied to one question: the key, its cost, and the limit."""

    rule: str
    key: str
    cost: int
    limit: Limit
    dry_run: bool


@dataclass(frozen=True, slots=True)
class Decision:
    """What the store decided for one charge of a question."""

    charge: Charge
    outcome: Outcome


class RateLimitStore(Protocol):
    """One atomic operation per question: admit all enforced charges, or none."""

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]: ...


def decide_all(
    states: Sequence[float | None], charges: Sequence[Charge], now: float
) -> tuple[list[Decision], bool]:
    """Pure all-or-nothing rule over several charges: the question is admitted when every
    enforced charge is; only then is any state advanced (dry-run charges that would refuse
    never advance). Returns the decisions and whether states must be written."""
    decisions = [
        Decision(charge, gcra(state, now, charge.cost, charge.limit))
        for state, charge in zip(states, charges, strict=True)
    ]
    admitted = all(d.outcome.allowed for d in decisions if not d.charge.dry_run)
    return decisions, admitted


def rule_applies(
    rule: RateRule, query: Query, exempt_clients: NetworkSet, exempt_senders: AddressPatterns
) -> bool:
    """Stage and exemptions; the client and sender exemptions come pre-built per rule."""
    if rule.stage != query.stage.value:
        return False
    if query.client in exempt_clients:
        return False
    if query.auth and query.auth.lower() in rule.exempt_users:
        return False
    return not (exempt_senders and exempt_senders.match(query.sender.lower()))


def key_parts(rule: RateRule, query: Query) -> list[str] | None:
    """The key values for a rule, or None when a part is missing (e.g. no auth user)."""
    parts: list[str] = []
    for part in rule.key:
        if part == "client":
            value = client_network(query.client, rule.ipv4_prefix, rule.ipv6_prefix)
        elif part == "sender":
            value = normalise_sender(query.sender)
        elif part == "sender_domain":
            value = domain_of(query.sender) or "<>"
        elif part == "auth":
            value = query.auth.lower()
        elif part == "recipient":
            value = query.recipient.lower()
        elif part == "recipient_domain":
            value = domain_of(query.recipient)
        else:  # config validation makes this unreachable
            raise ValueError(part)
        if not value:
            return None
        parts.append(value)
    return parts


def cost_of(counted: Counted, query: Query) -> int:
    """Units one question costs for a rule evaluated at the question's stage."""
    if counted is Counted.RECIPIENTS:
        return 1 if query.stage is Stage.RCPT else max(1, query.nrcpt)
    if counted is Counted.BYTES:
        return max(1, query.size)
    return 1  # messages and connections: once per transaction / connection (see dispatch)


def verdict_for(decisions: Sequence[Decision], rules: dict[str, RateRule]) -> Verdict | None:
    """The refusal to send, if an enforced rule refused; None when admitted."""
    refused = [d for d in decisions if not d.outcome.allowed and not d.charge.dry_run]
    if not refused:
        return None
    worst = max(refused, key=lambda d: d.outcome.retry_after)
    rule = rules[worst.charge.rule]
    wait = worst.outcome.retry_after
    seconds = 0 if math.isinf(wait) else max(1, math.ceil(wait))
    when = f"in {seconds} second{'' if seconds == 1 else 's'}" if seconds else "later"
    text = rule.message.replace("{rule}", rule.name).replace("{retry}", when)
    if rule.action == "reject":
        return Verdict(Action.REJECT, REJECT_CODE, REJECT_ECODE, text, CHECK, rule.name)
    return Verdict(Action.DEFER, DEFER_CODE, DEFER_ECODE, text, CHECK, rule.name)


@dataclass(slots=True)
class RuleCounters:
    """Per-rule tallies kept by the shell (exported as metrics)."""

    allowed: int = 0
    limited: int = 0
    would_limit: int = 0
    #: highest burst fill seen since the last read, 0..1 ("how close to the limit")
    peak_fill: float = 0.0

    def take_peak_fill(self) -> float:
        """The peak since the last call, then start over (read at each metrics scrape)."""
        peak, self.peak_fill = self.peak_fill, 0.0
        return peak


@dataclass(frozen=True, slots=True)
class RateResult:
    """The refusal (None when admitted) and which per-message/connection rules were charged."""

    verdict: Verdict | None
    charged: frozenset[str]
    decisions: tuple[Decision, ...] = ()


class RateLimiter:
    """The async shell: which rules apply, their keys and costs, one store call, the verdict."""

    def __init__(
        self, rules: Sequence[RateRule], exempt: NetworkSet, store: RateLimitStore
    ) -> None:
        self.rules = {rule.name: rule for rule in rules}
        self.exempt_global = exempt
        self.exempt = {
            rule.name: (NetworkSet(rule.exempt_clients), AddressPatterns(rule.exempt_senders))
            for rule in rules
        }
        self.limits = {
            rule.name: Limit(rule.rate[0], rule.rate[1], rule.effective_burst) for rule in rules
        }
        self.counted = {rule.name: Counted(rule.count) for rule in rules}
        self.counters = {rule.name: RuleCounters() for rule in rules}
        self.store = store

    def charges(self, query: Query, already: frozenset[str] | set[str]) -> list[Charge]:
        """The charges one question makes; rules in ``already`` (per-message or
        per-connection rules charged earlier in this transaction/connection) are skipped."""
        if query.client in self.exempt_global:
            return []
        out: list[Charge] = []
        for name, rule in self.rules.items():
            if name in already or not rule_applies(rule, query, *self.exempt[name]):
                continue
            parts = key_parts(rule, query)
            if parts is None:
                continue
            key = KEY_SEPARATOR.join((name, *parts))
            out.append(
                Charge(
                    name, key, cost_of(self.counted[name], query), self.limits[name], rule.dry_run
                )
            )
        return out

    def once_per_message(self, name: str) -> bool:
        """Rules charged once per transaction or connection, not per question."""
        return self.counted[name] in (Counted.MESSAGES, Counted.CONNECTIONS)

    def per_connection(self, name: str) -> bool:
        return self.counted[name] is Counted.CONNECTIONS

    async def check(
        self, query: Query, now: float, already: frozenset[str] | set[str]
    ) -> RateResult:
        charges = self.charges(query, already)
        if not charges:
            return RateResult(None, frozenset())
        decisions = await self.store.ratelimit_step(charges, now)
        verdict = verdict_for(decisions, self.rules)
        for d in decisions:
            tally = self.counters[d.charge.rule]
            tally.peak_fill = max(tally.peak_fill, d.outcome.fill)
            if d.outcome.allowed:
                tally.allowed += 1
            elif d.charge.dry_run:
                tally.would_limit += 1
                logger.info(
                    "ratelimit dry-run rule=%s key=%r would refuse; retry in %.0fs",
                    d.charge.rule,
                    d.charge.key,
                    d.outcome.retry_after,
                )
            else:
                tally.limited += 1
        charged = frozenset(
            d.charge.rule
            for d in decisions
            if verdict is None and self.once_per_message(d.charge.rule)
        )
        return RateResult(verdict, charged, tuple(decisions))

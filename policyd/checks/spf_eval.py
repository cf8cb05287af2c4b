"""RFC 7208 evaluation with pyspf, its DNS made asynchronous by evaluate-and-retry.

pyspf's ``query`` class is synchronous and does DNS through one method, ``dns()``. Here that
method reads a per-evaluation ``View`` of the shared ``Resolver`` cache instead of the
network. On a cache miss it notes the missing (name, type) and raises ``NeedRecords``; the
async driver fetches every noted record concurrently through ``policyd.dns`` and evaluates
again from the start with the warmer view. Evaluation is deterministic over the view, so
the final run is exactly pyspf's answer for those DNS answers; every answer a run has seen is
pinned in the view, so a TTL expiring between two runs cannot change the result midway.
Runs are cheap (tens of µs) and few: each adds at least one record, and RFC 7208 §4.6.4
bounds the records (10 DNS-querying terms, 2 void lookups, 10 MX/PTR names), so
``MAX_ROUNDS`` is never the binding limit for a valid record.

The same machinery drives the wide-open guard (``authorised_breadth``): how much address
space a domain's record authorises, for greylisting keyed on the SPF-validated domain.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final, TypeVar

from ..dns import Answer, Key, Resolver, Status, normalise_name, valid_name


def _import_pyspf() -> ModuleType:
    """pyspf, made to pick py3dns for the DNS driver it insists on importing (and that is
    never used here): it prefers dnspython when installed (Debian's python3-spf accepts
    python3-dnspython), and the daemon's modules imported with dnspython took 33.5 MiB of
    RSS instead of 29.2 MiB (+4.2 MiB, +14 %; docs/decisions.md). Hiding ``dns`` from the
    import is the only way to choose (pyspf has no switch). Canary:
    ``test_pyspf_dns_driver_choice``."""
    if "dns" not in sys.modules:
        sys.modules["dns"] = None  # type: ignore[assignment]  # makes "import dns" fail
        try:
            return importlib.import_module("spf")
        except ImportError:
            pass  # no py3dns: let pyspf have dnspython after all
        finally:
            del sys.modules["dns"]
    return importlib.import_module("spf")


spf: Any = _import_pyspf()

#: Evaluation runs per check. A record within RFC 7208 §4.6.4 needs at most
#: 1 (TXT) + 10 terms × 2 (mx/ptr: names, then their addresses) + 1 (exp=) + 2 (%{p}) = 24.
MAX_ROUNDS: Final = 32
#: RFC 7208 §4.6.4: terms that cause DNS queries, per check.
MAX_DNS_TERMS: Final = spf.MAX_LOOKUP
MAX_MX: Final = spf.MAX_MX
MAX_PTR: Final = spf.MAX_PTR
_T = TypeVar("_T")
_DEFAULT_EXPLANATIONS: Final = frozenset(spf.EXPLANATIONS.values())
_RE_SPF: Final = spf.RE_SPF  # what dns_spf takes for an SPF record
_MAX_LABEL: Final = 63  # dns_spf's test for a malformed domain (RFC 1035 §2.3.4)
#: The expiry of a result no DNS answer bounds (yet): a view before its first answer, a
#: domain that cannot have a record.
NO_EXPIRY: Final = float("inf")


class NeedRecords(Exception):
    """Raised inside an evaluation run: these (name, type) keys are not in the view yet."""


class View:
    """One evaluation's picture of DNS: answers pinned on first read, misses collected."""

    __slots__ = ("_pinned", "expires", "missing", "resolver")

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._pinned: dict[Key, Answer] = {}
        self.missing: set[Key] = set()
        #: When the first pinned answer expires: a result derived from this view is valid
        #: until then (resolver clock).
        self.expires = NO_EXPIRY

    def get(self, name: str, rtype: str) -> Answer | None:
        key = (normalise_name(name), rtype)
        answer = self._pinned.get(key)
        if answer is None:
            answer = self.resolver.peek(*key)
            if answer is None:
                self.missing.add(key)
                return None
            self.pin(key, answer)
        return answer

    def need(self, name: str, rtype: str) -> Answer:
        """The answer, or raise NeedRecords (after noting it missing)."""
        answer = self.get(name, rtype)
        if answer is None:
            raise NeedRecords
        return answer

    def require(self, keys: Iterable[tuple[str, str]]) -> None:
        """Note every missing key at once (so they are fetched together), then raise if any."""
        absent = [key for key in keys if self.get(*key) is None]
        if absent:
            raise NeedRecords

    def pin(self, key: Key, answer: Answer) -> None:
        self._pinned[key] = answer
        self.expires = min(self.expires, answer.expires)


class Timeout(Exception):
    """The time budget ran out while DNS answers were still awaited."""


async def drive(view: View, step: Callable[[], _T], deadline: float) -> _T:
    """Run ``step`` until it completes without missing records, fetching between runs.

    ``deadline`` is in event-loop time. Raises Timeout when it passes with answers still
    awaited; the queries go on and fill the shared cache for the next attempt."""
    loop = asyncio.get_running_loop()
    for _ in range(MAX_ROUNDS):
        view.missing.clear()
        try:
            return step()
        except NeedRecords:
            if not view.missing:
                raise RuntimeError("NeedRecords raised with nothing missing") from None
        keys = sorted(view.missing)
        tasks = [view.resolver.fetch(*key) for key in keys]
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise Timeout
        _done, pending = await asyncio.wait(tasks, timeout=remaining)
        if pending:
            raise Timeout
        for key, task in zip(keys, tasks, strict=True):
            view.pin(key, task.result())
    raise Timeout  # not reachable within the RFC limits; treated like running out of time


@dataclass(frozen=True, slots=True)
class Evaluation:
    """pyspf's verdict for one identity."""

    result: str
    #: The exp= text for fail/softfail/permerror when the domain published one, else "".
    explanation: str
    #: The directive that matched at the top level ("" for the default result).
    mechanism: str
    #: What went wrong, for permerror/temperror.
    problem: str
    #: The domain checked (sender domain, or the HELO name for the helo identity).
    domain: str
    identity: str


class _CachedQuery(spf.query):  # type: ignore[misc]  # pyspf is untyped
    """pyspf's query with DNS served from a View; misses raise NeedRecords."""

    def __init__(self, view: View, ip: str, sender: str, helo: str, *, receiver: str, now: float):
        super().__init__(i=ip, s=sender, h=helo, receiver=receiver, strict=True)
        self.t = str(int(now))  # the %{t} macro: no clock reads in the check
        self._view = view

    def dns(
        self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        # Same contract as spf.query.dns; CNAMEs are followed by the recursive resolver.
        if not name:
            raise spf.PermError("Invalid empty domain name")
        name = normalise_name(str(name))
        if not valid_name(name):
            return []  # pyspf: an invalid name gives no data and is not a void lookup
        if qtype not in ("A", "AAAA", "MX", "PTR", "TXT"):
            return []  # type SPF (99) is only asked in pyspf's "harsh" mode, not used here
        answer = self._view.need(name, qtype)
        if answer.status is Status.TEMPFAIL:
            raise spf.TempError(f"DNS {answer.error or 'temporary failure'} for {name}/{qtype}")
        if qtype == "TXT":
            result: list[Any] = [(value,) for value in answer.values]
        else:
            result = list(answer.values)
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result

    def dns_mx(self, domainname: str) -> list[Any]:
        # As pyspf (strict), but every exchange's addresses are asked for in one round.
        mxnames = self.dns(domainname, "MX")
        if len(mxnames) > MAX_MX:
            raise spf.PermError(f"More than {MAX_MX} MX records returned")
        mxnames.sort()
        self._view.require((mx[1], self.A) for mx in mxnames if valid_name(mx[1]))
        return [a for mx in mxnames for a in self.dns_a(mx[1], self.A)]

    def validated_ptrs(self) -> list[str]:
        # As pyspf (strict): at most MAX_PTR names, each confirmed by a forward lookup; plus
        # RFC 7208 §5.5's error rules, which pyspf leaves to its DNS layer: a DNS error on the
        # PTR lookup means no match, one on a name's address lookup skips that name.
        try:
            names = self.dns_ptr(self.i)[:MAX_PTR]
        except spf.TempError:
            return []
        self._view.require((p, self.A) for p in names if valid_name(normalise_name(p)))
        validated = []
        for name in names:
            try:
                addresses = self.dns_a(name, self.A)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                validated.append(name)
        return validated


def evaluate_once(
    view: View, ip: str, sender: str, helo: str, *, receiver: str, now: float
) -> Evaluation:
    """One synchronous pyspf run over the view; raises NeedRecords when answers are missing.

    ``sender`` empty means the HELO identity (RFC 7208 §2.3: postmaster@helo)."""
    query = _CachedQuery(view, ip, sender, helo, receiver=receiver, now=now)
    result, _code, explanation = query.check()
    if view.missing:  # a miss swallowed inside pyspf (its exp= handling catches everything)
        raise NeedRecords
    if explanation in _DEFAULT_EXPLANATIONS or result not in ("fail", "softfail", "permerror"):
        explanation = ""
    mechanism = query.mechanism or ""
    problem = getattr(query, "prob", "") if result in ("permerror", "temperror") else ""
    return Evaluation(
        result, explanation, mechanism, problem, str(query.o).lower(), str(query.ident)
    )


def identity_domain(sender: str, helo: str) -> str:
    """The domain an identity is checked for, taken as pyspf takes it (``split_email``: the
    part after the first ``@``; the HELO name for the null sender)."""
    return str(spf.split_email(sender, helo)[1])


def without_record(resolver: Resolver, sender: str, helo: str) -> tuple[str, float] | None:
    """``(domain, expires)`` when pyspf's answer for this identity is certainly ``none``
    because the domain publishes no SPF record (RFC 7208 §4.5: then the result is ``none``
    whatever the client address), read from the cache alone; None: evaluate with pyspf.

    Follows pyspf's own path step by step (``query.__init__``, ``check``, ``dns_spf``,
    ``dns_txt`` and ``_CachedQuery.dns``), so the shortcut gives exactly pyspf's result
    (``none``, no explanation, mechanism or problem) without building a query: a malformed
    domain or one c-ares cannot ask for has no record; a void TXT answer, or one without a
    ``v=spf1`` string, has none either. A miss, a temporary failure or any SPF record goes
    the full way. ``expires`` is when the TXT answer this rests on expires."""
    domain = identity_domain(sender, helo)
    for label in domain.split("."):  # dns_spf: a malformed domain has no record
        if not label or len(label) > _MAX_LABEL:
            return domain.lower(), NO_EXPIRY
    name = normalise_name(domain)
    if not valid_name(name):  # _CachedQuery.dns: no data, not a void lookup
        return domain.lower(), NO_EXPIRY
    answer = resolver.peek(name, "TXT")
    if answer is None or answer.status is Status.TEMPFAIL:
        return None
    for value in answer.values:
        if not isinstance(value, bytes) or _RE_SPF.match(value):
            return None
    return domain.lower(), answer.expires


# -- wide-open guard ---------------------------------------------------------------------------

_SPF_VERSION: Final = re.compile(rb"^v=spf1( |$)", re.IGNORECASE)


@dataclass(slots=True)
class Breadth:
    """Addresses a record authorises with a pass, by family; ``unbounded`` says why not known."""

    ipv4: int = 0
    ipv6: int = 0
    unbounded: str = ""
    lookups: int = 0
    seen: set[str] = field(default_factory=set)


def _spf_record(view: View, domain: str) -> str | None:
    answer = view.need(domain, "TXT")
    if answer.temporary:
        return None
    records = [v for v in answer.values if isinstance(v, bytes) and _SPF_VERSION.match(v)]
    if len(records) != 1:
        return None
    try:
        return records[0].decode("ascii")
    except UnicodeDecodeError:
        return None


def authorised_breadth(view: View, domain: str) -> Breadth:
    """What ``domain``'s SPF record authorises (synchronous; raises NeedRecords on a miss).

    Counts every address a ``+`` directive can pass, following ``include:`` and, when there
    is no ``all``, ``redirect=``. Unbounded (not knowable or as good as open): ``+all``;
    ``?all`` or no ``all`` at the top (RFC 7208 §4.7: the same as ``?all``); ``ptr``,
    ``exists`` or a macro in a passing directive; a lookup failure; more than
    ``MAX_DNS_TERMS`` DNS-querying terms. Overlapping ranges count twice (errs on the safe side).
    """
    breadth = Breadth()
    _walk(view, domain, top=True, breadth=breadth)
    return breadth


def _walk(view: View, domain: str, *, top: bool, breadth: Breadth) -> None:  # noqa: C901  # one branch per RFC 7208 term
    if breadth.unbounded:
        return
    record = _spf_record(view, domain)
    if record is None:
        breadth.unbounded = f"no single usable SPF record at {domain}"
        return
    redirect = ""
    for term in record.split()[1:]:
        modifier = spf.RE_MODIFIER.split(term)[1:]
        if len(modifier) == 2:
            if modifier[0].lower() == "redirect":
                redirect = modifier[1]
            continue
        qualifier = term[0] if term[0] in "+-~?" else "+"
        mechanism = term[1:] if term[0] in "+-~?" else term
        # For ip6 pyspf returns the prefix in the first CIDR slot.
        name, arg, cidr, cidr6 = spf.parse_mechanism(mechanism, domain)
        if name == "all":
            if qualifier == "+" or (top and qualifier == "?"):
                breadth.unbounded = f"{qualifier}all at {domain}"
            return  # terms after "all" are never evaluated, redirect= is ignored
        if name in ("a", "mx", "include", "ptr", "exists"):
            breadth.lookups += 1
            if breadth.lookups > MAX_DNS_TERMS:
                breadth.unbounded = "too many DNS-querying terms"
                return
        if qualifier != "+":
            continue  # -, ~ and ? directives authorise nothing
        if name in ("ptr", "exists") or "%" in str(arg or ""):
            breadth.unbounded = f"{name} or a macro at {domain}"
            return
        if (cidr or 0) > (128 if name == "ip6" else 32) or (cidr6 or 0) > 128:
            breadth.unbounded = f"invalid prefix length in {term!r} at {domain}"
            return
        if name == "ip4":
            breadth.ipv4 += 1 << (32 - (32 if cidr is None else cidr))
        elif name == "ip6":
            breadth.ipv6 += 1 << (128 - (128 if cidr is None else cidr))
        elif name in ("a", "mx"):
            _count_hosts(view, name, str(arg), cidr4=cidr, cidr6=cidr6, breadth=breadth)
        elif name == "include":
            _walk(view, normalise_name(str(arg)), top=False, breadth=breadth)
        else:
            breadth.unbounded = f"unknown mechanism {name!r} at {domain}"
        if breadth.unbounded:
            return
    if redirect:
        target = normalise_name(redirect)
        if "%" in target or target in breadth.seen:
            breadth.unbounded = f"redirect to {target}"
            return
        breadth.seen.add(target)
        breadth.lookups += 1
        if breadth.lookups > MAX_DNS_TERMS:
            breadth.unbounded = "too many DNS-querying terms"
            return
        _walk(view, target, top=top, breadth=breadth)
    elif top:
        breadth.unbounded = f"no 'all' at {domain} (an implicit ?all)"


def _count_hosts(
    view: View, name: str, host: str, *, cidr4: int | None, cidr6: int | None, breadth: Breadth
) -> None:
    host = normalise_name(host)
    if name == "mx":
        mx = view.need(host, "MX")
        if mx.temporary or len(mx.values) > MAX_MX:
            breadth.unbounded = f"MX of {host}"
            return
        hosts = [v[1] for v in mx.values if isinstance(v, tuple)]
    else:
        hosts = [host]
    view.require((h, t) for h in hosts for t in ("A", "AAAA"))
    for h in hosts:
        v4, v6 = view.need(h, "A"), view.need(h, "AAAA")
        if v4.temporary or v6.temporary:
            breadth.unbounded = f"addresses of {h}"
            return
        breadth.ipv4 += len(v4.values) << (32 - (32 if cidr4 is None else cidr4))
        breadth.ipv6 += len(v6.values) << (128 - (128 if cidr6 is None else cidr6))

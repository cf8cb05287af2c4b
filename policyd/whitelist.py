"""Runtime whitelists edited by ``policyctl whitelist``: entries, validation, and matching.

Entries live in the store (they survive restarts) and in memory as a ``Whitelist`` that the
dispatcher consults on every question without a store round trip; an admin change rebuilds
it at once. An entry may expire; expired entries stop matching immediately and are removed
from the store by the next rebuild.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Final, Protocol

from .addresses import AddressPatterns, NetworkSet, domain_of
from .host_patterns import MAX_TOTAL_STATES, HostPatterns, PatternError, check_host_pattern
from .lograte import LogLimiter
from .model import Query

logger = logging.getLogger(__name__)

#: What a whitelist entry can name (design.md §3 static and runtime whitelists).
KINDS: Final = {
    "client": "client IP address or CIDR (IPv4 or IPv6)",
    "client_host": "client host name or domain suffix (forward-confirmed by Exim)",
    "client_host_re": "regular expression on the client host name, matched in linear time "
    "(no backreferences or lookaround; postgrey imports)",
    "sender_domain": "sender domain (only when SPF passes for it)",
    "sender": "sender address",
    "recipient": "recipient that opts out: user@domain, user@ (any domain) or a domain",
}
#: The widest client network accepted without ``force`` (``policyctl --force``), by IP
#: version: an IPv4 /8 is the largest block ever assigned to one organisation (the legacy
#: class A) and the widest a postgrey/sqlgrey import writes (``10`` is 10.0.0.0/8); an IPv6
#: /16 is wider than any single RIR allocation (the largest are around /19). Anything wider
#: (``0.0.0.0/0``, ``::/0``, a missing digit) whitelists a good part of the Internet.
MAX_CLIENT_PREFIX: Final = {4: 8, 6: 16}
#: Bound on entries, so a runaway import cannot exhaust memory (each entry ~400 bytes in
#: memory, so this caps the whitelist at ~8 MiB; postgrey ships a few hundred).
MAX_ENTRIES: Final = 20_000
_HOST_RE: Final = re.compile(r"[a-z0-9_.-]{1,253}")
_MAX_REGEX: Final = 200
#: Stored patterns refused since they were added (an older release accepted them): the
#: warning comes with every rebuild of the whitelist, so it is rate limited.
_WARNINGS: Final = LogLimiter()


class ListError(ValueError):
    """An entry that cannot be stored; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One whitelist entry. ``expires`` is an absolute time, 0 for never."""

    kind: str
    value: str
    expires: float = 0.0
    comment: str = ""
    added: float = 0.0

    def live(self, now: float) -> bool:
        return not self.expires or self.expires > now


class ListStore(Protocol):
    """What runtime whitelists need from a store."""

    async def list_add(self, entry: ListEntry) -> None: ...

    async def list_remove(self, kind: str, value: str) -> bool: ...

    async def list_entries(self) -> list[ListEntry]: ...

    async def list_version(self) -> str:
        """Changes whenever any process sharing the store changes the whitelist."""
        ...


def normalise_entry(kind: str, value: str, *, force: bool = False) -> str:
    """The canonical form of ``value`` for ``kind``; raises ListError when invalid.

    Without ``force``, two values that are valid but almost certainly a mistake are refused
    too: a client network wider than MAX_CLIENT_PREFIX, and a recipient with neither an
    ``@`` nor a dot (``postmaster`` would be a domain named "postmaster"; ``postmaster@`` is
    the local part in every domain, ``@name`` a domain without a dot). Removing an entry
    passes ``force``, so whatever is stored can be removed."""
    text = value.strip()
    if kind not in KINDS:
        raise ListError(f"unknown whitelist kind {kind!r}; use one of {', '.join(KINDS)}")
    if not text:
        raise ListError(f"empty {kind}")
    if kind == "client":
        return _client_network(text, force)
    if kind == "client_host_re":
        return _host_pattern(text)
    return _name_or_address(kind, text, force)


def _client_network(text: str, force: bool) -> str:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ListError(f"{text!r} is not an IP address or CIDR") from None
    widest = MAX_CLIENT_PREFIX[network.version]
    if network.prefixlen < widest and not force:
        raise ListError(
            f"{network} covers 2^{network.max_prefixlen - network.prefixlen} addresses, "
            f'wider than an IPv{network.version} /{widest}; add --force ("force": true) '
            "if you mean it"
        )
    return str(network)


def _host_pattern(text: str) -> str:
    if len(text) > _MAX_REGEX:
        raise ListError("regular expression too long")
    try:
        check_host_pattern(text)
    except PatternError as exc:
        raise ListError(f"regular expression {text!r} refused: {exc}") from None
    return text


def _name_or_address(kind: str, text: str, force: bool) -> str:
    """Host and domain names, senders and recipients: lower-cased, ``<>`` stripped."""
    lowered = text.lower().strip("<>")
    if kind in ("client_host", "sender_domain"):
        lowered = lowered.strip(".")
        if not _HOST_RE.fullmatch(lowered) or "." not in lowered:
            raise ListError(f"{text!r} is not a host or domain name")
        return lowered
    if kind == "sender" and ("@" not in lowered or lowered.startswith("@")):
        raise ListError(f"{text!r} is not an address (user@domain)")
    if kind == "recipient" and "@" not in lowered and "." not in lowered and not force:
        raise ListError(
            f"{text!r} has no '@': write {lowered}@ for that local part in every domain, "
            f"{lowered}@example.org for one address, or a domain name: example.org, or "
            f"@{lowered} for a domain without a dot"
        )
    return lowered


class Whitelist:
    """The live entries, indexed for matching a question in microseconds."""

    def __init__(self, entries: list[ListEntry]) -> None:
        self.entries = entries
        self._clients = [
            (NetworkSet([ipaddress.ip_network(e.value)]), e) for e in entries if e.kind == "client"
        ]
        self._hosts = [e for e in entries if e.kind == "client_host"]
        self._host_res = _usable_patterns([e for e in entries if e.kind == "client_host_re"])
        self._host_patterns = HostPatterns(e.value for e in self._host_res)
        self._senders = {e.value: e for e in entries if e.kind == "sender"}
        self._domains = {e.value: e for e in entries if e.kind == "sender_domain"}
        self._recipients = [
            (AddressPatterns([e.value]), e) for e in entries if e.kind == "recipient"
        ]

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, query: Query, now: float, spf_pass_domain: str = "") -> ListEntry | None:
        """The first live entry that lets this question skip greylisting, if any: client
        network, client host name, host pattern, sender, SPF-passed sender domain,
        recipient."""
        if not self.entries:
            return None
        return (
            self._client(query, now)
            or self._host(query.host.lower(), now)
            or self._sender(query.sender.lower(), spf_pass_domain, now)
            or self._recipient(query.recipient.lower(), now)
        )

    def _client(self, query: Query, now: float) -> ListEntry | None:
        for nets, entry in self._clients:
            if query.client in nets and entry.live(now):
                return entry
        return None

    def _host(self, host: str, now: float) -> ListEntry | None:
        if not host:
            return None
        for entry in self._hosts:
            if (host == entry.value or host.endswith("." + entry.value)) and entry.live(now):
                return entry
        if self._host_res:
            for index in sorted(self._host_patterns.search(host)):
                entry = self._host_res[index]
                if entry.live(now):
                    return entry
        return None

    def _sender(self, sender: str, spf_pass_domain: str, now: float) -> ListEntry | None:
        found = self._senders.get(sender)
        if found is not None and found.live(now):
            return found
        if spf_pass_domain and spf_pass_domain == domain_of(sender):
            found = self._domains.get(spf_pass_domain)
            if found is not None and found.live(now):
                return found
        return None

    def _recipient(self, recipient: str, now: float) -> ListEntry | None:
        for patterns, entry in self._recipients:
            if patterns.match(recipient) and entry.live(now):
                return entry
        return None


def _usable_patterns(entries: list[ListEntry]) -> list[ListEntry]:
    """The host-pattern entries that can be matched in linear time; the others are left
    out with a warning (``policyctl whitelist remove`` them)."""
    usable = []
    states = 0
    for entry in entries:
        try:
            states += check_host_pattern(entry.value)
            if states > MAX_TOTAL_STATES:
                raise PatternError(f"all host patterns together over {MAX_TOTAL_STATES} states")
        except PatternError as exc:
            _WARNINGS.warning(logger, "whitelist: host pattern %r not used: %s", entry.value, exc)
            continue
        usable.append(entry)
    return usable

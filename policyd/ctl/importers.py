"""Parsers for the whitelist files of postgrey and sqlgrey, for ``policyctl import``.

Text in, whitelist entries out; no sockets, no files. Each parser follows the reading rules
of the program that owns the format (postgrey's ``read_clients_whitelists`` and
``read_recipients_whitelists``, sqlgrey's ``clients_*_whitelist`` files), and reports what
it cannot represent as skipped, with the line number and why (docs/admin.md).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from ..whitelist import ListError, normalise_entry

#: IPv4 written as 1–3 leading octets (postgrey and sqlgrey "class" prefixes, e.g.
#: ``192.168.1`` for 192.168.1.0/24), or a whole address with an optional prefix length.
_IPV4_PARTIAL: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){0,2}")
_IPV4: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?:/[0-9]{1,2})?")
_IPV6: Final = re.compile(r"[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(?:/[0-9]{1,3})?")
_REGEX_LINE: Final = re.compile(r"/(\S+)/")


class Unrepresentable(ValueError):
    """A line that cannot become a whitelist entry; the message says why."""


@dataclass(frozen=True, slots=True)
class Item:
    """One entry to add, with where it came from."""

    line: int
    kind: str
    value: str
    #: the comment that followed the entry on its line ('' when none)
    note: str = ""


@dataclass(frozen=True, slots=True)
class Skipped:
    line: int
    text: str
    reason: str


@dataclass(slots=True)
class Parsed:
    items: list[Item] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _partial_ipv4(text: str) -> str:
    """``192.168.1`` → ``192.168.1.0/24``; ``10.1`` → ``10.1.0.0/16``; ``10`` → ``10.0.0.0/8``."""
    octets = text.split(".")
    if any(int(o) > 255 for o in octets):
        raise Unrepresentable(f"{text!r} is not an IPv4 prefix (octet above 255)")
    padded = octets + ["0"] * (4 - len(octets))
    return f"{'.'.join(padded)}/{8 * len(octets)}"


def _address(text: str) -> str | None:
    """A client entry for an address, CIDR or partial IPv4; None when ``text`` is none."""
    if _IPV4_PARTIAL.fullmatch(text):
        return _partial_ipv4(text)
    if _IPV4.fullmatch(text) or _IPV6.fullmatch(text):
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise Unrepresentable(f"{text!r} is not an IP address or CIDR") from None
    return None


def postgrey_client(text: str) -> tuple[str, str]:
    """postgrey ``whitelist_clients``: ``/regex/`` on the host name, an IP address, CIDR or
    partial IPv4, else a host name that also matches every host below it."""
    if m := _REGEX_LINE.fullmatch(text):
        return "client_host_re", m.group(1)
    address = _address(text)
    if address is not None:
        return "client", address
    if re.search(r"\s", text):
        raise Unrepresentable("does not look like a host name")
    return "client_host", text


def postgrey_recipient(text: str) -> tuple[str, str]:
    """postgrey ``whitelist_recipients``: ``user@domain``, ``user@``, or a domain."""
    if _REGEX_LINE.fullmatch(text):
        raise Unrepresentable(
            "a recipient regular expression cannot be represented; add the recipients it "
            "means one by one"
        )
    if re.search(r"[\s/]", text):
        raise Unrepresentable("does not look like an address")
    return "recipient", text


def sqlgrey_ip(text: str) -> tuple[str, str]:
    """sqlgrey ``clients_ip_whitelist``: addresses and class-A/B/C prefixes (``64.12.137``)."""
    address = _address(text)
    if address is None:
        raise Unrepresentable("not an IP address or IP prefix")
    return "client", address


def sqlgrey_fqdn(text: str) -> tuple[str, str]:
    """sqlgrey ``clients_fqdn_whitelist``: a host name, ``*.domain``, or ``/regex/``.

    Both plain names and ``*.domain`` become ``client_host`` entries, which match the name
    and every host below it (sqlgrey matches exactly / only below)."""
    if m := _REGEX_LINE.fullmatch(text):
        return "client_host_re", m.group(1)
    if re.search(r"\s", text):
        raise Unrepresentable("does not look like a host name")
    return "client_host", text.removeprefix("*.")


Classifier = Callable[[str], tuple[str, str]]

#: ``policyctl import FORMAT``: the file each format reads, and its line classifier.
FORMATS: Final[dict[str, tuple[str, Classifier]]] = {
    "postgrey-clients": ("postgrey whitelist_clients", postgrey_client),
    "postgrey-recipients": ("postgrey whitelist_recipients", postgrey_recipient),
    "sqlgrey-ip": ("sqlgrey clients_ip_whitelist", sqlgrey_ip),
    "sqlgrey-fqdn": ("sqlgrey clients_fqdn_whitelist", sqlgrey_fqdn),
}


def parse(form: str, text: str) -> Parsed:
    """Every line of a whitelist file in format ``form``: entries to add, and lines skipped.

    ``#`` starts a comment to the end of the line (both programs strip it the same way);
    blank lines are ignored; a repeated entry is skipped as a duplicate."""
    classify = FORMATS[form][1]
    parsed = Parsed()
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        body, _, note = raw.partition("#")
        body = body.strip()
        if not body:
            continue
        try:
            kind, value = classify(body)
            value = normalise_entry(kind, value)
        except (Unrepresentable, ListError) as exc:
            parsed.skipped.append(Skipped(number, body, str(exc)))
            continue
        first = seen.setdefault((kind, value), number)
        if first != number:
            parsed.skipped.append(Skipped(number, body, f"duplicate of line {first}"))
            continue
        parsed.items.append(Item(number, kind, value, note.strip()))
    return parsed

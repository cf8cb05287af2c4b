"""Normalisation of envelope addresses and client networks, in one place for every check.

Greylisting keys on a sender that stays the same across a legitimate sender's retries, even
when the MTA rewrites it per attempt (BATV, SRS, VERP, ``+extension`` tags).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from typing import Final

from .model import IPAddress, IPNetwork

#: Key used for the null sender ``<>`` (bounces, DSNs); never an empty string.
NULL_SENDER: Final = "<>"

# BATV (draft-levine-smtp-batv): prvs=TAG=local@dom, msprvs1=TAG=local@dom, btv1==TAG==local@dom
_BATV: Final = re.compile(r"^(?:prvs|msprvs1)=[^=@]+=(?P<local>.+)$|^btv1==[^=@]+==(?P<local2>.+)$")
# SRS (libsrs2 / postsrsd): SRS0=HASH=TT=orig-domain=orig-local and
# SRS1=HASH=first-forwarder==HASH=TT=orig-domain=orig-local; separators = + or -.
_SRS0: Final = re.compile(r"^srs0[=+-][^=]*=[^=]*=(?P<domain>[^=]+)=(?P<local>.+)$")
_SRS1: Final = re.compile(r"^srs1[=+-][^=]*=[^=]*==[^=]*=[^=]*=(?P<domain>[^=]+)=(?P<local>.+)$")
# VERP and per-message tags: hex runs of 8+ characters (hashes, ids), then any digit run.
_HEX_RUN: Final = re.compile(r"[0-9a-f]{8,}")
_DIGITS: Final = re.compile(r"[0-9]+")


def normalise_sender(sender: str) -> str:
    """The sender as greylisting sees it: stable across a legitimate MTA's retries."""
    address = sender.strip().strip("<>").lower()
    if not address:
        return NULL_SENDER
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if "=" in local:  # SRS and BATV wrappers all contain "="
        if m := _SRS1.match(local) or _SRS0.match(local):
            local, domain = m.group("local"), m.group("domain")
        if m := _BATV.match(local):
            local = m.group("local") or m.group("local2")
    if "+" in local:
        local = local.split("+", 1)[0] or local
    local = _HEX_RUN.sub("#", local)
    local = _DIGITS.sub("#", local)
    return f"{local}@{domain}" if domain else local


def normalise_recipient(recipient: str) -> str:
    """Recipients are compared case-insensitively; tags are kept (they may route differently)."""
    return recipient.strip().strip("<>").lower()


def domain_of(address: str) -> str:
    """The domain part of an address, lower-cased ('' when there is none)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def client_network(address: IPAddress, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The client network in canonical CIDR text, e.g. ``192.0.2.0/24`` or ``2001:db8::/64``.

    Integer masking instead of ``ip_network()``: this runs for every question, and the
    ipaddress constructor costs ten times more."""
    if address.version == 4:
        bits, prefix, family = 32, ipv4_prefix, socket.AF_INET
    else:
        bits, prefix, family = 128, ipv6_prefix, socket.AF_INET6
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)
    packed = (int(address) & mask).to_bytes(bits // 8, "big")
    return f"{socket.inet_ntop(family, packed)}/{prefix}"


def ip_text(address: IPAddress) -> str:
    """``str(address)``, formatted by ``inet_ntoa`` / ``inet_ntop`` (C) rather than
    ipaddress's Python code. Both compress IPv6 per RFC 5952; only under ``::/80``
    (IPv4-compatible and -mapped forms) does inet_ntop write dotted quads, so those keep
    ``str()``."""
    if address.version == 4:
        return socket.inet_ntoa(address.packed)  # str() joins the four bytes in Python
    if int(address) >> 48 == 0:
        return str(address)
    return socket.inet_ntop(socket.AF_INET6, address.packed)


class NetworkSet:
    """Membership of an address in a fixed list of networks, by integer comparison."""

    __slots__ = ("_ranges",)

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._ranges = tuple(
            (net.version, int(net.network_address), int(net.netmask)) for net in networks
        )

    def __contains__(self, address: IPAddress) -> bool:
        if not self._ranges:
            return False
        value, version = int(address), address.version
        for v, base, mask in self._ranges:  # noqa: SIM110  # any() over a generator costs 2x
            if v == version and value & mask == base:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self._ranges)


class AddressPatterns:
    """``user@dom`` exact, ``user@`` any domain, ``dom`` / ``@dom`` the whole domain; matched
    by set look-ups (the patterns are sorted by kind once, not per question)."""

    __slots__ = ("_addresses", "_domains", "_locals")

    def __init__(self, patterns: Iterable[str]) -> None:
        self._locals: set[str] = set()
        self._addresses: set[str] = set()
        self._domains: set[str] = set()
        for pattern in patterns:
            p = pattern.strip().lower()
            if p.endswith("@"):
                self._locals.add(p[:-1])
            elif "@" in p and not p.startswith("@"):
                self._addresses.add(p)
            else:
                self._domains.add(p.lstrip("@"))

    def __bool__(self) -> bool:
        return bool(self._locals or self._addresses or self._domains)

    def match(self, address: str) -> bool:
        """Whether a lower-cased address matches one of the patterns."""
        local, _, domain = address.rpartition("@")
        return local in self._locals or address in self._addresses or domain in self._domains

"""Deterministic RCPT-stage workload: the questions Exim would ask policyd, as request bytes.

A seeded generator builds a list of requests in the wire format of ``docs/protocol.md``
(``rcpt v=1 ip=… helo_b64=… from_b64=… rcpt_b64=… auth_b64= txn=… nrcpt=…``, all
client-controlled fields base64). The mix is meant to look like an MX on a normal day:

- new triplets (first attempt of a message from an unknown client/sender/recipient),
- retries of an earlier triplet, half of them from another host of the same network (MTA
  pools retry from a sibling address),
- clients in the whitelisted networks (``WHITELIST_CIDRS``, which the bench config whitelists),
- IPv4 and IPv6 clients, IPv6 mostly compressed and sometimes fully expanded (as under
  ``exim -bh``), an occasional IPv4-mapped or bracketed address,
- senders with BATV/SRS/+extension/VERP decorations and the null sender.

Nothing here does I/O; ``bench/loadgen.py`` sends the bytes.
"""

from __future__ import annotations

import base64
import ipaddress
import random
from array import array
from dataclasses import dataclass, field

# The bench config whitelists exactly these networks (bench/run.py writes them into [greylist]).
WHITELIST_CIDRS: tuple[str, ...] = ("198.51.100.0/24", "2001:db8:ffff::/48")

RECIPIENT_DOMAINS = ("example.org", "mail.example.org", "example.com")


@dataclass(frozen=True)
class Mix:
    """Shares of each kind of question; what is left after retry+whitelisted is new triplets."""

    retry: float = 0.30
    whitelisted: float = 0.10
    ipv6: float = 0.30  # share of non-whitelisted clients that are IPv6
    null_sender: float = 0.03
    decorated_sender: float = 0.15  # BATV, SRS, +ext, VERP
    expanded_ipv6: float = 0.10  # share of IPv6 addresses written fully expanded
    odd_ip_form: float = 0.02  # "[…]" or IPv4-mapped


@dataclass(frozen=True)
class Triplet:
    ip: str
    sender: str
    rcpt: str
    helo: str


@dataclass
class Workload:
    """``requests[i]`` is the bytes of question i; ``kinds[i]`` says new/retry/whitelisted."""

    seed: int
    requests: list[bytes] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    def packed(self) -> Packed:
        return Packed(self.requests)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in self.kinds:
            out[kind] = out.get(kind, 0) + 1
        return out


class Packed:
    """Requests packed in one bytes object: forked load processes share it copy-on-write.

    A list of 100k bytes objects would be copied page by page into every child as soon as
    the child touches reference counts; slicing one blob touches nothing shared.
    """

    __slots__ = ("blob", "offsets")

    def __init__(self, requests: list[bytes]) -> None:
        self.blob = b"".join(requests)
        self.offsets = array("q", [0])
        total = 0
        for r in requests:
            total += len(r)
            self.offsets.append(total)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.blob[self.offsets[i] : self.offsets[i + 1]]


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def format_request(
    t: Triplet, *, txn: str, nrcpt: int = 1, port: int = 25, eol: bool = False
) -> bytes:
    """One RCPT question exactly as the Exim snippet builds it (no newline unless ``eol``)."""
    line = (
        f"rcpt v=1 ip={t.ip} port={port} helo_b64={b64(t.helo)} from_b64={b64(t.sender)} "
        f"rcpt_b64={b64(t.rcpt)} auth_b64= txn={txn} nrcpt={nrcpt}"
    )
    return (line + "\n" if eol else line).encode("ascii")


class TripletFactory:
    """Random but plausible clients, senders and recipients from one seeded ``Random``."""

    def __init__(self, rng: random.Random, mix: Mix = Mix()) -> None:
        self.rng = rng
        self.mix = mix
        self.sender_domains = [self._domain() for _ in range(3000)]
        self.recipients = [
            f"{self._word(4, 10)}@{rng.choice(RECIPIENT_DOMAINS)}" for _ in range(5000)
        ]
        self._wl_nets = [ipaddress.ip_network(c) for c in WHITELIST_CIDRS]

    def _word(self, lo: int, hi: int) -> str:
        letters = "abcdefghijklmnopqrstuvwxyz"
        return "".join(self.rng.choice(letters) for _ in range(self.rng.randint(lo, hi)))

    def _domain(self) -> str:
        tld = self.rng.choice(("com", "net", "org", "de", "fr", "co.uk", "io"))
        return f"{self._word(3, 12)}.{tld}"

    def sender(self) -> str:
        r = self.rng.random()
        if r < self.mix.null_sender:
            return ""
        user, dom = self._word(3, 12), self.rng.choice(self.sender_domains)
        if r < self.mix.null_sender + self.mix.decorated_sender:
            style = self.rng.randrange(4)
            if style == 0:
                return f"prvs={self.rng.getrandbits(40):010x}={user}@{dom}"
            if style == 1:
                hop = self.rng.choice(self.sender_domains)
                return f"SRS0={self.rng.getrandbits(16):04x}=QX={dom}={user}@{hop}"
            if style == 2:
                return f"{user}+{self._word(2, 8)}@{dom}"
            return f"bounces-{self.rng.randrange(10**6)}-{user}@lists.{dom}"
        return f"{user}@{dom}"

    def helo(self, ip: str) -> str:
        return f"mx{self.rng.randrange(1, 20)}.{self.rng.choice(self.sender_domains)}"

    def ipv4(self) -> str:
        while True:
            a = self.rng.randrange(1, 224)
            if a not in (10, 127, 198):  # keep away from private/loopback and the whitelist
                break
        return (
            f"{a}.{self.rng.randrange(256)}.{self.rng.randrange(256)}.{self.rng.randrange(1, 255)}"
        )

    def ipv6(self) -> str:
        # 2001:db8:xxxx::/48 except ffff (whitelisted); host bits random, mostly small
        net = self.rng.randrange(0xFFFF)
        sub = self.rng.randrange(0x10000)
        host = self.rng.randrange(1, 0x100) if self.rng.random() < 0.7 else self.rng.getrandbits(64)
        return self.spell_ip(
            str(ipaddress.IPv6Address((0x20010DB8 << 96) | (net << 80) | (sub << 64) | host))
        )

    def whitelisted_ip(self) -> str:
        net = self.rng.choice(self._wl_nets)
        host = self.rng.randrange(1, min(net.num_addresses - 1, 1 << 32))
        return self.spell_ip(str(net.network_address + host))

    def sibling_ip(self, ip: str) -> str:
        """Another host of the same greylisting network (/24, /64) as ``ip``."""
        addr = ipaddress.ip_address(ip.strip("[]").removeprefix("::ffff:"))
        if addr.version == 4:
            base = int(addr) & ~0xFF
            return str(ipaddress.IPv4Address(base | self.rng.randrange(1, 255)))
        base = int(addr) & ~((1 << 64) - 1)
        return self.spell_ip(str(ipaddress.IPv6Address(base | self.rng.randrange(1, 0x10000))))

    def spell_ip(self, ip: str) -> str:
        """Write an address in one of the textual forms Exim may hand over."""
        addr = ipaddress.ip_address(ip)
        r = self.rng.random()
        if addr.version == 6 and r < self.mix.expanded_ipv6:
            return addr.exploded
        if r > 1 - self.mix.odd_ip_form:
            return f"[{addr}]" if addr.version == 6 else f"::ffff:{addr}"
        return str(addr)

    def new_triplet(self, ip: str | None = None) -> Triplet:
        if ip is None:
            ip = self.ipv6() if self.rng.random() < self.mix.ipv6 else self.ipv4()
        return Triplet(ip, self.sender(), self.rng.choice(self.recipients), self.helo(ip))


def generate(size: int, seed: int = 1, mix: Mix = Mix(), *, eol: bool = False) -> Workload:
    """``size`` questions; retries pick a triplet among the recent new ones (a retry window)."""
    rng = random.Random(seed)
    fac = TripletFactory(rng, mix)
    wl = Workload(seed=seed)
    recent: list[Triplet] = []
    window = 50_000
    warm = min(1000, max(1, size // 20))  # retry only once there is something to retry
    for i in range(size):
        r = rng.random()
        if r < mix.whitelisted:
            kind, t = "whitelisted", fac.new_triplet(fac.whitelisted_ip())
        elif r < mix.whitelisted + mix.retry and len(recent) >= warm:
            kind, t = "retry", rng.choice(recent)
            if rng.random() < 0.5:
                t = Triplet(fac.sibling_ip(t.ip), t.sender, t.rcpt, t.helo)
        else:
            kind, t = "new", fac.new_triplet()
            if len(recent) < window:
                recent.append(t)
            else:
                recent[rng.randrange(window)] = t
        txn = f"{rng.randrange(10**6)}-{1732560000000000 + i}"
        wl.requests.append(format_request(t, txn=txn, port=rng.randrange(1024, 65536), eol=eol))
        wl.kinds.append(kind)
    return wl


def distinct_triplets(n: int, seed: int = 2) -> list[Triplet]:
    """``n`` fresh triplets for pre-filling a store (duplicates are possible but rare)."""
    rng = random.Random(seed)
    fac = TripletFactory(rng, Mix(expanded_ipv6=0.0, odd_ip_form=0.0))
    return [fac.new_triplet() for _ in range(n)]

"""A small DNS server on loopback for tests: serves zone data from a dict over UDP and TCP.

It answers like the recursive resolver a mail host would use (CNAME chains followed, final
records in the answer), so the code under test can point c-ares at it with a ``host:port``
nameserver. Faults are per name: answer late (``delay``), never answer (``drop``, or a
``"TIMEOUT"`` entry in the zone), answer SERVFAIL (``servfail``), or force the UDP answer to be
truncated so the client must retry over TCP (``truncate``). Every question is logged so tests
can count the queries that really reached DNS.

Zone data: ``{name: [record, ...]}``, where a record is ``("TXT", "v=spf1 -all")``,
``("TXT", ["part 1", "part 2"])``, ``("A", "192.0.2.1")``, ``("MX", (10, "mx.example.com"))``,
``("PTR", name)``, ``("CNAME", name)``, ``("AAAA", ...)``, ``("SPF", ...)`` with an optional
third element, the TTL; the RFC 7208 suite's one-key mappings (``{"TXT": "..."}``) are accepted
too. ``"TIMEOUT"`` makes every question for that name whose type has no record go unanswered
(the test suite's convention).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

DEFAULT_TTL = 300
#: Negative answers carry this SOA so a resolver could cache them (RFC 2308 §5).
SOA_NAME = "test.invalid"
NEGATIVE_TTL = 60
#: Without EDNS a UDP answer is at most 512 octets (RFC 1035 §4.2.1).
CLASSIC_UDP_LIMIT = 512
#: Longest CNAME chain followed before answering SERVFAIL (loops end here too).
MAX_CHAIN = 16
TIMEOUT = "TIMEOUT"
_TYPES = {"A", "AAAA", "MX", "PTR", "TXT", "SPF", "CNAME"}
_MAX_CHARACTER_STRING = 255


@dataclass(frozen=True, slots=True)
class Record:
    rtype: str
    value: Any
    ttl: int = DEFAULT_TTL


@dataclass(frozen=True, slots=True)
class Logged:
    """One question that reached the server."""

    name: str
    rtype: str
    proto: str


def _split_txt(value: str | bytes | Sequence[str | bytes]) -> list[bytes]:
    if isinstance(value, str | bytes):
        raw = value.encode() if isinstance(value, str) else value
        chunks = [
            raw[i : i + _MAX_CHARACTER_STRING] for i in range(0, len(raw), _MAX_CHARACTER_STRING)
        ]
        return chunks or [b""]
    return [v.encode() if isinstance(v, str) else v for v in value]


def normalise_zone(data: Mapping[str, Iterable[Any]]) -> dict[str, list[Record]]:
    """Zone data in any accepted form → {lower-case name: [Record]}."""
    zone: dict[str, list[Record]] = {}
    for name, records in data.items():
        out = zone.setdefault(name.lower().rstrip("."), [])
        for item in records:
            if item == TIMEOUT:
                out.append(Record(TIMEOUT, None))
                continue
            if isinstance(item, Mapping):
                ((rtype, value),) = item.items()
                ttl = DEFAULT_TTL
            else:
                rtype, value, *rest = item
                ttl = rest[0] if rest else DEFAULT_TTL
            rtype = rtype.upper()
            if rtype not in _TYPES:
                raise ValueError(f"unsupported record type {rtype!r} for {name!r}")
            out.append(Record(rtype, value, int(ttl)))
    return zone


def _rdata(record: Record) -> Any:
    value = record.value
    if record.rtype == "A":
        return A(value)
    if record.rtype == "AAAA":
        return AAAA(value)
    if record.rtype == "MX":
        preference, exchange = value
        return MX(exchange, int(preference))
    if record.rtype == "PTR":
        return PTR(value)
    if record.rtype == "CNAME":
        return CNAME(value)
    return TXT(_split_txt(value))  # TXT and SPF share the wire format


class DnsServer:
    """Authoritative-looking DNS on 127.0.0.1, UDP and TCP on one port (chosen by the OS)."""

    def __init__(self, zone: Mapping[str, Iterable[Any]] | None = None) -> None:
        self._lock = threading.Lock()
        self._zone = normalise_zone(zone or {})
        self._delays: dict[str, float] = {}
        self._dropped: set[str] = set()
        self._servfail: set[str] = set()
        self._truncated: set[str] = set()
        self.log: list[Logged] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        self._udp, self._tcp = self._bind()
        self.port: int = self._udp.getsockname()[1]

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def _bind() -> tuple[socket.socket, socket.socket]:
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:  # that TCP port is taken: try another pair
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            return udp, tcp
        raise RuntimeError("no free UDP+TCP port pair on 127.0.0.1")

    @property
    def address(self) -> str:
        """The ``host:port`` nameserver string for c-ares / ``[spf] nameservers``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        self._udp.settimeout(0.1)
        self._tcp.settimeout(0.1)
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, name=f"dns-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        for thread in self._threads:
            thread.join(timeout=2)
        self._udp.close()
        self._tcp.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- zone and faults ---------------------------------------------------------------------

    def set_zone(self, zone: Mapping[str, Iterable[Any]]) -> None:
        """Replace all zone data and clear faults and the query log."""
        with self._lock:
            self._zone = normalise_zone(zone)
            self._delays.clear()
            self._dropped.clear()
            self._servfail.clear()
            self._truncated.clear()
            self.log.clear()

    def add(self, name: str, rtype: str, value: Any, ttl: int = DEFAULT_TTL) -> None:
        new = normalise_zone({name: [(rtype, value, ttl)]})
        with self._lock:
            for key, records in new.items():
                self._zone.setdefault(key, []).extend(records)

    def remove(self, name: str) -> None:
        with self._lock:
            self._zone.pop(name.lower().rstrip("."), None)

    def delay(self, name: str, seconds: float) -> None:
        with self._lock:
            self._delays[name.lower().rstrip(".")] = seconds

    def drop(self, name: str) -> None:
        with self._lock:
            self._dropped.add(name.lower().rstrip("."))

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(name.lower().rstrip("."))

    def truncate(self, name: str) -> None:
        """UDP answers for ``name`` come back empty with TC set: the client must use TCP."""
        with self._lock:
            self._truncated.add(name.lower().rstrip("."))

    def heal(self, name: str) -> None:
        """Remove every fault set for ``name``."""
        key = name.lower().rstrip(".")
        with self._lock:
            self._delays.pop(key, None)
            self._dropped.discard(key)
            self._servfail.discard(key)
            self._truncated.discard(key)

    def queries(self, name: str | None = None, rtype: str | None = None) -> list[Logged]:
        key = name.lower().rstrip(".") if name is not None else None
        with self._lock:
            return [
                q
                for q in self.log
                if (key is None or q.name == key) and (rtype is None or q.rtype == rtype)
            ]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # -- answering ---------------------------------------------------------------------------

    def _answer(self, request: DNSRecord, proto: str) -> tuple[bytes | None, float]:
        """(reply bytes or None for no answer, delay in seconds)."""
        question = request.q
        qname = str(question.qname).rstrip(".")
        key = qname.lower()
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        with self._lock:
            self.log.append(Logged(key, qtype, proto))
            delay = self._delays.get(key, 0.0)
            if key in self._dropped:
                return None, 0.0
            reply = request.reply()
            if key in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack(), delay
            if proto == "udp" and key in self._truncated:
                reply.header.tc = 1
                return reply.pack(), delay
            if not self._resolve(reply, qname, qtype):
                return None, 0.0
        data = reply.pack()
        if proto == "udp" and len(data) > self._udp_limit(request):
            reply = request.reply()
            reply.header.tc = 1
            data = reply.pack()
        return data, delay

    def _resolve(self, reply: DNSRecord, qname: str, qtype: str) -> bool:
        """Fill ``reply``; False when the question must go unanswered (a TIMEOUT entry)."""
        owner = qname
        seen: set[str] = set()
        for _ in range(MAX_CHAIN):
            key = owner.lower()
            records = self._zone.get(key)
            if records is None:
                if not self._has_descendant(key):
                    reply.header.rcode = RCODE.NXDOMAIN
                self._add_soa(reply)
                return True
            matching = [r for r in records if r.rtype == qtype]
            cname = [r for r in records if r.rtype == "CNAME"]
            if not matching and cname and qtype != "CNAME":
                target = str(cname[0].value).rstrip(".")
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=cname[0].ttl))
                if target.lower() in seen:
                    reply.header.rcode = RCODE.SERVFAIL
                    return True
                seen.add(key)
                owner = target
                continue
            if not matching and any(r.rtype == TIMEOUT for r in records):
                return False
            for record in matching:
                rtype = getattr(QTYPE, record.rtype)
                reply.add_answer(RR(owner, rtype, rdata=_rdata(record), ttl=record.ttl))
            if not matching:
                self._add_soa(reply)
            return True
        reply.header.rcode = RCODE.SERVFAIL
        return True

    def _has_descendant(self, key: str) -> bool:
        suffix = "." + key
        return any(name.endswith(suffix) for name in self._zone)

    @staticmethod
    def _add_soa(reply: DNSRecord) -> None:
        soa = SOA(f"ns.{SOA_NAME}", f"hostmaster.{SOA_NAME}", (1, 3600, 600, 86400, NEGATIVE_TTL))
        reply.add_auth(RR(SOA_NAME, QTYPE.SOA, rdata=soa, ttl=NEGATIVE_TTL))

    @staticmethod
    def _udp_limit(request: DNSRecord) -> int:
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:
                return max(CLASSIC_UDP_LIMIT, int(rr.rclass))
        return CLASSIC_UDP_LIMIT

    # -- transports --------------------------------------------------------------------------

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._udp.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                request = DNSRecord.parse(data)
            except Exception:  # a malformed packet is ignored, like a real server
                continue
            reply, delay = self._answer(request, "udp")
            if reply is None:
                continue
            if delay > 0:
                self._later(delay, self._send_udp, reply, peer)
            else:
                self._send_udp(reply, peer)

    def _send_udp(self, reply: bytes, peer: Any) -> None:
        with contextlib.suppress(OSError):
            self._udp.sendto(reply, peer)

    def _later(self, delay: float, func: Any, *args: Any) -> None:
        timer = threading.Timer(delay, func, args)
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()]
            self._timers.append(timer)
        timer.start()

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True)
            thread.start()

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            buffer = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 2:
                    (length,) = struct.unpack("!H", buffer[:2])
                    if len(buffer) < 2 + length:
                        break
                    message, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                    try:
                        request = DNSRecord.parse(message)
                    except Exception:  # see _serve_udp
                        return
                    reply, delay = self._answer(request, "tcp")
                    if reply is None:
                        continue
                    if delay > 0 and self._stop.wait(delay):
                        return
                    with contextlib.suppress(OSError):
                        conn.sendall(struct.pack("!H", len(reply)) + reply)


@contextlib.contextmanager
def running(zone: Mapping[str, Iterable[Any]] | None = None) -> Iterator[DnsServer]:
    """A started server, stopped on exit."""
    server = DnsServer(zone).start()
    try:
        yield server
    finally:
        server.stop()

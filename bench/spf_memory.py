"""Memory of the daemon with SPF on: RSS while it checks 100,000 distinct sender domains.

Issue #5: "DNS cache bounded: RSS stays ≤ 48 MiB after checking 100,000 distinct domains".
A loopback DNS server (tests/support/dns_server.py) serves a zone of ``--domains`` sender domains,
most with an SPF record of one of a few shapes (``ip4``/``ip6`` ranges, an ``include:`` of a
shared provider, ``a mx``, ``?all``) and a quarter with none (NXDOMAIN). The daemon, [spf]
enabled with the default cache sizes, is asked one RCPT question per domain (a new client
and sender each; half of the clients are inside the domain's authorised range), in chunks;
its VmRSS/VmHWM are read before the first question and after every chunk. A greylist-only
daemon asked the same questions (``--no-baseline`` skips it) tells the SPF part from the
rest (the SQLite store grows by one triplet per question in both).

    python3 bench/spf_memory.py [--domains 100000] [--chunks 10] [--concurrency 8]
                                [--out bench/results/spf_memory.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
from loadgen import classify
from workload import Triplet, format_request

#: The issue #5 target for the daemon's RSS after checking that many distinct domains.
TARGET_MIB = 48.0
#: Shared SPF "providers" the include:-shaped records point at.
PROVIDERS = 10
_HEX_TO_LETTERS = str.maketrans("0123456789abcdef", "ghijklmnopqrstuv")
#: Answer time allowed per question; the daemon's own deadline (1 s) comes first.
ASK_TIMEOUT_S = 5.0


def _letters(n: int) -> str:
    return format(n, "x").translate(_HEX_TO_LETTERS)


def _h(i: int) -> int:
    return int.from_bytes(hashlib.blake2b(b"%d" % i, digest_size=8).digest(), "big")


def domain_name(i: int) -> str:
    return f"{_letters(i)}{_letters(_h(i) & 0xFFF)}.example"


def _net4(i: int) -> str:
    """A /24 per domain, away from private, loopback and the bench whitelist."""
    h = _h(i)
    return f"{11 + h % 180}.{(h >> 8) & 0xFF}.{(h >> 16) & 0xFF}"


def zone_and_questions(n: int) -> tuple[dict[str, list[Any]], list[Triplet], Counter[str]]:
    """The DNS zone for ``n`` domains and one question per domain (in domain order)."""
    zone: dict[str, list[Any]] = {}
    for p in range(PROVIDERS):
        zone[f"_spf.esp{p}.example"] = [
            ("TXT", f"v=spf1 ip4:100.{64 + p}.0.0/16 ip6:2001:db8:e{p:03x}::/48 -all")
        ]
    questions: list[Triplet] = []
    shapes: Counter[str] = Counter()
    for i in range(n):
        name = domain_name(i)
        net, h = _net4(i), _h(i)
        inside = h & 1 == 0
        kind = i % 20
        client = f"{net}.{10 + (h >> 24) % 200}" if inside else f"203.0.113.{1 + i % 250}"
        if kind < 5:
            shape = "none"
        elif kind < 13:
            shape = "ip4/ip6"
            zone[name] = [("TXT", f"v=spf1 ip4:{net}.0/24 ip6:2001:db8:{i & 0xFFFF:x}::/48 -all")]
        elif kind < 17:
            shape = "include"
            p = i % PROVIDERS
            zone[name] = [("TXT", f"v=spf1 include:_spf.esp{p}.example ~all")]
            client = f"100.{64 + p}.{h & 0xFF}.{1 + (h >> 8) % 250}" if inside else client
        elif kind < 19:
            shape = "a mx"
            zone[name] = [
                ("TXT", "v=spf1 a mx -all"),
                ("A", f"{net}.1"),
                ("MX", (10, f"mx.{name}")),
            ]
            zone[f"mx.{name}"] = [("A", f"{net}.2")]
            client = f"{net}.{1 + (h >> 8) % 2}" if inside else client
        else:
            shape = "?all"
            zone[name] = [("TXT", "v=spf1 ?all")]
        shapes[shape] += 1
        sender = f"{_letters(h & 0xFFFFFF)}@{name}"
        rcpt = f"{_letters(i)}@example.org"
        questions.append(Triplet(client, sender, rcpt, f"mail.{name}"))
    return zone, questions, shapes


def ask(path: str, request: bytes) -> bytes:
    """One Exim-like exchange: connect, write, half-close, read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ASK_TIMEOUT_S)
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def ask_each(path: str, requests: Sequence[bytes], concurrency: int = 8) -> Counter[str]:
    """Ask every request exactly once with ``concurrency`` askers; the answers by kind."""
    answers: Counter[str] = Counter()
    lock = threading.Lock()
    position = iter(range(len(requests)))

    def asker() -> None:
        mine: Counter[str] = Counter()
        while True:
            with lock:
                i = next(position, None)
            if i is None:
                break
            try:
                mine[classify(ask(path, requests[i]))] += 1
            except OSError as exc:
                mine[f"error {type(exc).__name__}"] += 1
        with lock:
            answers.update(mine)

    threads = [threading.Thread(target=asker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def _requests(questions: Iterable[Triplet]) -> list[bytes]:
    return [format_request(t, txn=f"spfmem-{i}") for i, t in enumerate(questions)]


def run_daemon(
    name: str, extra_toml: str, requests: list[bytes], chunks: int, concurrency: int, dns: Any
) -> dict[str, Any]:
    """Start a daemon, ask every request in ``chunks`` parts, read its memory after each."""
    with tempfile.TemporaryDirectory(prefix="policyd-spfmem-") as tmp:
        workdir = Path(tmp)
        config = servers.policyd_config(workdir, max_connections=1024)
        config.write_text(config.read_text() + extra_toml)
        server = servers.start_policyd(workdir, config)
        try:
            time.sleep(0.5)
            points = [{"domains": 0, **server.memory_kib(), "dns_queries": len(dns.log)}]
            answers: Counter[str] = Counter()
            step = -(-len(requests) // chunks)
            t0 = time.monotonic()
            cpu0 = server.cpu_seconds()
            for lo in range(0, len(requests), step):
                part = requests[lo : lo + step]
                answers.update(ask_each(server.socket, part, concurrency))
                mem = server.memory_kib()
                points.append({"domains": lo + len(part), **mem, "dns_queries": len(dns.log)})
                print(
                    f"{name}: {lo + len(part):,} domains, VmRSS {mem['VmRSS'] / 1024:.1f} MiB",
                    file=sys.stderr,
                )
            elapsed = time.monotonic() - t0
            cpu = server.cpu_seconds() - cpu0
            if not server.alive():
                raise RuntimeError(f"{name} died:\n{server.log_tail()}")
        finally:
            servers.stop(server)
    return {
        "name": name,
        "points": points,
        "answers": dict(answers),
        "elapsed_s": round(elapsed, 1),
        "cpu_us_per_question": round(cpu / len(requests) * 1e6, 1),
    }


def summary_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    extra = f", plus `{meta['spf_toml']}`" if meta.get("spf_toml") else ""
    lines = [
        f"# bench/spf_memory.py — {meta['date']}",
        "",
        f"{meta['domains']:,} distinct sender domains, one question each ({meta['shapes']}), "
        f"{meta['concurrency']} askers; [spf] defaults (cache_size {meta['cache_size']}, "
        f"result_cache_size {meta['result_cache_size']}){extra}. "
        f"Target: VmRSS ≤ {TARGET_MIB:.0f} MiB.",
        "",
        "| daemon | domains checked | VmRSS MiB | VmHWM MiB | DNS queries | CPU µs/q | answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        first = run["points"][0]
        for p in run["points"]:
            last = p is run["points"][-1]
            lines.append(
                f"| {run['name']} | {p['domains']:,} | {p['VmRSS'] / 1024:.1f} "
                f"| {p['VmHWM'] / 1024:.1f} | {p['dns_queries'] - first['dns_queries']:,} "
                f"| {run['cpu_us_per_question'] if last else ''} "
                f"| {run['answers'] if last else ''} |"
            )
    spf_run = report["runs"][0]
    final = spf_run["points"][-1]["VmRSS"] / 1024
    verdict = "within" if final <= TARGET_MIB else "OVER"
    lines += ["", f"SPF daemon after all domains: {final:.1f} MiB ({verdict} the target)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=100_000)
    parser.add_argument("--chunks", type=int, default=10, help="memory read after each")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-baseline", action="store_true", help="skip the greylist-only run")
    parser.add_argument(
        "--spf-toml", default="", help="more [spf] lines, e.g. 'cache_size = 2000' (what-if runs)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/spf_memory.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(servers.REPO_DIR / "tests"))
    sys.path.insert(0, str(servers.REPO_DIR))
    from support.dns_server import DnsServer

    from policyd.config import SpfConfig

    t0 = time.monotonic()
    zone, questions, shapes = zone_and_questions(args.domains)
    requests = _requests(questions)
    defaults = SpfConfig()
    report: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "domains": args.domains,
            "shapes": dict(shapes),
            "concurrency": args.concurrency,
            "cache_size": defaults.cache_size,
            "result_cache_size": defaults.result_cache_size,
            "target_mib": TARGET_MIB,
            "spf_toml": args.spf_toml,
            "python": sys.version.split()[0],
        },
        "runs": [],
    }
    dns = DnsServer(zone).start()
    try:
        spf_toml = f'\n[spf]\nenabled = true\nnameservers = ["{dns.address}"]\n{args.spf_toml}\n'
        report["runs"].append(
            run_daemon("greylist + SPF", spf_toml, requests, args.chunks, args.concurrency, dns)
        )
        if not args.no_baseline:
            report["runs"].append(
                run_daemon("greylist only", "", requests, args.chunks, args.concurrency, dns)
            )
    finally:
        with contextlib.suppress(Exception):
            dns.stop()
    report["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    servers.write_results(args.out, report, summary_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

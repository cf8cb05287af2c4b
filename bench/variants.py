"""What a feature costs: the same load against policyd configured several ways, same run.

Each variant is the bench config of ``servers.policyd_config`` plus some TOML; the daemons
run side by side (own directories, own SQLite files) and are measured in interleaved rounds
(A B A B …) with the Exim-like client; medians over rounds, ratios to the first variant.

    python3 bench/variants.py [--rounds 5] [--duration 1.5] [--concurrency 16]
                              [--out bench/results/variants.json]

Default variants: greylisting only, and greylisting plus two rate-limit rules (issue #4's
target: ≥ 80 % of the greylist-only throughput at 16 askers). The rules' limits are far
above the load, so they cost their work but refuse nothing. ``--spf`` adds greylisting plus
SPF against a DNS server on loopback (tests/support/dns_server.py) that knows none of the workload's
sender domains (every answer NXDOMAIN, SPF ``none``): the "warm cache" of issue #5 (target:
≤ 20 % added per question). Warm means warm: the workload names ~6,800 distinct SPF
identities (3,000 sender domains, ``lists.`` subdomains, the HELO names of null senders), more
than the default ``cache_size`` (5,000) holds and spread over the whole workload, so the SPF
variant gets ``cache_size = SPF_CACHE_SIZE`` and, before the rounds, every variant is asked
one question per distinct identity (from a client outside the workload, unmeasured). The DNS
questions that still reach the server during the rounds are reported per question
(``dns_q_per_q``; ``--spf-cold`` leaves out the warm-up and the cache size, for the old mixed
figure).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
from loadgen import run_load
from workload import generate

VARIANTS = {"greylist": "", "greylist + 2 rate rules": servers.TWO_RATE_RULES}
SPF = """
[spf]
enabled = true
nameservers = ["{nameserver}"]
"""
#: DNS cache entries for the warm SPF variant: every distinct identity of the workload fits.
SPF_CACHE_SIZE = 20_000
#: The warm-up questions come from this client (TEST-NET-3): SPF ``none`` does not depend on
#: the address, and their greylisting triplets are not ones the rounds ask about.
WARMUP_CLIENT = b"203.0.113.77"


def spf_identity(request: bytes) -> str:
    """The name SPF checks for a workload question: the sender's domain, else the HELO."""
    fields = dict(f.split(b"=", 1) for f in request.split(b" ")[1:] if b"=" in f)
    sender = base64.b64decode(fields[b"from_b64"]).decode()
    if sender:
        return sender.partition("@")[2].lower()
    return base64.b64decode(fields[b"helo_b64"]).decode().lower()


def warmup_requests(requests: Any) -> list[bytes]:
    """One question per distinct SPF identity of the workload, from ``WARMUP_CLIENT``."""
    seen: set[str] = set()
    out = []
    for i in range(len(requests)):
        request = requests[i]
        name = spf_identity(request)
        if name not in seen:
            seen.add(name)
            head, _, tail = request.partition(b" ip=")
            out.append(head + b" ip=" + WARMUP_CLIENT + b" " + tail.partition(b" ")[2])
    return out


def measure_variants(
    variants: dict[str, str],
    *,
    rounds: int,
    duration: float,
    concurrency: int,
    size: int,
    dns: Any = None,
    warm: bool = False,
) -> dict[str, object]:
    workload = generate(size, seed=1)
    requests = workload.packed()
    warmup = warmup_requests(requests) if warm else []
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="policyd-variants-") as tmp:
        started = []
        try:
            for i, (name, extra) in enumerate(variants.items()):
                workdir = Path(tmp) / f"v{i}"
                workdir.mkdir()
                config = servers.policyd_config(workdir, max_connections=1024)
                config.write_text(config.read_text() + extra)
                started.append((name, servers.start_policyd(workdir, config)))
            if warmup:
                from spf_memory import ask_each

                for name, server in started:
                    print(f"warming {name}: {len(warmup):,} questions", file=sys.stderr)
                    ask_each(server.socket, warmup, concurrency=8)
            index = 0
            for _ in range(rounds):
                for name, server in started:
                    cpu0 = server.cpu_seconds()
                    dns0 = len(dns.log) if dns is not None else 0
                    res = run_load(
                        server.socket,
                        requests,
                        concurrency=concurrency,
                        duration=duration,
                        start_index=index,
                        target=name,
                    )
                    cpu = server.cpu_seconds() - cpu0
                    dns_questions = len(dns.log) - dns0 if dns is not None else 0
                    index = res.next_index
                    row = res.to_dict()
                    runs[name].append(
                        {
                            "qps": float(row["qps"]),
                            "p50_us": float(row["p50_us"]),
                            "p99_us": float(row["p99_us"]),
                            "cpu_us_per_q": cpu / max(1, res.issued) * 1e6,
                            "dns_q_per_q": dns_questions / max(1, res.issued),
                        }
                    )
        finally:
            for _, server in started:
                servers.stop(server)
    medians = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for name, rows in runs.items()
    }
    base = medians[next(iter(variants))]["qps"]
    return {
        "meta": {
            "rounds": rounds,
            "duration_s": duration,
            "concurrency": concurrency,
            "size": size,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "spf_warmup_questions": len(warmup),
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
        "medians": medians,
        "ratio_to_first": {name: m["qps"] / base for name, m in medians.items()},
        "runs": runs,
    }


def markdown(report: dict[str, object]) -> str:
    meta = report["meta"]
    assert isinstance(meta, dict)
    lines = [
        f"# bench/variants.py — {meta['when']}",
        "",
        f"{meta['rounds']} interleaved rounds × {meta['duration_s']} s at "
        f"{meta['concurrency']} askers, medians; ratio = q/s ÷ the first variant's.",
        "",
        "| variant | q/s | ratio | p50 / p99 µs | CPU µs/q | DNS q/q |",
        "|---|---|---|---|---|---|",
    ]
    medians = report["medians"]
    ratios = report["ratio_to_first"]
    assert isinstance(medians, dict) and isinstance(ratios, dict)
    for name, m in medians.items():
        lines.append(
            f"| {name} | {m['qps']:,.0f} | {ratios[name]:.2f} | {m['p50_us']:.0f} / "
            f"{m['p99_us']:.0f} | {m['cpu_us_per_q']:.1f} | {m['dns_q_per_q']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=1.5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/variants.json"))
    parser.add_argument("--spf", action="store_true", help="add a greylist + SPF variant")
    parser.add_argument(
        "--spf-cold", action="store_true", help="--spf without the warm-up and cache size"
    )
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    dns = None
    warm = args.spf and not args.spf_cold
    if args.spf or args.spf_cold:
        sys.path.insert(0, str(servers.REPO_DIR / "tests"))
        from support.dns_server import DnsServer

        dns = DnsServer({}).start()
        spf = SPF.replace("{nameserver}", dns.address)
        if warm:
            spf += f"cache_size = {SPF_CACHE_SIZE}\n"
        name = (
            "greylist + SPF (warm DNS cache)" if warm else "greylist + SPF (DNS cache as it comes)"
        )
        variants[name] = spf
    try:
        report = measure_variants(
            variants,
            rounds=args.rounds,
            duration=args.duration,
            concurrency=args.concurrency,
            size=args.size,
            dns=dns,
            warm=warm,
        )
    finally:
        if dns is not None:
            dns.stop()
    servers.write_results(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a feature costs: the same load against policyd configured several ways, same run.

Each variant is the bench config of ``servers.policyd_config`` plus some TOML; the daemons
run side by side (own directories, own SQLite files) and are measured in interleaved rounds
(A B A B …) with the Exim-like client; medians over rounds, ratios to the first variant.

    python3 bench/variants.py [--rounds 5] [--duration 1.5] [--concurrency 16]
                              [--out bench/results/variants.json]

Default variants: greylisting only, and greylisting plus two rate-limit rules (issue #4's
target: ≥ 80 % of the greylist-only throughput at 16 askers). The rules' limits are far
above the load, so they cost their work but refuse nothing. ``--spf`` adds greylisting plus
SPF against a DNS server on loopback (tests/dns_server.py) that knows none of the workload's
3,000 sender domains: after the first round every answer (NXDOMAIN, SPF ``none``) comes from
the daemon's DNS cache, the "warm cache" of issue #5 (target: ≤ 20 % added per question).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
from loadgen import run_load
from workload import generate

TWO_RULES = """
[[ratelimit.rule]]
name = "per-client-messages"
key = "client"
count = "messages"
rate = "1000000/1h"

[[ratelimit.rule]]
name = "per-sender-domain-recipients"
key = "sender_domain"
count = "recipients"
rate = "1000000/1h"
"""
VARIANTS = {"greylist": "", "greylist + 2 rate rules": TWO_RULES}
SPF = """
[spf]
enabled = true
nameservers = ["{nameserver}"]
"""


def measure_variants(
    variants: dict[str, str], *, rounds: int, duration: float, concurrency: int, size: int
) -> dict[str, object]:
    workload = generate(size, seed=1)
    requests = workload.packed()
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
            index = 0
            for _ in range(rounds):
                for name, server in started:
                    cpu0 = server.cpu_seconds()
                    res = run_load(
                        server.socket,
                        requests,
                        concurrency=concurrency,
                        duration=duration,
                        start_index=index,
                        target=name,
                    )
                    cpu = server.cpu_seconds() - cpu0
                    index = res.next_index
                    row = res.to_dict()
                    runs[name].append(
                        {
                            "qps": float(row["qps"]),
                            "p50_us": float(row["p50_us"]),
                            "p99_us": float(row["p99_us"]),
                            "cpu_us_per_q": cpu / max(1, res.issued) * 1e6,
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
        "| variant | q/s | ratio | p50 / p99 µs | CPU µs/q |",
        "|---|---|---|---|---|",
    ]
    medians = report["medians"]
    ratios = report["ratio_to_first"]
    assert isinstance(medians, dict) and isinstance(ratios, dict)
    for name, m in medians.items():
        lines.append(
            f"| {name} | {m['qps']:,.0f} | {ratios[name]:.2f} | {m['p50_us']:.0f} / "
            f"{m['p99_us']:.0f} | {m['cpu_us_per_q']:.1f} |"
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
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    dns = None
    if args.spf:
        sys.path.insert(0, str(servers.REPO_DIR / "tests"))
        from dns_server import DnsServer

        dns = DnsServer({}).start()
        variants["greylist + SPF (warm DNS cache)"] = SPF.replace("{nameserver}", dns.address)
    try:
        report = measure_variants(
            variants,
            rounds=args.rounds,
            duration=args.duration,
            concurrency=args.concurrency,
            size=args.size,
        )
    finally:
        if dns is not None:
            dns.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

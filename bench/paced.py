"""Latency of paced questions: one asker, a pause between questions, floor vs policyd.

Under Exim at a small host's load the daemon mostly sleeps between questions; this measures
what a question costs then (cold caches, a write transaction per question) next to the
floor paced the same way. Rounds alternate floor and policyd; each sends ``--count``
RCPT questions about a handful of recurring triplets, ``--gap`` ms apart.

    python3 bench/paced.py [--gaps 0.5,5] [--count 400] [--rounds 2]
                           [--out bench/results/paced.json]
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def ask(path: str, request: bytes) -> float:
    """One Exim-like question (connect, write, half-close, read to EOF); seconds."""
    started = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    return time.perf_counter() - started


def request(rnd: int, i: int) -> bytes:
    sender, rcpt = _b64(f"s{i % 7}@example.org"), _b64(f"u{i % 5}@example.com")
    return (
        f"rcpt v=1 ip=192.0.2.{i % 250} from_b64={sender} rcpt_b64={rcpt} txn=p{rnd}-{i}\n"
    ).encode()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return {"p50_us": pick(0.50), "p90_us": pick(0.90), "p99_us": pick(0.99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaps", default="0.5,5", help="pauses between questions, ms")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/paced.json"))
    args = parser.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="policyd-paced-") as tmp:
        workdir = Path(tmp)
        config = servers.policyd_config(workdir)
        floor = servers.start_floor(workdir)
        policyd = servers.start_policyd(workdir, config)
        try:
            for gap in gaps:
                for rnd in range(args.rounds):
                    for name, server in (("floor", floor), ("policyd", policyd)):
                        latencies = []
                        for i in range(args.count):
                            latencies.append(ask(server.socket, request(rnd, i)))
                            time.sleep(gap / 1000)
                        row = {"target": name, "gap_ms": gap, "round": rnd}
                        row.update(percentiles(latencies))
                        rows.append(row)
        finally:
            servers.stop(floor)
            servers.stop(policyd)
    lines = [
        f"# bench/paced.py — {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        "",
        f"One asker, {args.count} questions per round, rounds alternating; latency µs.",
        "",
        "| gap ms | round | target | p50 | p90 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gap_ms']} | {r['round']} | {r['target']} | {r['p50_us']:.0f} | "
            f"{r['p90_us']:.0f} | {r['p99_us']:.0f} |"
        )
    servers.write_results(args.out, {"rows": rows, "count": args.count}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two builds of policyd side by side: the same load, interleaved rounds (A B A B …).

What a code change is worth, measured on a shared, noisy machine: both daemons run at once
(each from its own source tree, with its own store), each round asks A and then B with the
Exim-like client, and the summary gives medians over rounds plus the median of the paired
per-round ratios B/A, which the machine's drift between rounds affects least.

    git worktree add /tmp/before HEAD~1
    python3 bench/ab.py /tmp/before . [--store redis] [--concurrency 1,16] [--rounds 6]
                        [--duration 1.5] [--out bench/results/ab.json]
    python3 bench/ab.py . . --python-b /usr/bin/python3 …   # one tree, two interpreters

``--store sqlite`` (default) gives each daemon its own SQLite file; ``--store redis`` its
own private redis-server (``servers.start_redis``), whose CPU per question is reported too.
A tree is any directory holding a ``policyd`` package (a git worktree of another commit).
``--python-a`` / ``--python-b`` run a build's daemon on another interpreter (with policyd's
dependencies installed; default the one running ab.py): the same tree twice then measures
what the interpreter's build is worth.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
import stats
from loadgen import run_load
from workload import generate

FIGURES = ("qps", "p50_us", "p99_us", "cpu_us_per_q", "store_cpu_us_per_q")


def _revision(tree: Path) -> str:
    """``git describe`` of a tree (with ``-dirty``), or '?' outside git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out.stdout.strip()


def _start(
    name: str, tree: Path, python: str, workdir: Path, store: str
) -> tuple[servers.Server, Any]:
    """A daemon from ``tree`` on ``python`` with the bench config, and its redis-server
    (or None)."""
    workdir.mkdir()
    redis = servers.start_redis(workdir, name=f"redis-{name}") if store == "redis" else None
    url = f"unix://{redis.socket}" if redis is not None else None
    config = servers.policyd_config(workdir, max_connections=1024, name=name, store_url=url)
    return servers.start_policyd(workdir, config, name=name, tree=tree, python=python), redis


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="source tree of build A (the reference)")
    ap.add_argument("b", type=Path, help="source tree of build B")
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--concurrency", default="16", help="e.g. 1,16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=1.5, help="seconds per run")
    ap.add_argument("--size", type=int, default=100_000, help="questions in the workload")
    ap.add_argument("--out", type=Path, default=servers.BENCH_DIR / "results" / "ab.json")
    for side in ("a", "b"):
        ap.add_argument(
            f"--python-{side}",
            default=sys.executable,
            help=f"interpreter for build {side.upper()}'s daemon (default: this one)",
        )
    args = ap.parse_args(argv)
    for tree in (args.a, args.b):
        if not (tree.resolve() / "policyd" / "__init__.py").is_file():
            ap.error(f"{tree}: no policyd package there")
    return args


def _one_run(
    daemon: servers.Server, redis: Any, requests: Any, concurrency: int, duration: float, index: int
) -> tuple[dict[str, float], int]:
    """One measured run: the figures of ``FIGURES`` and where the next run starts."""
    cpu = daemon.cpu_seconds()
    store_cpu = redis.cpu_seconds() if redis is not None else 0.0
    run = run_load(
        daemon.socket,
        requests,
        concurrency=concurrency,
        duration=duration,
        start_index=index,
        target=daemon.name,
    )
    asked = max(1, run.issued)
    figures = run.to_dict()
    store_used = redis.cpu_seconds() - store_cpu if redis else 0.0
    return {
        "qps": float(figures["qps"]),  # type: ignore[arg-type]
        "p50_us": float(figures["p50_us"]),  # type: ignore[arg-type]
        "p99_us": float(figures["p99_us"]),  # type: ignore[arg-type]
        "cpu_us_per_q": (daemon.cpu_seconds() - cpu) / asked * 1e6,
        "store_cpu_us_per_q": store_used / asked * 1e6,
    }, run.next_index


def _analyse(rounds: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per build, and B/A of q/s and p99 paired by round with 95 % intervals."""
    medians = {
        name: {f: stats.median([r[f] for r in rows]) for f in FIGURES}
        for name, rows in rounds.items()
    }
    paired = {
        key: stats.paired_ratio([r[key] for r in rounds["B"]], [r[key] for r in rounds["A"]])
        for key in ("qps", "p99_us")
    }
    return {
        "rounds": rounds,
        "medians": medians,
        "b_over_a_qps": paired["qps"].value if paired["qps"] else None,
        "b_over_a_qps_paired": paired["qps"].to_dict() if paired["qps"] else None,
        "b_over_a_p99_paired": paired["p99_us"].to_dict() if paired["p99_us"] else None,
    }


def _markdown(concurrency: int, result: dict[str, Any]) -> list[str]:
    lines = [
        f"## {concurrency} asker{'s' if concurrency != 1 else ''}",
        "",
        "| build | q/s | p50 µs | p99 µs | CPU/q µs | store CPU/q µs |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in result["medians"].items():
        lines.append(
            f"| {name} | {m['qps']:,.0f} | {m['p50_us']:.0f} | {m['p99_us']:.0f} "
            f"| {m['cpu_us_per_q']:.1f} | {m['store_cpu_us_per_q']:.1f} |"
        )
    fmt = stats.Estimate.text
    qps = result["b_over_a_qps_paired"]
    p99 = result["b_over_a_p99_paired"]
    lines += [
        "",
        "B/A, median of paired rounds [95 % interval]: q/s "
        + (fmt(stats.Estimate(**qps), ".3f") if qps else "n/a")
        + ", p99 "
        + (fmt(stats.Estimate(**p99), ".3f") if p99 else "n/a"),
        "",
    ]
    return lines


def _header(args: argparse.Namespace, report: dict[str, Any]) -> list[str]:
    builds = report["builds"]
    return [
        f"# bench/ab.py — A {builds['A']['revision']} vs B {builds['B']['revision']}, "
        f"{args.store} store",
        "",
        f"{args.rounds} interleaved rounds × {args.duration:g} s, medians over rounds; "
        "B/A is the median of the per-round ratios, with its 95 % bootstrap interval.",
        "",
        *(f"- {name}: Python {servers.describe(b['python'])}" for name, b in builds.items()),
        f"- clients: Python {servers.describe(report['client_python'])}",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    pythons = {"A": args.python_a, "B": args.python_b}
    requests = generate(args.size, seed=1).packed()
    report: dict[str, Any] = {
        "store": args.store,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "builds": {
            name: {
                "tree": str(t),
                "revision": _revision(t),
                "python": servers.interpreter(pythons[name]),
            }
            for name, t in trees.items()
        },
        "client_python": servers.interpreter(sys.executable),
        "results": {},
    }
    lines = _header(args, report)
    running: dict[str, tuple[servers.Server, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="policyd-ab-") as tmp:
        try:
            for name, tree in trees.items():
                running[name] = _start(name, tree, pythons[name], Path(tmp) / name, args.store)
            index = 0
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                rounds: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
                for _ in range(args.rounds):
                    for name, (daemon, redis) in running.items():
                        figures, index = _one_run(
                            daemon, redis, requests, concurrency, args.duration, index
                        )
                        rounds[name].append(figures)
                result = _analyse(rounds)
                report["results"][str(concurrency)] = result
                lines += _markdown(concurrency, result)
        finally:
            for daemon, redis in running.values():
                servers.stop(daemon)
                if redis is not None:
                    servers.stop(redis)
    servers.write_results(args.out, report, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

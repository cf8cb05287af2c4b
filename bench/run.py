"""Benchmark driver: policyd against the floor and greylistd, per question, paired rounds.

Starts the floor (bench/floor.py), the daemon (``python3 -m policyd``, SQLite store in a
temporary directory, greylisting plus two rate-limit rules unless ``--no-rate-rules``), a
second daemon ``policyd-redis`` on a private redis-server (``--no-redis`` to leave it out)
and the peers (greylistd; postgrey too in the full mode or with ``--peer-list``), then:

1. closed loop: for each concurrency, rounds in which every target runs once (the order
   rotates from round to round) with the Exim-like client of bench/loadgen.py;
2. paced: rounds of one asker sending questions ``--paced-gap`` ms apart (5 by default) to
   every target answering one question per connection (bench/paced.py);
3. analysis (bench/run_report.py): medians over rounds, every ratio as the median of the
   per-round (paired) ratios with a 95 % bootstrap interval (bench/stats.py), and the
   per-question targets with a verdict each (met / not met / inconclusive);
4. report: ``bench/results/run-MODE.json`` and ``.md`` (overwritten; ``--out`` elsewhere).

After each round of a target that keeps its state on disk (policyd on SQLite, postgrey) the
bench waits ``SETTLE_S`` and syncs, so the next target's round does not carry that target's
disk writeback; every round records the machine's writeback (``disk_written_kib``).

    python3 bench/run.py [--quick] [--out FILE.json] [--profile [TARGET]] [--no-peers]
                         [--no-redis] [--no-rate-rules] [--workdir DIR] [--python PYTHON]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lineup
import peers
import run_report
import servers
from lineup import REDIS_TARGET, Contender
from loadgen import ENGINES, Requests, format_result
from paced import run_paced
from workload import generate


@dataclass
class Plan:
    """What a run does: a mode's settings with the command line's overrides."""

    mode: str
    concurrency: list[int]
    rounds: int
    duration: float  # seconds measured per closed-loop run
    warmup: float  # unmeasured seconds before it
    size: int  # questions in the workload
    peers: list[str]
    paced_rounds: int
    paced_count: int  # questions per paced run
    paced_gap_ms: float = 5.0
    policyd_config: str = "greylisting + 2 rate rules"
    engine: str = "blocking"
    seed: int = 1
    log_level: str | None = None
    out: Path = Path()


MODES = {
    "quick": Plan(
        "quick",
        [1, 16],
        rounds=8,
        duration=1.0,
        warmup=0.2,
        size=100_000,
        peers=["greylistd"],
        paced_rounds=8,
        paced_count=150,
    ),
    "full": Plan(
        "full",
        [1, 4, 16, 64],
        rounds=9,
        duration=3.0,
        warmup=0.3,
        size=400_000,
        peers=list(peers.PEERS),
        paced_rounds=12,
        paced_count=400,
    ),
}
#: After each round of a target that keeps its state on disk (policyd on SQLite, postgrey),
#: wait this long (more than policyd's 1 s WAL checkpoint interval), then sync(): its
#: deferred writes (the checkpoint, the kernel's writeback of its dirty pages, ~50 MB per
#: SQLite round at 16 askers) are done before the next target's round instead of inside it.
SETTLE_S = 1.5
RESULTS_DIR = servers.BENCH_DIR / "results"


@dataclass
class Lab:
    """What a run started and what it knows about it."""

    workdir: Path
    name_b: str = "policyd"
    contenders: list[Contender] = field(default_factory=list)
    started: list[servers.Server] = field(default_factory=list)
    peers: dict[str, dict] = field(default_factory=dict)
    redis: dict[str, object] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="c=1,16, 8 short rounds, greylistd only (~3 min)")
    add("--out", type=Path, help="JSON output (default bench/results/run-MODE.json)")
    add("--engine", choices=ENGINES, default="blocking", help="load client")
    add("--rounds", type=int, help="override the mode's rounds")
    add("--duration", type=float, help="override seconds measured per run")
    add("--concurrency", type=str, help="override, e.g. 1,16")
    add("--seed", type=int, default=1)
    add(
        "--stand-in",
        choices=["policyd", "floor"],
        default="policyd",
        help="what runs as target B (floor: test the harness)",
    )
    add(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the peers (installed with apt-get when root and absent; a "
        "missing peer is skipped with a note). Default: on",
    )
    add("--peer-list", help="which peers (quick: greylistd; full: greylistd,postgrey)")
    add(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also measure {REDIS_TARGET}: the daemon on a private redis-server (Unix socket "
        "in the temporary directory, no TCP, no persistence). Default: on",
    )
    add(
        "--rate-rules",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the daemons with two rate-limit rules besides greylisting, the configuration "
        "of the targets (servers.TWO_RATE_RULES). Default: on",
    )
    add("--paced-gap", type=float, default=5.0, help="ms between paced questions; 0: no paced")
    add("--paced-rounds", type=int, help="override the mode's paced rounds")
    add("--log-level", help="override policyd's [server] log_level")
    add(
        "--profile",
        nargs="?",
        const="policyd",
        choices=["policyd", REDIS_TARGET],
        help=f"py-spy a daemon at c=16 (default policyd; or {REDIS_TARGET})",
    )
    add("--keep", action="store_true", help="keep the temporary directory")
    add(
        "--workdir",
        type=Path,
        help="where the run's temporary directory goes (default the system's; tmpfs keeps "
        "the SQLite target's writeback off the disk: bench/README.md)",
    )
    add(
        "--python",
        help="the interpreter the floor and the daemons run on (with policyd's dependencies; "
        'default this one). The clients always run on this one (bench/README.md, "Which '
        'Python")',
    )
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """The mode's settings with the command line's overrides."""
    mode = "quick" if args.quick else "full"
    overrides = {
        "rounds": args.rounds,
        "duration": args.duration,
        "paced_rounds": args.paced_rounds,
        "concurrency": args.concurrency and [int(c) for c in args.concurrency.split(",")],
        "peers": args.peer_list and [p.strip() for p in args.peer_list.split(",") if p.strip()],
    }
    plan = dataclasses.replace(
        MODES[mode],
        **{k: v for k, v in overrides.items() if v},
        paced_gap_ms=args.paced_gap,
        policyd_config="greylisting + 2 rate rules" if args.rate_rules else "greylisting only",
        engine=args.engine,
        seed=args.seed,
        log_level=args.log_level,
        out=args.out or RESULTS_DIR / f"run-{mode}.json",
    )
    if not args.peers:
        plan.peers = []
    if args.paced_gap <= 0:
        plan.paced_rounds = 0
    return plan


# --------------------------------------------------------------------------------------------
# Phase 1: set-up


def set_up(lab: Lab, args: argparse.Namespace, plan: Plan, requests: Requests) -> None:
    """Start the floor, target B, policyd-redis and the peers; a target that cannot start is
    skipped with a note (lab.redis, lab.peers)."""
    extra = servers.TWO_RATE_RULES if args.rate_rules else ""
    floor = servers.start_floor(lab.workdir)
    lab.started.append(floor)
    if args.stand_in == "floor":
        lab.name_b = "floor2"
        b = servers.start_floor(lab.workdir, name="floor2")
    else:
        conf = servers.policyd_config(lab.workdir, log_level=args.log_level, extra=extra)
        b = servers.start_policyd(lab.workdir, conf)
    lab.started.append(b)
    lab.contenders += [
        Contender("floor", floor, requests),
        Contender(lab.name_b, b, requests, settle=lab.name_b == "policyd"),
    ]
    if args.redis:
        target, started = lineup.start_redis_target(
            lab.workdir, requests, extra, args.log_level, lab.redis
        )
        lab.started += started
        lab.contenders += [target] if target else []
    else:
        lab.redis = {"status": "skipped", "note": "--no-redis: not measured"}
    if plan.peers:
        found, started = lineup.start_peers(lab.workdir, requests, plan.peers, lab.peers)
        lab.contenders += found
        lab.started += started
    for name in set(peers.PEERS) - set(plan.peers):
        lab.peers[name] = {"status": "skipped", "note": "not in the peer list: not measured"}


# --------------------------------------------------------------------------------------------
# Phase 2: rounds


def _rotated(contenders: list[Contender], r: int) -> list[Contender]:
    """Round ``r``'s order: the list rotated by ``r``, so that no target always follows the
    same one (what a target leaves behind, e.g. caches or writeback, is spread over all)."""
    k = r % len(contenders)
    return contenders[k:] + contenders[:k]


def closed_loop_rounds(
    contenders: list[Contender], plan: Plan, engine: str
) -> dict[str, dict[str, run_report.Rows]]:
    """Every concurrency, every round, every target once: ``rows[c][target]``."""
    rows: dict[str, dict[str, run_report.Rows]] = {}
    for c in plan.concurrency:
        per: dict[str, run_report.Rows] = {t.name: [] for t in contenders}
        for r in range(plan.rounds):
            for t in _rotated(contenders, r):
                row, res = lineup.measure(
                    t,
                    concurrency=c,
                    duration=plan.duration,
                    warmup=plan.warmup,
                    engine=engine,
                )
                t.index = res.next_index
                if t.settle:
                    time.sleep(SETTLE_S)
                    os.sync()
                row["round"] = r
                per[t.name].append(row)
                print(
                    f"  round {r}: {format_result(res)} cpu/q={row['cpu_us_per_q']}µs",
                    file=sys.stderr,
                )
                t.check_alive()
        rows[str(c)] = per
    return rows


def paced_rounds(contenders: list[Contender], plan: Plan) -> dict[str, run_report.Rows]:
    """One asker, questions ``paced_gap_ms`` apart, every connection-per-question target
    once per round: ``rows[target]``."""
    paced = [t for t in contenders if t.terminator is None]
    rows: dict[str, run_report.Rows] = {t.name: [] for t in paced} if plan.paced_rounds else {}
    for r in range(plan.paced_rounds):
        for t in _rotated(paced, r):
            row = run_paced(
                t.server.socket,
                t.requests,
                start=t.index,
                count=plan.paced_count,
                gap_s=plan.paced_gap_ms / 1e3,
            )
            t.index = int(row.pop("next_index"))
            row["round"] = r
            rows[t.name].append(row)
            print(
                f"  paced round {r} {t.name}: p50 {row['p50_us']} µs, p99 {row['p99_us']} µs",
                file=sys.stderr,
            )
            t.check_alive()
    return rows


# --------------------------------------------------------------------------------------------
# Phase 3: analysis


def _server_figures(lab: Lab, closed: dict[str, dict[str, run_report.Rows]]) -> None:
    """Each peer's and policyd-redis's RSS, answers and errors over every round."""
    for t in lab.contenders:
        rows = [row for per in closed.values() for row in per.get(t.name, [])]
        figures = {
            "memory_kib": t.server.memory_kib(),
            "answers": run_report.totals(rows, "answers"),
            "errors": run_report.totals(rows, "error_kinds"),
        }
        if t.name in lab.peers:
            lab.peers[t.name].update(figures)
        if t.name == REDIS_TARGET and t.store is not None:
            lab.redis.update(figures, redis_server_memory_kib=t.store.memory_kib())


def analyse(
    lab: Lab,
    plan: Plan,
    closed: dict[str, dict[str, run_report.Rows]],
    paced: dict[str, run_report.Rows],
) -> dict:
    """The report: per concurrency and paced figures, the targets, the servers' figures."""
    _server_figures(lab, closed)
    b_rows = [row for per in closed.values() for row in per[lab.name_b]]
    b = next(t for t in lab.contenders if t.name == lab.name_b)
    daemons = [lab.name_b, REDIS_TARGET]
    return {
        "meta": _meta(lab, plan),
        "targets": run_report.judge_targets(closed, paced, lab.name_b),
        "results": {c: run_report.analyse_concurrency(per, daemons) for c, per in closed.items()},
        "paced": run_report.analyse_paced(paced) if paced else {},
        "memory_kib": b.server.memory_kib(),
        "answers": run_report.totals(b_rows, "answers"),
        "errors": run_report.totals(b_rows, "error_kinds"),
        "peers": lab.peers,
        "redis": lab.redis,
    }


def _meta(lab: Lab, plan: Plan) -> dict[str, object]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git": lineup.git_revision(),
        "python": platform.python_version(),
        "server_python": servers.interpreter(servers.SERVER_PYTHON),
        "client_python": servers.interpreter(sys.executable),
        "cpus": os.cpu_count(),
        **{k: v for k, v in dataclasses.asdict(plan).items() if k != "out"},
        "duration_s": plan.duration,
        "workload_size": plan.size,
        "target_b": lab.name_b,
        "targets": [t.name for t in lab.contenders],
        "workdir_fs": lineup.filesystem_of(lab.workdir),
        "elapsed_s": None,
    }


# --------------------------------------------------------------------------------------------
# Phase 4: report (and tear-down)


def tear_down(lab: Lab, keep: bool) -> dict[str, int | None]:
    """Stop every server we started (by PID, newest first); their exit codes."""
    codes = {server.name: servers.stop(server) for server in reversed(lab.started)}
    if keep:
        print(f"kept {lab.workdir}", file=sys.stderr)
    else:
        shutil.rmtree(lab.workdir, ignore_errors=True)
    return codes


def run(args: argparse.Namespace, plan: Plan, lab: Lab, requests: Requests) -> dict:
    """Phases 1-3 and the optional profile; the servers are stopped by the caller."""
    set_up(lab, args, plan, requests)
    closed = closed_loop_rounds(lab.contenders, plan, args.engine)
    paced = paced_rounds(lab.contenders, plan)
    report = analyse(lab, plan, closed, paced)
    if args.profile:
        wanted = lab.name_b if args.profile == "policyd" else args.profile
        who = next((t for t in lab.contenders if t.name == wanted), None)
        report["profile"] = (
            lineup.profile(who, plan.out, plan.duration * 3)
            if who
            else {"error": f"{args.profile} not running"}
        )
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.python:
        servers.SERVER_PYTHON = args.python
    print(
        f"servers on Python {servers.describe(servers.interpreter(servers.SERVER_PYTHON))}",
        file=sys.stderr,
    )
    plan = make_plan(args)
    t0 = time.monotonic()
    wl = generate(plan.size, args.seed)
    requests = wl.packed()
    print(
        f"workload: {len(wl)} questions {wl.counts()} in {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
    )
    del wl
    lab = Lab(Path(tempfile.mkdtemp(prefix="policyd-bench-", dir=args.workdir)))
    try:
        report = run(args, plan, lab, requests)
    finally:
        codes = tear_down(lab, args.keep)
    report["meta"]["exit_codes"] = codes
    report["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    servers.write_results(plan.out, report, run_report.summary_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

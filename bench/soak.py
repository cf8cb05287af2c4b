"""Soak: the daemon at a fixed rate for N minutes, watched every 10 s (issue #16).

Starts policyd (SQLite by default, ``--store redis`` for a private redis-server) as the other
benches do (``servers.py``), then asks the seeded workload (``workload.py``: new triplets,
retries, whitelisted clients) at a fixed rate, each question as Exim asks it (connection,
one write, half-close, read to EOF; ``loadgen._Question``). Without ``--rate``, the rate is
the highest the daemon sustains at 16 askers, measured first for 3 s with ``loadgen``.

Every 10 s it prints the daemon's RSS, the WAL and -shm sizes, open files (/proc/PID/fd),
bytes logged so far, q/s, p50/p99 and errors over the interval. At the end, a verdict against
the issue's limits: WAL ≤ 64 MiB and RSS ≤ 48 MiB at every sample, and no error at all (no
failed connection, no ``error`` answer, no traceback in the log). JSON and markdown go to
``bench/results/soak.{json,md}`` (overwritten).

    python3 bench/soak.py [--minutes 10] [--rate Q/S] [--store sqlite|redis]

Not collected by pytest and not run in CI: it takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadgen
import servers
from workload import generate

#: Issue #16's limits for the soak.
WAL_LIMIT = 64 * 1024 * 1024
RSS_LIMIT_KIB = 48 * 1024
REPORT_EVERY = 10.0
#: How long one question may take before it counts as an error (Exim's readsocket timer).
EXIM_TIMEOUT = 2.0
#: Questions in flight at most: the client waits (and falls behind its schedule, which the
#: report shows) rather than flood the daemon's backlog when the daemon is slower than the
#: rate; 64 is 4 × the calibration's askers.
MAX_IN_FLIGHT = 64
#: Askers of the calibration run that picks the default rate.
CALIBRATION_ASKERS = 16
CALIBRATION_SECONDS = 3.0
WORKLOAD_SIZE = 200_000


@dataclass
class Interval:
    """What one report line says."""

    at_s: float
    rss_kib: int
    wal_bytes: int
    shm_bytes: int
    open_files: int
    log_bytes: int
    qps: float
    #: How far the client was behind its schedule (the daemon slower than the rate).
    behind_s: float
    p50_us: float
    p99_us: float
    errors: int
    answers: dict[str, int] = field(default_factory=dict)


@dataclass
class Tally:
    """Questions answered since the last report."""

    latencies: list[float] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def take(self) -> Tally:
        taken = Tally(self.latencies, self.answers, self.errors)
        self.latencies, self.answers, self.errors = [], {}, {}
        return taken


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def ask(path: str, request: bytes, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    done: asyncio.Future[bytes] = loop.create_future()
    # A failure after our timeout gave up on it must not be reported as never retrieved.
    done.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        async with asyncio.timeout(EXIM_TIMEOUT):
            await loop.create_unix_connection(lambda: loadgen._Question(request, done), path)
            answer = await done
    except (OSError, TimeoutError) as exc:
        kind = type(exc).__name__
        tally.errors[kind] = tally.errors.get(kind, 0) + 1
        return
    tally.latencies.append(time.perf_counter() - started)
    kind = loadgen.classify(answer)
    tally.answers[kind] = tally.answers.get(kind, 0) + 1
    if kind in ("error", "empty", "other"):
        tally.errors[kind] = tally.errors.get(kind, 0) + 1


def observe(
    server: servers.Server, db: Path | None, tally: Tally, at: float, behind: float
) -> Interval:
    taken = tally.take()
    lat = sorted(taken.latencies)
    ns = [int(s * 1e9) for s in lat]
    memory = server.memory_kib()
    return Interval(
        at_s=round(at, 1),
        rss_kib=memory["VmRSS"],
        wal_bytes=size(db.with_name(db.name + "-wal")) if db else 0,
        shm_bytes=size(db.with_name(db.name + "-shm")) if db else 0,
        open_files=len(os.listdir(f"/proc/{server.pid}/fd")),
        log_bytes=size(server.log),
        qps=len(lat) / REPORT_EVERY,
        behind_s=round(behind, 2),
        p50_us=loadgen.percentile(ns, 50) / 1e3,
        p99_us=loadgen.percentile(ns, 99) / 1e3,
        errors=sum(taken.errors.values()),
        answers={**taken.answers, **{f"failed:{k}": v for k, v in taken.errors.items()}},
    )


def line(row: Interval) -> str:
    return (
        f"{row.at_s:7.0f}s  RSS {row.rss_kib / 1024:5.1f} MiB  WAL {row.wal_bytes / 2**20:6.1f} MiB"
        f"  shm {row.shm_bytes / 1024:5.0f} KiB  fds {row.open_files:3d}"
        f"  log {row.log_bytes / 2**20:7.1f} MiB  {row.qps:7.0f} q/s (behind {row.behind_s:g} s)"
        f"  p50 {row.p50_us:6.0f} µs  p99 {row.p99_us:7.0f} µs  errors {row.errors}"
    )


async def soak(
    server: servers.Server, db: Path | None, rate: float, seconds: float
) -> list[Interval]:
    requests = generate(WORKLOAD_SIZE, seed=16).packed()
    tally = Tally()
    pending: set[asyncio.Task[None]] = set()
    rows: list[Interval] = []
    started = time.monotonic()
    next_report = started + REPORT_EVERY
    index = 0
    while (now := time.monotonic()) < started + seconds:
        if now >= next_report:
            behind = max(0.0, now - (started + index / rate))
            rows.append(observe(server, db, tally, now - started, behind))
            print(line(rows[-1]), flush=True)
            next_report += REPORT_EVERY
        due = started + index / rate
        if due > now:
            await asyncio.sleep(min(due, next_report) - now)
            continue
        if len(pending) >= MAX_IN_FLIGHT:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            continue
        task = asyncio.create_task(ask(server.socket, requests[index % len(requests)], tally))
        pending.add(task)
        task.add_done_callback(pending.discard)
        index += 1
    if pending:
        await asyncio.wait(pending)
    rows.append(observe(server, db, tally, time.monotonic() - started, 0.0))  # the last part
    print(line(rows[-1]), flush=True)
    return rows


def verdict(rows: list[Interval], log: str) -> dict[str, object]:
    failures = []
    if any(r.wal_bytes > WAL_LIMIT for r in rows):
        failures.append(f"WAL above {WAL_LIMIT // 2**20} MiB")
    if any(r.rss_kib > RSS_LIMIT_KIB for r in rows):
        failures.append(f"RSS above {RSS_LIMIT_KIB // 1024} MiB")
    errors = sum(r.errors for r in rows)
    if errors:
        failures.append(f"{errors} failed questions")
    if "Traceback" in log:
        failures.append("a traceback in the log")
    return {"pass": not failures, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="q/s (default: calibrated)")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--out", type=Path, default=servers.BENCH_DIR / "results" / "soak.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="policyd-soak-") as tmp:
        workdir = Path(tmp)
        redis = servers.start_redis(workdir) if args.store == "redis" else None
        db = None if redis else workdir / "state.sqlite3"
        url = f"unix://{redis.socket}" if redis else None
        config = servers.policyd_config(workdir, db_path=db, store_url=url)
        policyd = servers.start_policyd(workdir, config)
        try:
            rate = args.rate
            if not rate:
                calibration = loadgen.run_load(
                    policyd.socket,
                    generate(WORKLOAD_SIZE, seed=1).packed(),
                    concurrency=CALIBRATION_ASKERS,
                    duration=CALIBRATION_SECONDS,
                )
                rate = calibration.qps
                print(f"calibrated: {loadgen.format_result(calibration)}", flush=True)
            print(f"soak: {args.minutes:g} min at {rate:,.0f} q/s, store {args.store}", flush=True)
            loadgen.install_uvloop()
            rows = asyncio.run(soak(policyd, db, rate, args.minutes * 60))
            log = policyd.log.read_text(errors="replace")
        finally:
            servers.stop(policyd)
            if redis is not None:
                servers.stop(redis)
    result = verdict(rows, log)
    report = {
        "store": args.store,
        "minutes": args.minutes,
        "rate": rate,
        "limits": {"wal_bytes": WAL_LIMIT, "rss_kib": RSS_LIMIT_KIB},
        "verdict": result,
        "samples": [asdict(r) for r in rows],
        "python": servers.describe(servers.interpreter(servers.SERVER_PYTHON)),
    }
    lines = [
        f"# bench/soak.py — {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        "",
        f"{args.minutes:g} min at {rate:,.0f} q/s, store {args.store}; "
        f"verdict: {'PASS' if result['pass'] else 'FAIL ' + '; '.join(result['failures'])}",
        "",
        "```",
        *map(line, rows),
        "```",
    ]
    servers.write_results(args.out, report, "\n".join(lines) + "\n")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

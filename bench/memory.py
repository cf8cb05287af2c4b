"""Memory of the daemon: RSS against the number of stored triplets and of idle connections.

1. Store size. For each N (0, 100k, 1M; 10M with ``--huge``) a fresh SQLite file is
   pre-filled with N distinct greylisting triplets *before* the daemon starts (bulk insert,
   using the daemon's own key functions and schema so the rows are ones it will find), then
   the daemon answers questions about randomly chosen stored triplets, and its VmRSS/VmHWM
   are read. design.md §4/§5: RSS must not depend on the number of rows.
2. Idle connections. With 0, 100 and 1000 connections held open without a request (a holder
   process reconnects each one as soon as the daemon's deadline closes it), the daemon's RSS
   and the latency and answers of real questions asked meanwhile.

    python3 bench/memory.py [--sizes 0,100000,1000000] [--huge] [--out bench/results/NAME.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
import stats
from loadgen import install_uvloop, run_load
from workload import Packed, Triplet, format_request

sys.path.insert(0, str(servers.REPO_DIR))

DAY = 86400.0
_HEX_TO_LETTERS = str.maketrans("0123456789abcdef", "ghijklmnopqrstuv")
# First octets kept away from private, loopback and the bench whitelist (198.51.100.0/24).
_FIRST_OCTETS = [a for a in range(1, 224) if a not in (10, 127, 198)]


def _letters(n: int) -> str:
    """Letters only: the daemon folds digit and hex runs of senders (VERP), so ids made of
    digits would collapse into one key."""
    return format(n, "x").translate(_HEX_TO_LETTERS)


def synthetic_triplet(i: int, seed: int) -> Triplet:
    """Triplet number ``i``: cheap, deterministic, distinct with overwhelming probability."""
    h = int.from_bytes(hashlib.blake2b(b"%d:%d" % (seed, i), digest_size=16).digest(), "big")
    if h & 3 == 0:  # a quarter IPv6
        net, sub, host = (h >> 2) % 0xFFFF, (h >> 18) & 0xFFFF, ((h >> 34) & 0xFF) + 1
        ip = str(ipaddress.IPv6Address((0x20010DB8 << 96) | (net << 80) | (sub << 64) | host))
    else:
        a = _FIRST_OCTETS[(h >> 2) % len(_FIRST_OCTETS)]
        ip = f"{a}.{(h >> 10) & 255}.{(h >> 18) & 255}.{((h >> 26) & 127) + 1}"
    sender = f"{_letters((h >> 40) & 0xFFFFFFFFFF)}@{_letters(0x1000 + ((h >> 80) & 0xFFF))}.com"
    rcpt = f"{_letters(0x100 + (h >> 92) % 5000)}@example.org"
    return Triplet(ip, sender, rcpt, "mx.example.net")


def _stored_rows(
    n: int, seed: int, now: float
) -> Iterator[tuple[str, float, float, int, int, float]]:
    """Rows for the ``triplet`` table, keyed exactly as the daemon keys them.

    The only part to adapt when the store changes: it imports the daemon's key functions.
    Half the rows are passed triplets, half are waiting for a retry that is now due.
    """
    from policyd.addresses import client_network, normalise_recipient, normalise_sender
    from policyd.checks.greylist import triplet_key
    from policyd.config import GreylistConfig

    grey = GreylistConfig()
    for i in range(n):
        t = synthetic_triplet(i, seed)
        net = client_network(ipaddress.ip_address(t.ip), grey.ipv4_prefix, grey.ipv6_prefix)
        key = triplet_key(net, normalise_sender(t.sender), normalise_recipient(t.rcpt))
        if i & 1:
            yield key, now - 3 * DAY, now - DAY, 1, 2, now + grey.max_age - DAY
        else:
            yield key, now - 3600, now - 3600, 0, 1, now - 3600 + grey.retry_window


def prefill_sqlite(db_path: Path, n: int, seed: int, now: float, chunk: int = 1_000_000) -> dict:
    """Bulk-insert ``n`` triplets into a new store file, sorted by key (B-tree appends).

    Opens the file with the daemon's own ``connect`` (schema, pragmas), switches the journal
    off for the load, and leaves the file in WAL mode as the daemon expects it.
    """
    from policyd.stores.sqlite import connect

    t0 = time.monotonic()
    db = connect(db_path, 4096)
    db.execute("PRAGMA journal_mode = DELETE")
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA cache_size = -262144")
    rows = _stored_rows(n, seed, now)
    done = 0
    while done < n:
        batch = sorted(row for _, row in zip(range(chunk), rows, strict=False))
        db.execute("BEGIN")
        db.executemany(
            "INSERT OR REPLACE INTO triplet (k, first_seen, last_seen, passed, attempts, expires)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            batch,
        )
        db.execute("COMMIT")
        done += len(batch)
    stored = db.execute("SELECT count(*) FROM triplet").fetchone()[0]
    db.execute("PRAGMA journal_mode = WAL")
    db.close()
    return {
        "requested": n,
        "stored": stored,
        "fill_s": round(time.monotonic() - t0, 1),
        "file_mib": round(db_path.stat().st_size / 2**20, 1),
    }


def touch_requests(n: int, count: int, seed: int) -> Packed:
    """Questions about ``count`` random stored triplets (another host of the same network)."""
    rng = random.Random(seed + 1)
    out = []
    for q in range(count):
        t = synthetic_triplet(rng.randrange(n), seed)
        out.append(format_request(t, txn=f"{q}-touch"))
    return Packed(out)


def store_size_point(n: int, args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="policyd-mem-"))
    point: dict = {"triplets": n}
    server = None
    try:
        db_path = workdir / "state.sqlite3"
        if n:
            point["prefill"] = prefill_sqlite(db_path, n, args.seed, time.time())
            print(f"  prefilled {point['prefill']}", file=sys.stderr)
        conf = servers.policyd_config(workdir, db_path=db_path)
        server = servers.start_policyd(workdir, conf)
        time.sleep(0.5)
        point["rss_kib_idle"] = server.memory_kib()
        # With an empty store the same questions are all new triplets (inserts).
        requests = touch_requests(n or 1_000_000, args.touch, args.seed)
        res = run_load(
            server.socket,
            requests,
            concurrency=16,
            duration=args.touch_seconds,
            warmup=0.0,
            target="policyd",
        )
        point["touch"] = {
            k: res.to_dict()[k]
            for k in ("questions", "qps", "p50_us", "p99_us", "answers", "errors")
        }
        point["rss_kib_after"] = server.memory_kib()
        point["exit_code"] = servers.stop(server)
    finally:
        if server is not None and server.alive():
            servers.stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return point


class _Idle(asyncio.Protocol):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        self._lost = lost

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)


async def _hold(
    path: str, k: int, t_stop: float, conn: multiprocessing.connection.Connection
) -> dict:
    """Keep ``k`` connections open without sending anything until ``t_stop``."""
    loop = asyncio.get_running_loop()
    stats = {"opened": 0, "closed_by_server": 0, "connect_errors": 0, "open": 0, "max_open": 0}
    ready_sent = False

    async def keep_one() -> None:
        nonlocal ready_sent
        while time.monotonic() < t_stop:
            lost: asyncio.Future[None] = loop.create_future()
            try:
                transport, _ = await loop.create_unix_connection(lambda f=lost: _Idle(f), path)
            except OSError:
                stats["connect_errors"] += 1
                await asyncio.sleep(0.05)
                continue
            stats["opened"] += 1
            stats["open"] += 1
            stats["max_open"] = max(stats["max_open"], stats["open"])
            if not ready_sent and stats["open"] >= k:
                ready_sent = True
                conn.send("ready")
            began = time.monotonic()
            await asyncio.wait({lost}, timeout=max(0.0, t_stop - began))
            stats["open"] -= 1
            if lost.done():
                stats["closed_by_server"] += 1
            transport.close()
            if time.monotonic() - began < 0.1:
                await asyncio.sleep(0.05)  # the server sheds at once: do not spin

    await asyncio.gather(*(keep_one() for _ in range(k)))
    return stats


def _holder(path: str, k: int, t_stop: float, conn: multiprocessing.connection.Connection) -> None:
    install_uvloop()
    stats = asyncio.run(_hold(path, k, t_stop, conn))
    conn.send(stats)
    conn.close()


def idle_connections_point(k: int, server: servers.Server, args: argparse.Namespace) -> dict:
    """RSS and real-question latency while ``k`` idle connections are held open."""
    point: dict = {"idle_connections": k}
    holder = None
    parent = None
    if k:
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        t_stop = time.monotonic() + args.idle_seconds + 5.0
        holder = ctx.Process(target=_holder, args=(server.socket, k, t_stop, child))
        holder.start()
        child.close()
        point["all_open"] = bool(parent.poll(10.0)) and parent.recv() == "ready"
    time.sleep(0.3)  # below the 1 s deadline: the held connections are all still open
    point["rss_kib_held"] = server.memory_kib()
    requests = touch_requests(1000, 5000, args.seed)
    res = run_load(
        server.socket,
        requests,
        concurrency=1,
        duration=args.idle_seconds,
        warmup=0.0,
        target="policyd",
    )
    point["real_questions"] = {
        k: res.to_dict()[k]
        for k in ("questions", "qps", "p50_us", "p99_us", "p999_us", "answers", "errors")
    }
    point["rss_kib_after"] = server.memory_kib()
    if holder is not None and parent is not None:
        if parent.poll(15.0):
            point["holder"] = parent.recv()
        holder.join(timeout=10)
        if holder.is_alive():
            holder.kill()
            holder.join()
    return point


#: Issue 18: the daemon's peak RSS with 1,000,000 stored triplets.
RSS_1M = stats.Target("peak RSS (VmHWM) at 1,000,000 stored triplets", 48.0, True, " MiB")


def judge_targets(report: dict) -> list[dict[str, object]]:
    """The RSS target: one measurement, so its interval is the point itself."""
    point = next((p for p in report["store_size"] if p["triplets"] == 1_000_000), None)
    if point is None:
        return [RSS_1M.judge(None)]
    mib = point["rss_kib_after"]["VmHWM"] / 1024
    return [RSS_1M.judge(stats.Estimate(mib, mib, mib, 1), spec=".1f")]


def summary_markdown(report: dict) -> str:
    lines = [
        f"# bench/memory.py — {report['meta']['date']}",
        "",
        *stats.targets_markdown(report.get("targets", []), "measured (one run)"),
        "",
        "| stored triplets | fill s | file MiB | RSS idle MiB | RSS after questions MiB "
        "| peak MiB | answers to stored triplets |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["store_size"]:
        pre = p.get("prefill", {})
        lines.append(
            f"| {p['triplets']:,} | {pre.get('fill_s', '-')} | {pre.get('file_mib', '-')} "
            f"| {p['rss_kib_idle']['VmRSS'] / 1024:.1f} | {p['rss_kib_after']['VmRSS'] / 1024:.1f} "
            f"| {p['rss_kib_after']['VmHWM'] / 1024:.1f} "
            f"| {p.get('touch', {}).get('answers', '-')} |"
        )
    lines += [
        "",
        f"Idle connections (max_connections = {report['meta']['max_connections']}, "
        f"deadline {report['meta']['deadline']}):",
        "",
        "| idle conns | RSS held MiB | peak MiB | real q p50 / p99 µs | real answers |",
        "|---|---|---|---|---|",
    ]
    for p in report["idle_connections"]:
        rq = p["real_questions"]
        lines.append(
            f"| {p['idle_connections']} | {p['rss_kib_held']['VmRSS'] / 1024:.1f} "
            f"| {p['rss_kib_after']['VmHWM'] / 1024:.1f} | {rq['p50_us']:.0f} / {rq['p99_us']:.0f} "
            f"| {rq['answers']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,100000,1000000", help="triplet counts")
    parser.add_argument("--huge", action="store_true", help="also 10M triplets (minutes)")
    parser.add_argument("--idle", default="0,100,1000", help="idle connection counts")
    parser.add_argument(
        "--max-connections", type=int, default=1024, help="[server] value (the daemon default)"
    )
    parser.add_argument("--deadline", default="1s", help="[server] deadline")
    parser.add_argument("--touch", type=int, default=50_000, help="distinct touch questions")
    parser.add_argument("--touch-seconds", type=float, default=8.0)
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.huge:
        sizes.append(10_000_000)
    name = "memory-10m" if args.huge else "memory"
    out = args.out or servers.BENCH_DIR / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report: dict = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "max_connections": args.max_connections,
            "deadline": args.deadline,
            "seed": args.seed,
        },
        "store_size": [],
        "idle_connections": [],
    }
    for n in sizes:
        print(f"store size {n:,}", file=sys.stderr)
        report["store_size"].append(store_size_point(n, args))
    workdir = Path(tempfile.mkdtemp(prefix="policyd-idle-"))
    server = None
    try:
        conf = servers.policyd_config(
            workdir, deadline=args.deadline, max_connections=args.max_connections
        )
        server = servers.start_policyd(workdir, conf)
        for k in [int(s) for s in args.idle.split(",") if s]:
            print(f"idle connections {k}", file=sys.stderr)
            report["idle_connections"].append(idle_connections_point(k, server, args))
            time.sleep(1.5)  # let the daemon shed the held connections before the next point
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                servers.stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    report["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    report["targets"] = judge_targets(report)
    servers.write_results(out, report, summary_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

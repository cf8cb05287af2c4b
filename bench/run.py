"""Benchmark driver: policyd against the floor and the peers, interleaved rounds, medians.

Starts the floor (bench/floor.py), the daemon (``python3 -m policyd``, SQLite store in a
temporary directory), with ``--redis`` (the default when ``redis-server`` is installed) a
second daemon ``policyd-redis`` on a private redis-server (Unix socket in the temporary
directory, no TCP, no persistence) and, with ``--peers`` (the default when they are
installed, or installable because we are root), greylistd and postgrey (bench/peers.py),
then for each concurrency runs rounds floor, policyd, policyd-redis, greylistd, postgrey,
postgrey-persistent, floor, … with the Exim-like client of bench/loadgen.py, and reports per
concurrency the medians of q/s and latency percentiles, every target's ratio to the floor,
policyd's ratio to each peer, CPU per question of each server (``/proc/PID/stat`` deltas
over the run, warm-up included; for policyd-redis also the redis-server's) and each server's
RSS. After each round of a target that keeps its state on disk (policyd on SQLite, postgrey)
the bench waits ``SETTLE_S`` and syncs, so the next target's round does not carry that
target's disk writeback; every round records the machine's writeback (``disk_written_kib``).

    python3 bench/run.py [--quick] [--out bench/results/NAME.json] [--profile [TARGET]]
                         [--no-peers] [--no-redis] [--workdir DIR] [--python PYTHON]

Writes NAME.json and NAME.md (the summary also printed to stdout). ``--quick`` takes well
under 3 minutes; ``--stand-in floor`` measures a second floor in place of policyd (to test
the harness, or to see the noise between two identical servers). The header names the
interpreter the servers ran on (``--python``) and the one the clients ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers
import servers
from loadgen import ENGINES, LoadResult, Requests, format_result, run_load
from workload import generate

MODES = {
    # concurrencies, rounds, measured seconds per run, warm-up seconds, workload size
    "quick": {"concurrency": [1, 16], "rounds": 5, "duration": 1.0, "warmup": 0.2, "size": 100_000},
    "full": {
        "concurrency": [1, 4, 16, 64],
        "rounds": 7,
        "duration": 3.0,
        "warmup": 0.3,
        "size": 400_000,
    },
}
_LINE_NO = re.compile(r":\d+\)$")
MEDIAN_KEYS = (
    "qps",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "cpu_us_per_q",
    "store_cpu_us_per_q",
    "disk_written_kib",
)
REDIS_TARGET = "policyd-redis"
#: After each round of a target that keeps its state on disk (policyd on SQLite, postgrey),
#: wait this long (more than policyd's 1 s WAL checkpoint interval), then sync(): its
#: deferred writes (the checkpoint, the kernel's writeback of its dirty pages, ~50 MB per
#: SQLite round at 16 askers) are done before the next target's round instead of inside it.
SETTLE_S = 1.5


def disk_written_kib() -> int:
    """Pages the kernel has written back to disk so far, machine-wide (/proc/vmstat
    ``nr_written``), in KiB."""
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "nr_written":
                return int(value) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    return 0


def measure(
    server: servers.Server,
    requests: Requests,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    engine: str,
    start_index: int,
    target: str = "",
    terminator: bytes | None = None,
    persistent: bool = False,
    store: servers.Server | None = None,
) -> tuple[dict[str, object], LoadResult]:
    """One run against one server: the client's figures plus the server's CPU and memory
    (and the CPU of its ``store`` server, a redis-server, when it has one)."""
    store0 = store.cpu_seconds() if store else 0.0
    cpu0 = server.cpu_seconds()
    written0 = disk_written_kib()
    res = run_load(
        server.socket,
        requests,
        concurrency=concurrency,
        duration=duration,
        warmup=warmup,
        engine=engine,
        start_index=start_index,
        target=target or server.name,
        terminator=terminator,
        persistent=persistent,
    )
    cpu = server.cpu_seconds() - cpu0
    row = res.to_dict()
    # Whoever caused it: writeback in another target's round is that round's noise.
    row["disk_written_kib"] = disk_written_kib() - written0
    row["cpu_s"] = round(cpu, 3)
    # The CPU delta covers warm-up too, so divide by every question sent.
    row["cpu_us_per_q"] = round(cpu / res.issued * 1e6, 1) if res.issued else None
    row["memory_kib"] = server.memory_kib()
    if store is not None:
        store_cpu = store.cpu_seconds() - store0
        row["store_cpu_s"] = round(store_cpu, 3)
        row["store_cpu_us_per_q"] = round(store_cpu / res.issued * 1e6, 1) if res.issued else None
        row["store_memory_kib"] = store.memory_kib()
    return row, res


def medians(rows: list[dict[str, object]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in MEDIAN_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None]  # type: ignore[arg-type]
        out[key] = round(statistics.median(values), 1) if values else None
    return out


def totals(rows: list[dict[str, object]], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        for k, v in r[key].items():  # type: ignore[attr-defined]
            out[k] = out.get(k, 0) + v
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def filesystem_of(path: Path) -> str:
    """The type of the file system holding ``path`` (``ext4``, ``tmpfs``…), from the
    longest matching mount point in /proc/mounts; ``?`` when unknown."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=servers.REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def profile(
    server: servers.Server,
    requests: Requests,
    out_base: Path,
    seconds: float,
    *,
    start_index: int = 0,
) -> dict:
    """Sample the daemon with py-spy under c=16 load; keep the collapsed stacks, return the
    functions with the most samples (self time, and total time)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    suffix = ".pyspy.txt" if server.name == "policyd" else f".{server.name}.pyspy.txt"
    raw = out_base.with_suffix(suffix)
    cmd = [spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds) + 1)]
    cmd += ["--rate", "500", "--format", "raw", "--output", str(raw), "--nonblocking"]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    run_load(
        server.socket,
        requests,
        concurrency=16,
        duration=seconds,
        warmup=0.0,
        start_index=start_index,
    )
    _, err = spy_proc.communicate(timeout=60)
    if not raw.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    self_samples: dict[str, int] = {}
    total_samples: dict[str, int] = {}
    grand = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        grand += n
        # py-spy names a frame "function (file:line)"; group the lines of one function.
        frames = [_LINE_NO.sub(")", f) for f in stack.split(";")]
        leaf = frames[-1]
        self_samples[leaf] = self_samples.get(leaf, 0) + n
        for frame in set(frames):
            total_samples[frame] = total_samples.get(frame, 0) + n

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:25]
        return [(name, round(100 * n / grand, 1)) for name, n in ranked]

    return {
        "target": server.name,
        "samples": grand,
        "raw": str(raw),
        "self_pct": top(self_samples),
        "total_pct": top(total_samples),
    }


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _row_md(name: str, m: dict, to_floor: dict | None) -> str:
    ratio = "—" if to_floor is None else _fmt(to_floor["qps"], ".2f")
    return (
        f"| {name} | {_fmt(m['qps'], ',.0f')} | {ratio} "
        f"| {_fmt(m['p50_us'])} / {_fmt(m['p99_us'])} / {_fmt(m['p999_us'])} "
        f"| {_fmt(m['cpu_us_per_q'], '.1f')} |"
    )


def _interpreters(meta: dict) -> str:
    """Which Python ran the servers and the clients (older results name only one)."""
    server, client = meta.get("server_python"), meta.get("client_python")
    if server is None or client is None:
        return f"Python {meta['python']}"
    if server == client:
        return f"servers and clients on Python {servers.describe(server)}"
    return (
        f"servers on Python {servers.describe(server)}, clients on Python "
        f"{servers.describe(client)}"
    )


def summary_markdown(report: dict) -> str:
    meta = report["meta"]
    b = meta["target_b"]
    lines = [
        f"# bench/run.py — {meta['mode']} mode, {meta['date']}",
        "",
        f"git {meta['git']}, {meta['cpus']} CPUs; {_interpreters(meta)}; client engine "
        f"`{meta['engine']}`, {meta['rounds']} interleaved rounds × {meta['duration_s']} s "
        f"(order: {', '.join(meta['targets'])}), medians over rounds; work directory on "
        f"{meta.get('workdir_fs', '?')}. "
        "CPU/q = server CPU per question (µs). Connection per question unless labelled "
        "persistent.",
        "",
    ]
    for c, entry in report["results"].items():
        lines += [
            f"## {c} asker{'s' if c != '1' else ''}",
            "",
            "| target | q/s | ÷ floor | p50 / p99 / p99.9 µs | CPU/q µs |",
            "|---|---|---|---|---|",
        ]
        for name in meta["targets"]:
            if name not in entry:
                continue
            to_floor = None if name == "floor" else entry["to_floor"].get(name)
            lines.append(_row_md(name, entry[name]["median"], to_floor))
        written = [
            f"{name} {entry[name]['median']['disk_written_kib']:,.0f}"
            for name in meta["targets"]
            if entry.get(name, {}).get("median", {}).get("disk_written_kib") is not None
        ]
        if written:  # older results have no such figure
            lines += [
                "",
                "Disk writeback during the rounds (machine-wide, median KiB per round): "
                + ", ".join(written)
                + ".",
            ]
        if entry.get("vs_peers"):
            lines += [
                "",
                f"{b} ÷ peer: q/s (ratio of medians; median of paired rounds), "
                "p50, p99, CPU/q (lower is better for the last three)",
                "",
                "| peer | q/s | q/s paired | p50 | p99 | CPU/q |",
                "|---|---|---|---|---|---|",
            ]
            for peer, r in entry["vs_peers"].items():
                lines.append(
                    f"| {peer} | {_fmt(r['qps'], '.2f')} | {_fmt(r['qps_paired_median'], '.2f')} "
                    f"| {_fmt(r['p50'], '.2f')} | {_fmt(r['p99'], '.2f')} "
                    f"| {_fmt(r['cpu_per_q'], '.2f')} |"
                )
        lines.append("")
    mem = report["memory_kib"]
    lines += [
        f"{b} RSS at the end: {mem.get('VmRSS', 0) / 1024:.1f} MiB "
        f"(peak {mem.get('VmHWM', 0) / 1024:.1f} MiB, {mem.get('Threads', '?')} threads).",
        f"{b} answers: {report['answers']}; errors: {report['errors'] or 'none'}.",
    ]
    lines += _redis_md(report)
    pinfo = report.get("peers") or {}
    if pinfo:
        lines += ["", "Peers:", ""]
        for name, info in pinfo.items():
            if info.get("status") == "measured":
                rss = info.get("memory_kib", {}).get("VmRSS", 0) / 1024
                lines.append(
                    f"- {name} {info.get('version')}: measured; RSS {rss:.1f} MiB; "
                    f"answers {info.get('answers')}; errors {info.get('errors') or 'none'}"
                )
            else:
                lines.append(f"- {name}: **{info.get('note')}**")
    prof = report.get("profile")
    if prof and "self_pct" in prof:
        who = prof.get("target", b)
        lines += ["", f"py-spy of {who}, {prof['samples']} samples at c=16, most self time:", ""]
        lines += [f"- {pct}% {name}" for name, pct in prof["self_pct"][:12]]
    return "\n".join(lines) + "\n"


def _redis_md(report: dict) -> list[str]:
    """The policyd-redis lines: RSS of the daemon, the redis-server's CPU/q and RSS."""
    info = report.get("redis") or {}
    if info.get("status") != "measured":
        return ["", f"{REDIS_TARGET}: **{info.get('note', 'not measured')}**"] if info else []
    mem = info.get("memory_kib", {})
    rmem = info.get("redis_server_memory_kib", {})
    per_c = ", ".join(
        f"c={c} {_fmt(entry[REDIS_TARGET]['median'].get('store_cpu_us_per_q'), '.1f')} µs"
        for c, entry in report["results"].items()
        if REDIS_TARGET in entry
    )
    return [
        "",
        f"{REDIS_TARGET} (redis-server {info.get('version')}, Unix socket, no persistence): "
        f"daemon RSS at the end {mem.get('VmRSS', 0) / 1024:.1f} MiB "
        f"(peak {mem.get('VmHWM', 0) / 1024:.1f} MiB); redis-server CPU/q (not in the "
        f"table's CPU/q) {per_c}; redis-server RSS {rmem.get('VmRSS', 0) / 1024:.1f} MiB.",
        f"{REDIS_TARGET} answers: {info.get('answers')}; errors: {info.get('errors') or 'none'}.",
    ]


def compare(a: dict[str, float | None], b: dict[str, float | None], paired: list[float]) -> dict:
    """Ratios of ``a``'s medians to ``b``'s (q/s: a÷b, higher is better for a)."""
    return {
        "qps": _ratio(a["qps"], b["qps"]),
        "qps_paired_median": round(statistics.median(paired), 3) if paired else None,
        "p50": _ratio(a["p50_us"], b["p50_us"]),
        "p99": _ratio(a["p99_us"], b["p99_us"]),
        "cpu_per_q": _ratio(a["cpu_us_per_q"], b["cpu_us_per_q"]),
    }


def _paired(rows_a: list[dict], rows_b: list[dict]) -> list[float]:
    return [
        float(x["qps"]) / float(y["qps"])
        for x, y in zip(rows_a, rows_b, strict=True)
        if x["qps"] and y["qps"]
    ]


class Target:
    """One thing measured: a server, the questions in its protocol, how they are framed."""

    def __init__(
        self,
        name: str,
        server: servers.Server,
        requests: Requests,
        *,
        terminator: bytes | None = None,
        persistent: bool = False,
        store: servers.Server | None = None,
        settle: bool = False,
    ) -> None:
        self.name = name
        self.server = server
        self.requests = requests
        self.terminator = terminator
        self.persistent = persistent
        #: A server the target needs whose CPU is counted apart (policyd-redis: Redis).
        self.store = store
        #: Keeps its state on disk: let its writes settle after each round (``SETTLE_S``).
        self.settle = settle
        self.index = 0


def start_redis_target(
    workdir: Path, requests: Requests, log_level: str | None, info: dict
) -> tuple[Target | None, list[servers.Server]]:
    """A private redis-server and a daemon using it (same config as ``policyd`` but the
    store URL); on failure a note in ``info`` and nothing started."""
    if shutil.which(servers.REDIS_SERVER) is None:
        info.update(status="skipped", note=f"skipped: {servers.REDIS_SERVER} not found")
        print(f"{REDIS_TARGET}: {info['note']}", file=sys.stderr)
        return None, []
    started: list[servers.Server] = []
    try:
        redis_srv = servers.start_redis(workdir)
        started.append(redis_srv)
        conf = servers.policyd_config(
            workdir, log_level=log_level, store_url=f"unix://{redis_srv.socket}", name=REDIS_TARGET
        )
        started.append(servers.start_policyd(workdir, conf, name=REDIS_TARGET))
    except (RuntimeError, OSError) as exc:
        for srv in reversed(started):
            servers.stop(srv)
        info.update(status="skipped", note=f"failed to start: {str(exc)[-300:]}: skipped")
        print(f"{REDIS_TARGET}: {info['note']}", file=sys.stderr)
        return None, []
    info.update(status="measured", version=redis_srv.extra.get("version"))
    return Target(REDIS_TARGET, started[1], requests, store=redis_srv), started


def start_peers(
    workdir: Path, requests: Requests, wanted: list[str], report_peers: dict
) -> tuple[list[Target], list[servers.Server]]:
    notes = peers.ensure_installed(wanted)
    targets: list[Target] = []
    started: list[servers.Server] = []
    for name in wanted:
        if name in notes:
            report_peers[name] = {"status": "skipped", "note": notes[name]}
            print(f"peers: {name}: {notes[name]}", file=sys.stderr)
            continue
        try:
            if name == "greylistd":
                srv = peers.start_greylistd(workdir)
            else:
                srv = peers.start_postgrey(workdir)
        except (RuntimeError, OSError) as exc:
            note = f"failed to start: {str(exc)[-300:]}: skipped"
            report_peers[name] = {"status": "skipped", "note": note}
            print(f"peers: {name}: {note}", file=sys.stderr)
            continue
        started.append(srv)
        t0 = time.monotonic()
        reqs = peers.translate(requests, name)  # type: ignore[arg-type]
        print(f"peers: {name} questions in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        report_peers[name] = {"status": "measured", "version": srv.extra.get("version")}
        if name == "greylistd":
            targets.append(Target(name, srv, reqs))
        else:
            term = peers.POSTFIX_TERMINATOR
            targets.append(Target(name, srv, reqs, terminator=term, settle=True))
            targets.append(
                Target(
                    f"{name}-persistent", srv, reqs, terminator=term, persistent=True, settle=True
                )
            )
            report_peers[f"{name}-persistent"] = {
                "status": "measured",
                "version": srv.extra.get("version"),
                "note": "same postgrey process, one connection per asker kept open (Postfix)",
            }
    return targets, started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="c=1,16, 5 short rounds (< 3 min)")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/run-…)")
    parser.add_argument("--engine", choices=ENGINES, default="blocking", help="load client")
    parser.add_argument("--rounds", type=int, help="override the mode's rounds")
    parser.add_argument("--duration", type=float, help="override seconds measured per run")
    parser.add_argument("--concurrency", type=str, help="override, e.g. 1,16")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--stand-in",
        choices=["policyd", "floor"],
        default="policyd",
        help="what runs as target B (floor: test the harness)",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure greylistd and postgrey (installed with apt-get when root and "
        "absent; a missing peer is skipped with a note). Default: on",
    )
    parser.add_argument(
        "--peer-list", default=",".join(peers.PEERS), help="which peers (default: all)"
    )
    parser.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also measure {REDIS_TARGET}: the daemon on a private redis-server (Unix "
        "socket in the temporary directory, no TCP, no persistence); skipped with a note "
        "when redis-server is not installed. Default: on",
    )
    parser.add_argument("--log-level", help="override policyd's [server] log_level")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="policyd",
        choices=["policyd", REDIS_TARGET],
        help=f"py-spy a daemon at c=16 (default policyd; or {REDIS_TARGET})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where the run's temporary directory goes (sockets, the SQLite file, logs); "
        "default the system's. On tmpfs (/dev/shm) the SQLite target's dirty pages are "
        "never written back to a disk, so that writeback cannot land in other targets' "
        "rounds (docs/performance.md)",
    )
    parser.add_argument(
        "--python",
        help="the interpreter the floor and the policyd daemons run on (it needs policyd's "
        "dependencies); default this one. The clients always run on this one. Measure with "
        'the interpreter you deploy with (bench/README.md, "Which Python")',
    )
    args = parser.parse_args(argv)
    if args.python:
        servers.SERVER_PYTHON = args.python
    server_python = servers.interpreter(servers.SERVER_PYTHON)
    client_python = servers.interpreter(sys.executable)
    print(f"servers on Python {servers.describe(server_python)}", file=sys.stderr)

    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.duration:
        cfg["duration"] = args.duration
    if args.concurrency:
        cfg["concurrency"] = [int(c) for c in args.concurrency.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or servers.BENCH_DIR / "results" / f"run-{mode}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    wl = generate(cfg["size"], args.seed)
    requests = wl.packed()
    print(
        f"workload: {len(wl)} questions {wl.counts()} in {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
    )
    del wl

    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-", dir=args.workdir))
    started: list[servers.Server] = []
    b: servers.Server | None = None
    report: dict = {}
    report_peers: dict = {}
    report_redis: dict = {}
    try:
        floor = servers.start_floor(workdir)
        started.append(floor)
        if args.stand_in == "floor":
            b = servers.start_floor(workdir, name="floor2")
        else:
            conf = servers.policyd_config(workdir, log_level=args.log_level)
            b = servers.start_policyd(workdir, conf)
        started.append(b)
        name_b = "policyd" if args.stand_in == "policyd" else "floor2"
        targets = [
            Target("floor", floor, requests),
            Target(name_b, b, requests, settle=name_b == "policyd"),
        ]
        if args.redis:
            redis_target, redis_servers = start_redis_target(
                workdir, requests, args.log_level, report_redis
            )
            started += redis_servers
            if redis_target is not None:
                targets.append(redis_target)
        else:
            report_redis = {"status": "skipped", "note": "--no-redis: not measured"}
        if args.peers:
            wanted = [p.strip() for p in args.peer_list.split(",") if p.strip()]
            peer_targets, peer_servers = start_peers(workdir, requests, wanted, report_peers)
            targets += peer_targets
            started += peer_servers
        else:
            report_peers = {
                p: {"status": "skipped", "note": "--no-peers: not measured"} for p in peers.PEERS
            }
        results: dict[str, dict] = {}
        all_rows: dict[str, list[dict[str, object]]] = {t.name: [] for t in targets}
        for c in cfg["concurrency"]:
            rows: dict[str, list[dict[str, object]]] = {t.name: [] for t in targets}
            for r in range(cfg["rounds"]):
                for t in targets:
                    row, res = measure(
                        t.server,
                        t.requests,
                        concurrency=c,
                        duration=cfg["duration"],
                        warmup=cfg["warmup"],
                        engine=args.engine,
                        start_index=t.index,
                        target=t.name,
                        terminator=t.terminator,
                        persistent=t.persistent,
                        store=t.store,
                    )
                    t.index = res.next_index
                    if t.settle:
                        time.sleep(SETTLE_S)
                        os.sync()
                    row["round"] = r
                    rows[t.name].append(row)
                    print(
                        f"  round {r}: {format_result(res)} cpu/q={row['cpu_us_per_q']}µs",
                        file=sys.stderr,
                    )
                    for srv in (t.server, t.store):
                        if srv is not None and not srv.alive():
                            raise RuntimeError(f"{srv.name} died:\n{srv.log_tail()}")
            med = {name: medians(rs) for name, rs in rows.items()}
            entry: dict = {name: {"median": med[name], "rounds": rs} for name, rs in rows.items()}
            entry["to_floor"] = {
                name: compare(med[name], med["floor"], _paired(rows[name], rows["floor"]))
                for name in rows
                if name != "floor"
            }
            entry["ratio"] = entry["to_floor"][name_b]  # policyd ÷ floor (older readers)
            entry["vs_peers"] = {
                name: compare(med[name_b], med[name], _paired(rows[name_b], rows[name]))
                for name in rows
                if name not in ("floor", name_b, REDIS_TARGET)
            }
            results[str(c)] = entry
            for name, rs in rows.items():
                all_rows[name] += rs
        for t in targets:
            if t.name in report_peers and t.name in all_rows:
                info = report_peers[t.name]
                info["memory_kib"] = t.server.memory_kib()
                info["answers"] = totals(all_rows[t.name], "answers")
                info["errors"] = totals(all_rows[t.name], "error_kinds")
            if t.name == REDIS_TARGET and t.store is not None:
                report_redis["memory_kib"] = t.server.memory_kib()
                report_redis["redis_server_memory_kib"] = t.store.memory_kib()
                report_redis["answers"] = totals(all_rows[t.name], "answers")
                report_redis["errors"] = totals(all_rows[t.name], "error_kinds")
        report = {
            "meta": {
                "mode": mode,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "git": git_revision(),
                "python": platform.python_version(),
                "server_python": server_python,
                "client_python": client_python,
                "cpus": os.cpu_count(),
                "engine": args.engine,
                "rounds": cfg["rounds"],
                "duration_s": cfg["duration"],
                "warmup_s": cfg["warmup"],
                "workload_size": len(requests),
                "seed": args.seed,
                "target_b": name_b,
                "targets": [t.name for t in targets],
                "log_level": args.log_level or "default",
                "workdir_fs": filesystem_of(workdir),
                "elapsed_s": None,
            },
            "results": results,
            "memory_kib": b.memory_kib(),
            "answers": totals(all_rows[name_b], "answers"),
            "errors": totals(all_rows[name_b], "error_kinds"),
            "peers": report_peers,
            "redis": report_redis,
        }
        if args.profile:
            wanted_name = name_b if args.profile == "policyd" else args.profile
            prof = next((t for t in targets if t.name == wanted_name), None)
            if prof is None:
                report["profile"] = {"error": f"{args.profile} not running"}
            else:
                seconds = cfg["duration"] * 3
                report["profile"] = profile(
                    prof.server, prof.requests, out, seconds, start_index=prof.index
                )
    finally:
        for server in reversed(started):
            code = servers.stop(server)
            if report and server is b:
                report["meta"]["exit_code_b"] = code
            elif report_redis.get("status") == "measured" and server.name == REDIS_TARGET:
                report_redis["exit_code"] = code
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=sys.stderr)
    report["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    servers.write_results(out, report, summary_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

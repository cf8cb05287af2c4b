"""Benchmark driver: policyd against the floor and the peers, interleaved rounds, medians.

Starts the floor (bench/floor.py), the daemon (``python3 -m policyd``, SQLite store in a
temporary directory) and, with ``--peers`` (the default when they are installed, or
installable because we are root), greylistd and postgrey (bench/peers.py), then for each
concurrency runs rounds floor, policyd, greylistd, postgrey, postgrey-persistent, floor, …
with the Exim-like client of bench/loadgen.py, and reports per concurrency the medians of
q/s and latency percentiles, every target's ratio to the floor, policyd's ratio to each peer,
CPU per question of each server (``/proc/PID/stat`` deltas over the run, warm-up included)
and each server's RSS.

    python3 bench/run.py [--quick] [--out bench/results/NAME.json] [--profile] [--no-peers]

Writes NAME.json and NAME.md (the summary also printed to stdout). ``--quick`` takes well
under 3 minutes; ``--stand-in floor`` measures a second floor in place of policyd (to test
the harness, or to see the noise between two identical servers).
"""

from __future__ import annotations

import argparse
import json
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
MEDIAN_KEYS = ("qps", "p50_us", "p90_us", "p99_us", "p999_us", "cpu_us_per_q")


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
) -> tuple[dict[str, object], LoadResult]:
    """One run against one server: the client's figures plus the server's CPU and memory."""
    cpu0 = server.cpu_seconds()
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
    row["cpu_s"] = round(cpu, 3)
    # The CPU delta covers warm-up too, so divide by every question sent.
    row["cpu_us_per_q"] = round(cpu / res.issued * 1e6, 1) if res.issued else None
    row["memory_kib"] = server.memory_kib()
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


def profile(server: servers.Server, requests: Requests, out_base: Path, seconds: float) -> dict:
    """Sample the daemon with py-spy under c=16 load; keep the collapsed stacks, return the
    functions with the most samples (self time, and total time)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    raw = out_base.with_suffix(".pyspy.txt")
    cmd = [spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds) + 1)]
    cmd += ["--rate", "500", "--format", "raw", "--output", str(raw), "--nonblocking"]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    run_load(server.socket, requests, concurrency=16, duration=seconds, warmup=0.0)
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


def summary_markdown(report: dict) -> str:
    meta = report["meta"]
    b = meta["target_b"]
    lines = [
        f"# bench/run.py — {meta['mode']} mode, {meta['date']}",
        "",
        f"git {meta['git']}, Python {meta['python']}, {meta['cpus']} CPUs, client engine "
        f"`{meta['engine']}`, {meta['rounds']} interleaved rounds × {meta['duration_s']} s "
        f"(order: {', '.join(meta['targets'])}), medians over rounds. "
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
        lines += ["", f"py-spy, {prof['samples']} samples at c=16, most self time:", ""]
        lines += [f"- {pct}% {name}" for name, pct in prof["self_pct"][:12]]
    return "\n".join(lines) + "\n"


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
    ) -> None:
        self.name = name
        self.server = server
        self.requests = requests
        self.terminator = terminator
        self.persistent = persistent
        self.index = 0


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
            targets.append(Target(name, srv, reqs, terminator=term))
            targets.append(
                Target(f"{name}-persistent", srv, reqs, terminator=term, persistent=True)
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
    parser.add_argument("--log-level", help="override policyd's [server] log_level")
    parser.add_argument("--profile", action="store_true", help="py-spy the daemon at c=16")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

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

    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
    started: list[servers.Server] = []
    b: servers.Server | None = None
    report: dict = {}
    report_peers: dict = {}
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
        targets = [Target("floor", floor, requests), Target(name_b, b, requests)]
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
                    )
                    t.index = res.next_index
                    row["round"] = r
                    rows[t.name].append(row)
                    print(
                        f"  round {r}: {format_result(res)} cpu/q={row['cpu_us_per_q']}µs",
                        file=sys.stderr,
                    )
                    if not t.server.alive():
                        raise RuntimeError(f"{t.name} died:\n{t.server.log_tail()}")
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
                if name not in ("floor", name_b)
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
        report = {
            "meta": {
                "mode": mode,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "git": git_revision(),
                "python": platform.python_version(),
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
                "elapsed_s": None,
            },
            "results": results,
            "memory_kib": b.memory_kib(),
            "answers": totals(all_rows[name_b], "answers"),
            "errors": totals(all_rows[name_b], "error_kinds"),
            "peers": report_peers,
        }
        if args.profile:
            report["profile"] = profile(b, requests, out, cfg["duration"] * 3)
    finally:
        for server in started:
            code = servers.stop(server)
            if report and server is b:
                report["meta"]["exit_code_b"] = code
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=sys.stderr)
    report["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    out.write_text(json.dumps(report, indent=1) + "\n")
    md = summary_markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Milliseconds per message through a real Exim: policyd, the floor behind our fragments,
greylistd with its Debian fragment, and no check, in paired rounds.

Four loopback Exim daemons deliver to one sink (bench/exim_lab.py has the lab and the
configurations: ``policyd``, ``floor``, ``nocheck``, ``greylistd``). Senders (``--senders``
threads, smtplib; bench/exim_send.py) send batches of messages with k recipients; the
phases:

1. set-up: lab, sink, policy servers, Exim daemons; one unmeasured warm-up batch each;
2. greylisting rounds: every configuration sends a batch of new messages; a deferred
   message is retried 1.2 s after the first 451 (then every 0.5 s) until accepted;
3. steady-state rounds (``--steady-rounds``, many): every configuration sends its last
   greylisting batch again; the triplets are known, nothing is deferred, every recipient
   and the DATA are still asked. The order of the configurations rotates per round;
4. analysis (bench/exim_report.py): per round, what each configuration adds over no check
   (SMTP ms and CPU ms per message), paired by round, medians with 95 % bootstrap intervals
   (bench/stats.py); the targets policyd − greylistd ≤ 1 ms and floor − greylistd ≤ 0.5 ms
   with a verdict each; then ``bench/results/exim-MODE.json`` and ``.md`` (overwritten).

    python3 bench/exim_msg.py [--quick] [--steady-rounds N] [--out FILE.json]

Needs root, /usr/sbin/exim4 (exim4-daemon-heavy), aiosmtpd; greylistd optional (installed
when root and absent; skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import exim_lab
import exim_report
import peers
import servers
from exim_lab import Exim, Sink
from exim_send import (
    FIRST_RETRY_S,
    CpuProbe,
    Message,
    become_subreaper,
    new_messages,
    run_batch,
    send_batch,
)
from lineup import git_revision


@dataclass
class Plan:
    """What a run does: a mode's settings with the command line's overrides."""

    mode: str
    greylist_rounds: int
    steady_rounds: int
    messages: int  # per batch
    rcpts: int  # per message
    senders: int  # concurrent SMTP clients
    out: Path = Path()


MODES = {
    "quick": Plan("quick", greylist_rounds=2, steady_rounds=16, messages=24, rcpts=3, senders=4),
    "full": Plan("full", greylist_rounds=4, steady_rounds=40, messages=40, rcpts=3, senders=4),
}


@dataclass
class Lab:
    """What a run started."""

    configs: list[str]
    dir: Path
    sink: Sink = field(default_factory=Sink)
    controller: Any = None
    policy: dict[str, servers.Server] = field(default_factory=dict)
    exims: dict[str, Exim] = field(default_factory=dict)
    probes: dict[str, CpuProbe] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    subreaper: bool = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="16 steady-state rounds of 24 messages (~1.5 min)")
    add("--out", type=Path, help="JSON output (default bench/results/exim-MODE.json)")
    add("--greylist-rounds", type=int, help="rounds of new messages (greylisted)")
    add("--steady-rounds", type=int, help="rounds of known messages (the targets' rounds)")
    add("--messages", type=int, help="messages per batch")
    add("--rcpts", type=int, help="recipients per message")
    add("--senders", type=int, help="concurrent SMTP senders")
    add("--keep", action="store_true", help="keep the lab directory")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    mode = "quick" if args.quick else "full"
    keys = ("greylist_rounds", "steady_rounds", "messages", "rcpts", "senders")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k)}
    out = args.out or servers.BENCH_DIR / "results" / f"exim-{mode}.json"
    return dataclasses.replace(MODES[mode], **overrides, out=out)


# --------------------------------------------------------------------------------------------
# Phase 1: set-up


def set_up(lab: Lab, plan: Plan) -> None:
    """Sink, policy servers, one Exim per configuration, a warm-up batch each."""
    from aiosmtpd.controller import Controller

    lab.subreaper = become_subreaper()
    lab.controller = Controller(lab.sink, hostname="127.0.0.1", port=exim_lab.free_port())
    lab.controller.start()
    lab.policy, failed = exim_lab.start_policy_servers(lab.dir, lab.configs)
    lab.skipped.update(failed)
    lab.configs = [k for k in lab.configs if k not in failed]
    for kind in lab.configs:
        macros = exim_lab.macros_for(kind, lab.controller.port, lab.policy)
        lab.exims[kind] = exim_lab.start_exim(lab.dir, kind, macros)
    known = {s.pid for s in lab.policy.values()} | {e.process.pid for e in lab.exims.values()}
    lab.probes = {
        k: CpuProbe(lab.exims[k].process.pid, lab.policy.get(k), known) for k in lab.configs
    }
    # Unmeasured: the first sessions of a daemon are slow (loading, caches).
    for kind in lab.configs:
        warm = new_messages(kind, 99, plan.senders, 1)
        send_batch(lab.exims[kind].port, warm, plan.senders)
        send_batch(lab.exims[kind].port, warm, plan.senders)


# --------------------------------------------------------------------------------------------
# Phase 2 and 3: rounds


def one_round(
    lab: Lab, plan: Plan, phase: str, rnd: int, batches: dict[str, list[Message]]
) -> dict[str, dict[str, object]]:
    """Every configuration's batch once, in an order rotated by ``rnd``."""
    k = rnd % len(lab.configs)
    rows = {}
    for kind in lab.configs[k:] + lab.configs[:k]:
        row = run_batch(lab.exims[kind], lab.sink, batches[kind], plan.senders, lab.probes[kind])
        row["round"] = rnd
        rows[kind] = row
        print(
            f"  {phase:8} round {rnd:2} {kind:9}: smtp {row['smtp_ms_p50']} ms, "
            f"delivered {row['deliver_ms_p50']} ms, attempts {row['attempts_mean']}, "
            f"cpu {row['cpu_ms_per_msg']} ms/msg, errors {row['n_errors']}",
            file=sys.stderr,
        )
        for server in lab.policy.values():
            if not server.alive():
                raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
    return rows


def run_rounds(lab: Lab, plan: Plan) -> dict[str, dict[str, exim_report.Rows]]:
    """Greylisting rounds (new messages each), then steady-state rounds (the last
    greylisting batch again): ``rows[phase][config]``."""
    rows: dict[str, dict[str, exim_report.Rows]] = {
        phase: {k: [] for k in lab.configs} for phase in ("greylist", "steady")
    }
    batches: dict[str, list[Message]] = {}
    for rnd in range(plan.greylist_rounds):
        batches = {k: new_messages(k, rnd, plan.messages, plan.rcpts) for k in lab.configs}
        for kind, row in one_round(lab, plan, "greylist", rnd, batches).items():
            rows["greylist"][kind].append(row)
    for rnd in range(plan.steady_rounds):
        for kind, row in one_round(lab, plan, "steady", rnd, batches).items():
            rows["steady"][kind].append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Phase 4: analysis and report


def analyse(lab: Lab, plan: Plan, rows: dict[str, dict[str, exim_report.Rows]]) -> dict:
    results = {phase: exim_report.analyse_phase(per) for phase, per in rows.items()}
    errors = [r["errors"] for per in rows.values() for rs in per.values() for r in rs]
    report = {
        "meta": {
            "mode": plan.mode,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "git": git_revision(),
            "python": platform.python_version(),
            "exim_version": exim_lab.exim_version(),
            "greylistd_version": peers.version("greylistd"),
            "cpus": os.cpu_count(),
            "configs": lab.configs,
            **{k: v for k, v in dataclasses.asdict(plan).items() if k not in ("mode", "out")},
            "greylist_delay_s": exim_lab.GREYLIST_DELAY_S,
            "first_retry_s": FIRST_RETRY_S,
            "cpu_includes_delivery_processes": lab.subreaper,
            "elapsed_s": None,
        },
        "targets": exim_report.judge_targets(rows["steady"]),
        "results": results,
        "headline": exim_report.headline(results["steady"]),
        "skipped": lab.skipped,
        "errors": [e for batch in errors for e in batch][:10],
        "fail_open": {k: exim_lab.fail_open_lines(lab.dir, k) for k in lab.configs},
        "policyd_memory_kib": lab.policy["policyd"].memory_kib(),
    }
    paniclogs = [p for p in lab.dir.glob("*/log/paniclog") if p.stat().st_size]
    if paniclogs:
        report["paniclog"] = paniclogs[0].read_text(errors="replace")[-2000:]
    return report


def tear_down(lab: Lab, keep: bool) -> None:
    """Stop what we started (Exim daemons, policy servers by PID; the sink)."""
    for ex in lab.exims.values():
        exim_lab.stop_process(ex.process)
    for server in lab.policy.values():
        servers.stop(server)
    if lab.controller is not None:
        lab.controller.stop()
    if keep:
        print(f"kept {lab.dir}", file=sys.stderr)
    else:
        shutil.rmtree(lab.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or not exim_lab.EXIM.exists():
        print("exim_msg.py needs root and /usr/sbin/exim4 (exim4-daemon-heavy)", file=sys.stderr)
        return 2
    plan = make_plan(args)
    t0 = time.monotonic()
    skipped = peers.ensure_installed(["greylistd"])
    configs = [k for k in exim_lab.CONFIGS if k not in skipped]
    lab = Lab(configs, exim_lab.make_lab(configs), skipped=skipped)
    try:
        set_up(lab, plan)
        report = analyse(lab, plan, run_rounds(lab, plan))
    finally:
        tear_down(lab, args.keep)
    report["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    servers.write_results(plan.out, report, exim_report.summary_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

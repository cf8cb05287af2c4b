"""What the questions add to each SMTP command through a real Exim: RCPT and end of DATA.

bench/exim_msg.py times whole messages from several concurrent senders; on a loaded host
its SMTP figures are tens of milliseconds wide. This bench isolates the commands our
fragments act on: the same four loopback Exim daemons (bench/exim_lab.py: ``policyd``,
``floor`` = our fragments asking bench/floor.py, ``nocheck``, ``greylistd``), one sender,
one session at a time, and the time from sending each command to its reply:

- ``rcpt``: each ``RCPT TO`` (the RCPT ACL, its question);
- ``data``: the message body's final dot to the ``250`` (the DATA ACL, its question if any);
- ``message``: EHLO to the end of DATA, summed (connect and banner excluded: the fork of
  Exim's receiving process, which no fragment touches).

Set-up: every configuration's messages (``--messages``, three recipients each, known
triplets after a greylisting pass) are sent once unmeasured. Then rounds: every
configuration sends its messages again, one session each, in an order rotated per round.
Per round and configuration the median over its sessions; the figures are medians over
rounds of the per-round differences to ``nocheck`` and to ``greylistd`` with a 95 %
bootstrap interval (bench/stats.py), and the issue's two targets on ``message``.

    python3 bench/exim_cmd.py [--rounds 40] [--messages 8]

Needs root, /usr/sbin/exim4, aiosmtpd, greylistd (installed when missing). Result:
bench/results/exim-cmd.json and .md (overwritten; earlier runs are in git history).
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import exim_lab
import peers
import servers
import stats
from exim_send import SMTP_TIMEOUT_S, Message, new_messages, send_batch

CONFIGS = ("policyd", "floor", "nocheck", "greylistd")
RCPTS = 3
FIGURES = ("rcpt", "data", "message")
TARGETS = (
    ("policyd", stats.Target("added ms per message, policyd − greylistd", 1.0, True, " ms")),
    (
        "floor",
        stats.Target(
            "added ms per message, floor behind our fragments − greylistd", 0.5, True, " ms"
        ),
    ),
)


def session(port: int, msg: Message, key: str) -> dict[str, list[float]]:
    """One timed session: ms per RCPT, for the end of DATA, and their sum with EHLO/MAIL."""
    clock = time.perf_counter
    s = smtplib.SMTP("127.0.0.1", port, timeout=SMTP_TIMEOUT_S)
    try:
        t0 = clock()
        s.ehlo("client.bench.example")
        s.mail(msg.sender)
        rcpt = []
        for to in msg.rcpts:
            t = clock()
            code, _ = s.rcpt(to)
            rcpt.append((clock() - t) * 1e3)
            if code != 250:
                raise RuntimeError(f"RCPT {to} refused: {code}")
        s.putcmd("data")
        code, _ = s.getreply()
        if code != 354:
            raise RuntimeError(f"DATA refused: {code}")
        s.send(msg.body(key).replace(b"\r\n.", b"\r\n..") + b".\r\n")
        t = clock()
        code, _ = s.getreply()
        data = (clock() - t) * 1e3
        if code != 250:
            raise RuntimeError(f"end of DATA refused: {code}")
        return {"rcpt": rcpt, "data": [data], "message": [(clock() - t0) * 1e3]}
    finally:
        try:
            if s.sock is not None:
                s.sock.sendall(b"QUIT\r\n")  # not waiting for the reply (bench/exim_send.py)
        except OSError:
            pass
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--messages", type=int, default=8, help="sessions per config per round")
    parser.add_argument("--out", type=Path, default=servers.BENCH_DIR / "results/exim-cmd.json")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not exim_lab.EXIM.exists():
        print("exim_cmd.py needs root and /usr/sbin/exim4", file=sys.stderr)
        return 2
    from aiosmtpd.controller import Controller

    configs = list(CONFIGS)
    notes = peers.ensure_installed(["greylistd"])
    if notes:
        print(f"greylistd: {notes['greylistd']}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    lab = exim_lab.make_lab(configs)
    controller = Controller(exim_lab.Sink(), hostname="127.0.0.1", port=exim_lab.free_port())
    controller.start()
    policy: dict[str, servers.Server] = {}
    exims: dict[str, exim_lab.Exim] = {}
    try:
        policy, failed = exim_lab.start_policy_servers(lab, configs)
        if failed:
            raise RuntimeError(f"policy servers failed: {failed}")
        for kind in configs:
            macros = exim_lab.macros_for(kind, controller.port, policy)
            exims[kind] = exim_lab.start_exim(lab, kind, macros)
        batches = {k: new_messages(k, 0, args.messages, RCPTS) for k in configs}
        for kind in configs:  # greylisting pass (retries until accepted), then warm
            send_batch(exims[kind].port, batches[kind], 4)
            send_batch(exims[kind].port, batches[kind], 4)
        rows: dict[str, dict[str, list[float]]] = {k: {f: [] for f in FIGURES} for k in configs}
        for rnd in range(args.rounds):
            k = rnd % len(configs)
            for kind in configs[k:] + configs[:k]:
                got: dict[str, list[float]] = {f: [] for f in FIGURES}
                for i, msg in enumerate(batches[kind]):
                    for fig, values in session(exims[kind].port, msg, f"{rnd}.{i}").items():
                        got[fig] += values
                for fig in FIGURES:
                    rows[kind][fig].append(statistics.median(got[fig]))
            print(f"  round {rnd + 1}/{args.rounds}", file=sys.stderr)
        load = os.getloadavg()
    finally:
        for ex in exims.values():
            exim_lab.stop_process(ex.process)
        for server in policy.values():
            servers.stop(server)
        controller.stop()
        shutil.rmtree(lab, ignore_errors=True)
    report = analyse(rows)
    report["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "exim_version": exim_lab.exim_version(),
        "rounds": args.rounds,
        "messages": args.messages,
        "rcpts": RCPTS,
        "loadavg_end": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - t_start, 1),
    }
    servers.write_results(args.out, report, markdown(report))
    return 0


def analyse(rows: dict[str, dict[str, list[float]]]) -> dict:
    out: dict[str, dict] = {}
    for kind, figs in rows.items():
        out[kind] = {}
        for fig, values in figs.items():
            out[kind][fig] = {
                "median_ms": stats.median(values),
                **{
                    f"vs_{base}": (
                        est.to_dict()
                        if (est := stats.paired_difference(values, rows[base][fig]))
                        else None
                    )
                    for base in ("nocheck", "greylistd")
                },
            }
    targets = [
        target.judge(stats.paired_difference(rows[kind]["message"], rows["greylistd"]["message"]))
        for kind, target in TARGETS
    ]
    return {"configs": out, "targets": targets, "rounds": rows}


def _est(row: dict | None) -> str:
    if not row:
        return "—"
    return f"{row['value']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# bench/exim_cmd.py — {meta['date']}",
        "",
        f"Exim {meta['exim_version']}; {meta['rounds']} rounds, each configuration "
        f"{meta['messages']} sessions per round (one at a time, {meta['rcpts']} recipients, "
        "known triplets), order rotated per round. Per round the median over the sessions; "
        "differences are medians of per-round (paired) differences, ms [95 % bootstrap "
        f"interval]. Load average at the end: {meta['loadavg_end']} on {meta['cpus']} CPUs.",
        "",
        *stats.targets_markdown(report["targets"]),
        "",
        "| config | figure | median ms | vs no check | vs greylistd |",
        "|---|---|---|---|---|",
    ]
    for kind, figs in report["configs"].items():
        for fig, row in figs.items():
            lines.append(
                f"| {kind} | {fig} | {row['median_ms']:.3f} | {_est(row['vs_nocheck'])} | "
                f"{_est(row['vs_greylistd'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

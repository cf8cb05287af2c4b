"""Exim's side of a question: ``exim -bh`` sessions through variants of the ACL fragments.

Each session is one ``exim4 -C test.conf -bh 192.0.2.10`` process reading a dialogue on
stdin (EHLO, MAIL, three RCPT, DATA, QUIT): the real ACLs, ``${readsocket}`` included, the
message discarded (design.md §2). What a variant adds over no fragments at all is Exim's
side of our questions: the expansions, the ``${readsocket}`` round trips to a server that
does nothing (bench/floor.py), and any DNS lookup the fragments cause. Variants are
fragment directories (``SNIPPETS``) built here:

- ``nocheck``: no fragment (empty files);
- ``greylistd``: greylistd's Debian ACL statement (bench/exim_lab.py) in place of rcpt.acl,
  one ``${readsocket}`` per recipient, asking a floor that answers ``false``;
- ``old``: the fragments of a git revision (``--old``, default ``main``) as they were;
- ``new``: the fragments of this working tree;
- ablations (``--ablations``): ``old-nodata`` (no DATA fragment), ``old-noround`` and
  ``new-noround`` (every ``${readsocket}`` replaced by the floor's answer: the request is
  still expanded, nothing is asked: the expansions alone), ``old-hostname``
  (``POLICYD_HOST_NAME = yes`` with test.conf's ``host_lookup`` off: the reverse DNS lookup
  ``$sender_host_name`` then makes).

First, what single expansions cost (``exim -be``, the expansion tester: N copies of one
expansion on stdin, minus N copies of a plain word; CPU of the whole process, so the
difference is the expansions alone): the ones our fragments use, and a ``${readsocket}`` to
the floor back to back (its CPU in Exim, and its wall time).

Then rounds run every variant ``--sessions`` times in a shuffled order; per round, each
variant's median session time (fork to exit, ms) and CPU (rusage of the children). The
figures: per variant, the median over rounds of its per-round difference to ``nocheck``
and to ``greylistd``, with a 95 % bootstrap interval (bench/stats.py). ``-bh`` writes a
line to stderr for every ACL statement and condition it runs, so it overstates what a
statement costs next to a real ``exim -bd`` receiver (there, bench/exim_msg.py).

    python3 bench/exim_bh.py [--rounds 40] [--sessions 3] [--ablations] [--old main]

Needs root and /usr/sbin/exim4 (exim4-daemon-heavy). Result: bench/results/exim-bh.json
and .md (overwritten; earlier runs are in git history).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import exim_lab
import servers
import stats

CLIENT = "192.0.2.10"
RECIPIENTS = 3
DIALOGUE = (
    "EHLO client.example.net\r\nMAIL FROM:<sender@example.org>\r\n"
    + "".join(f"RCPT TO:<user{i}@test.example>\r\n" for i in range(RECIPIENTS))
    + "DATA\r\nFrom: <sender@example.org>\r\nSubject: bench\r\n\r\nA short body.\r\n.\r\n"
    "QUIT\r\n"
).encode()
#: What every session must show, or the variant measured something else (a refusal).
ACCEPTED = "250 Accepted"
SESSION_TIMEOUT_S = 30.0
#: The floor's answers as the fragments would get them (bench/floor.py).
FLOOR_ANSWER, FLOOR_SKIP_ANSWER, GREYLISTD_ANSWER = "ok", "ok\\nskipdata", "false"
READSOCKET = "${readsocket{POLICYD_SOCKET}"
FRAGMENTS = ("rcpt.acl", "data.acl", "outbound.acl")


@dataclass(frozen=True)
class Variant:
    name: str
    files: dict[str, str]  # fragment name -> text; missing ones are empty
    macros: dict[str, str]


def without_readsocket(text: str) -> str:
    """Each ``${readsocket{SOCK}{REQ}{T}{}{FAIL}}`` replaced by an expansion of REQ that
    yields the floor's answer: the same expansions, no connection."""
    out, pos = [], 0
    while (start := text.find(READSOCKET, pos)) >= 0:
        depth, i = 0, start
        args: list[str] = []
        arg_start = -1
        while True:  # walk the balanced braces of the item and its arguments
            ch = text[i]
            if ch == "{":
                depth += 1
                if depth == 2:
                    arg_start = i + 1
            elif ch == "}":
                if depth == 2:
                    args.append(text[arg_start:i])
                depth -= 1
                if depth == 0:
                    break
            i += 1
        request = args[1]
        answer = FLOOR_SKIP_ANSWER if "skipdata=1" in request else FLOOR_ANSWER
        out += [text[pos:start], f"${{if eq{{${{length_0:{request}}}}}{{}}{{{answer}}}}}"]
        pos = i + 1
    out.append(text[pos:])
    return "".join(out)


def git_fragments(revision: str) -> dict[str, str]:
    def show(name: str) -> str:
        done = subprocess.run(
            ["git", "show", f"{revision}:exim-snippets/{name}"],
            cwd=servers.REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    return {name: show(name) for name in FRAGMENTS}


def variants(old_revision: str, ablations: bool) -> list[Variant]:
    old = git_fragments(old_revision)
    new = {name: (exim_lab.SNIPPETS_DIR / name).read_text() for name in FRAGMENTS}
    no_name = {"POLICYD_HOST_NAME": "no"}
    out = [
        Variant("nocheck", {}, {}),
        Variant("greylistd", {"rcpt.acl": exim_lab.GREYLISTD_ACL}, {}),
        Variant("old", old, no_name),
        Variant("new", new, no_name),
    ]
    if ablations:
        out += [
            Variant("old-nodata", {k: v for k, v in old.items() if k != "data.acl"}, no_name),
            Variant("old-noround", {k: without_readsocket(v) for k, v in old.items()}, no_name),
            Variant("new-noround", {k: without_readsocket(v) for k, v in new.items()}, no_name),
            Variant("old-hostname", old, {"POLICYD_HOST_NAME": "yes"}),
        ]
    return out


def make_lab(all_variants: list[Variant]) -> Path:
    """Root-owned lab: test.conf, one fragment directory per variant, a spool for -bh."""
    lab = Path(tempfile.mkdtemp(prefix="policyd-eximbh-"))
    lab.chmod(0o755)
    for sub in ("spool", "log", "mail"):
        (lab / sub).mkdir()
        shutil.chown(lab / sub, exim_lab.EXIM_USER, exim_lab.EXIM_USER)
    conf = lab / "test.conf"
    shutil.copyfile(exim_lab.SNIPPETS_DIR / "test.conf", conf)
    conf.chmod(0o644)
    for variant in all_variants:
        home = lab / "v" / variant.name
        home.mkdir(parents=True, mode=0o755)
        shutil.copyfile(exim_lab.SNIPPETS_DIR / "00_policyd", home / "00_policyd")
        for name in FRAGMENTS:
            (home / name).write_text(variant.files.get(name, ""))
        for path in home.iterdir():
            path.chmod(0o644)
    (lab / "v").chmod(0o755)
    return lab


def start_floor(lab: Path, name: str, answer: str) -> servers.Server:
    """bench/floor.py answering ``answer`` (``ok`` → policyd's default answers), its socket
    open to Debian-exim."""
    home = lab / name
    home.mkdir(mode=0o755)
    argv = [sys.executable, str(servers.BENCH_DIR / "floor.py"), "--socket"]
    sock = str(home / "floor.sock")
    argv += [sock] + (["--answer", answer] if answer != FLOOR_ANSWER else [])
    floor = servers._spawn(name, argv, sock, home)
    os.chmod(sock, 0o666)
    return floor


def session(lab: Path, variant: Variant, macros: dict[str, str]) -> tuple[float, float]:
    """One -bh session; (wall ms, CPU ms)."""
    argv = [str(exim_lab.EXIM), "-C", str(lab / "test.conf"), f"-DLAB={lab}"]
    argv += [f"-DSNIPPETS={lab / 'v' / variant.name}"]
    argv += [f"-D{k}={v}" for k, v in {**macros, **variant.macros}.items()]
    argv += ["-bh", CLIENT]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        argv, input=DIALOGUE, capture_output=True, timeout=SESSION_TIMEOUT_S, check=False
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout.decode(errors="replace")
    if out.count(ACCEPTED) != RECIPIENTS or "250 OK id=" not in out:
        tail = (out + done.stderr.decode(errors="replace"))[-1500:]
        raise RuntimeError(f"variant {variant.name}: the session was not accepted:\n{tail}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall * 1e3, cpu * 1e3


def count_questions(lab: Path, variant: Variant, macros: dict[str, str]) -> int:
    """How many ${readsocket} connections one session of the variant makes (strace)."""
    trace = lab / f"strace-{variant.name}.txt"
    argv = [str(exim_lab.EXIM), "-C", str(lab / "test.conf"), f"-DLAB={lab}"]
    argv += [f"-DSNIPPETS={lab / 'v' / variant.name}"]
    argv += [f"-D{k}={v}" for k, v in {**macros, **variant.macros}.items()]
    argv = ["strace", "-f", "-e", "trace=connect", "-o", str(trace), *argv, "-bh", CLIENT]
    try:
        subprocess.run(
            argv, input=DIALOGUE, capture_output=True, timeout=SESSION_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return -1
    return len(re.findall(r"floor\.sock", trace.read_text()))


#: Expansions timed with -be: (name, expansion); $x-like values are literals here.
EXPANSIONS = (
    ("plain word (baseline)", "x"),
    ("${base64:…} of an address", "${base64:sender@example.org}"),
    ("${if eq{…}{…}}", "${if eq{ok}{defer}}"),
    ("${extract{1}{ \\t\\r\\n}{…}} (first word)", "${extract{1}{ \\t\\r\\n}{ok passed}}"),
    ("${if match{…}{regex}} (compiled each time)", "${if match{ok}{\\N^defer\\b\\N}}"),
    ("${if def:…}", "${if def:sender_host_address {a}{b}}"),
)
EXPANSION_LINES = 20_000
READSOCKET_LINES = 2_000


def time_be(lab: Path, line: str, count: int) -> tuple[float, float]:
    """(CPU ms, wall ms) of one ``exim -be`` process expanding ``line`` ``count`` times."""
    argv = [str(exim_lab.EXIM), "-C", str(lab / "test.conf"), f"-DLAB={lab}"]
    argv += [f"-DSNIPPETS={lab / 'v' / 'nocheck'}", "-be"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        argv, input=(line + "\n").encode() * count, capture_output=True, timeout=120, check=True
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu * 1e3, wall * 1e3


def expansion_costs(lab: Path, floor_socket: str, repeats: int) -> dict[str, dict[str, float]]:
    """µs per expansion (median of ``repeats``), the plain word's cost subtracted."""
    readsocket = f"${{readsocket{{{floor_socket}}}{{rcpt v=1 ip=192.0.2.10\\n}}{{2s}}{{}}{{x}}}}"
    out: dict[str, dict[str, float]] = {}
    for name, line, count in [
        *((n, e, EXPANSION_LINES) for n, e in EXPANSIONS),
        ("plain word (baseline, readsocket run)", "x", READSOCKET_LINES),
        ("${readsocket} to the floor, back to back", readsocket, READSOCKET_LINES),
    ]:
        runs = [time_be(lab, line, count) for _ in range(repeats)]
        out[name] = {
            "count": count,
            "cpu_ms": statistics.median(r[0] for r in runs),
            "wall_ms": statistics.median(r[1] for r in runs),
        }
    for row in out.values():
        base = out[
            "plain word (baseline)"
            if row["count"] == EXPANSION_LINES
            else "plain word (baseline, readsocket run)"
        ]
        row["cpu_us_each"] = round((row["cpu_ms"] - base["cpu_ms"]) / row["count"] * 1e3, 2)
        row["wall_us_each"] = round((row["wall_ms"] - base["wall_ms"]) / row["count"] * 1e3, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sessions", type=int, default=3, help="per variant per round")
    parser.add_argument("--old", default="main", help="git revision of the old fragments")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--be-repeats", type=int, default=5, help="exim -be runs per expansion")
    parser.add_argument("--out", type=Path, default=servers.BENCH_DIR / "results/exim-bh.json")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not exim_lab.EXIM.exists():
        print("exim_bh.py needs root and /usr/sbin/exim4", file=sys.stderr)
        return 2
    all_variants = variants(args.old, args.ablations)
    lab = make_lab(all_variants)
    floors: list[servers.Server] = []
    t0 = time.monotonic()
    try:
        floors = [
            start_floor(lab, "floor-d", FLOOR_ANSWER),
            start_floor(lab, "grey-d", GREYLISTD_ANSWER),
        ]
        macros = {"POLICYD_SOCKET": floors[0].socket, "GREYLISTD_SOCKET": floors[1].socket}
        questions = {v.name: count_questions(lab, v, macros) for v in all_variants}
        expansions = expansion_costs(lab, floors[0].socket, args.be_repeats)
        for v in all_variants:  # warm-up: page cache, the floors' first answers
            session(lab, v, macros)
        wall: dict[str, list[float]] = {v.name: [] for v in all_variants}
        cpu: dict[str, list[float]] = {v.name: [] for v in all_variants}
        rng = random.Random(1)
        for rnd in range(args.rounds):
            order = list(all_variants)
            rng.shuffle(order)
            for v in order:
                runs = [session(lab, v, macros) for _ in range(args.sessions)]
                wall[v.name].append(statistics.median(r[0] for r in runs))
                cpu[v.name].append(statistics.median(r[1] for r in runs))
            print(f"  round {rnd + 1}/{args.rounds}", file=sys.stderr)
        load = os.getloadavg()
    finally:
        for floor in floors:
            servers.stop(floor)
        shutil.rmtree(lab, ignore_errors=True)
    report = analyse(all_variants, wall, cpu, questions)
    report["expansions"] = expansions
    report["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "exim_version": exim_lab.exim_version(),
        "rounds": args.rounds,
        "sessions": args.sessions,
        "old": args.old,
        "loadavg_end": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    servers.write_results(args.out, report, markdown(report))
    return 0


def analyse(
    all_variants: list[Variant],
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    questions: dict[str, int],
) -> dict:
    rows = {}
    for v in all_variants:
        name = v.name
        rows[name] = {
            "questions": questions[name],
            "wall_ms": stats.median(wall[name]),
            "cpu_ms": stats.median(cpu[name]),
            **{
                f"{fig}_vs_{base}": (
                    est.to_dict()
                    if (est := stats.paired_difference(src[name], src[base]))
                    else None
                )
                for fig, src in (("wall", wall), ("cpu", cpu))
                for base in ("nocheck", "greylistd")
            },
        }
    return {"variants": rows, "rounds": {"wall_ms": wall, "cpu_ms": cpu}}


def _est(row: dict | None) -> str:
    if not row:
        return "n/a"
    return f"{row['value']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]"


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# bench/exim_bh.py — {meta['date']}",
        "",
        f"Exim {meta['exim_version']}; {meta['rounds']} rounds × {meta['sessions']} `exim -bh` "
        f"sessions per variant (EHLO, MAIL, {RECIPIENTS} RCPT, DATA), variants shuffled per "
        f"round; old fragments = `{meta['old']}`. Per round the median session; figures are "
        "medians over rounds of the paired per-round difference, ms per session "
        f"[95 % bootstrap interval]. Load average at the end: {meta['loadavg_end']} on "
        f"{meta['cpus']} CPUs.",
        "",
        "| variant | questions | session ms | vs no check | vs greylistd | CPU ms | CPU vs no "
        "check |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["variants"].items():
        lines.append(
            f"| {name} | {row['questions']} | {row['wall_ms']:.2f} | "
            f"{_est(row['wall_vs_nocheck'])} | {_est(row['wall_vs_greylistd'])} | "
            f"{row['cpu_ms']:.2f} | {_est(row['cpu_vs_nocheck'])} |"
        )
    lines += [
        "",
        "One expansion (`exim -be`, N copies in one process, the plain word's cost subtracted; "
        "median of the runs):",
        "",
        "| expansion | N | CPU µs each | wall µs each |",
        "|---|---|---|---|",
    ]
    for name, row in report["expansions"].items():
        if not name.startswith("plain word"):
            lines.append(
                f"| {name} | {row['count']} | {row['cpu_us_each']:.2f} | "
                f"{row['wall_us_each']:.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

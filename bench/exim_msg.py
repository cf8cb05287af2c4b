"""Milliseconds per message through a real Exim: with policyd, with no check, with greylistd.

Three loopback Exim daemons (``exim4 -C CONF -bdf -oX PORT``, as tests/integration/exim/
conftest.py runs them: a lab directory Debian-exim can reach, root-owned 0644 configs,
``RUN_AS``/``SINK_PORT`` macros, ``deliver_drop_privilege``) all deliver to one aiosmtpd
sink on another loopback port. Their configs are generated into the lab from
``exim-snippets/test.conf``:

- ``policyd``: test.conf as shipped (``rcpt.acl``, ``data.acl``, ``outbound.acl`` included),
  asking a policyd started here (SQLite store, greylisting delay 1 s);
- ``nocheck``: the same file without any ``.include`` line: no policy question at all;
- ``greylistd``: no policyd fragments; instead greylistd's own Exim ACL statement (its
  Debian example: ``${readsocket}`` with ``--grey IP SENDER RCPT``) in ``acl_check_rcpt``,
  asking a private greylistd (bench/peers.py) with ``retryMin`` 1 s.

Senders (``--senders`` threads, smtplib) send N messages with k recipients at
``sink.example`` per batch; batches run interleaved (policyd, nocheck, greylistd, policyd,
…) over several rounds, in two phases:

- ``greylist``: every message is new; a deferred message is retried 1.2 s after the first
  451 (then every 0.5 s) until accepted. Per message: the SMTP time of all its attempts
  (the wait between attempts excluded), attempts, accepted → delivered to the sink.
- ``steady``: the same messages again (same client, sender, recipients): the triplets are
  known, nothing is deferred; every recipient is still asked. This is the per-message
  overhead of a policy check on a normal day; the headline quotes it.

Per message: SMTP transaction (connect → QUIT answered), accepted → delivered (the sink's
arrival time minus the moment DATA was answered 250), their sum; per batch: machine CPU
(``/proc/stat``, all processes: Exim, the sink, the senders, the policy daemon) per message.
Overhead = (config − nocheck) ÷ nocheck, from medians over rounds.

    python3 bench/exim_msg.py [--quick] [--out bench/results/NAME.json]

Needs root, /usr/sbin/exim4 (exim4-daemon-heavy), aiosmtpd; greylistd optional (installed
when root and absent; skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers
import servers

EXIM = Path("/usr/sbin/exim4")
EXIM_USER = "Debian-exim"
SNIPPETS_DIR = servers.REPO_DIR / "exim-snippets"
SNIPPET_FILES = ("00_policyd", "rcpt.acl", "data.acl", "outbound.acl")
CONFIGS = ("policyd", "nocheck", "greylistd")
START_TIMEOUT_S = 20.0
SMTP_TIMEOUT_S = 15.0
BATCH_DEADLINE_S = 60.0  # a batch (sends, retries, deliveries) never runs longer
DELIVERY_WAIT_S = 15.0
FIRST_RETRY_S = 1.2  # after the first 451 (policyd delay 1 s, greylistd retryMin 1 s)
NEXT_RETRY_S = 0.5
MAX_ATTEMPTS = 8
GREYLIST_DELAY_S = 1

MODES = {
    "quick": {"rounds": 4, "messages": 24, "rcpts": 3, "senders": 4},
    "full": {"rounds": 7, "messages": 40, "rcpts": 3, "senders": 4},
}

INCLUDE_RE = re.compile(r"^\.include SNIPPETS/(\S+)\n", re.MULTILINE)

# greylistd's Exim ACL statement (its Debian example, exim4-acl-example.txt), reduced to what
# applies here: no whitelist files, no callout; the socket is a macro.
GREYLISTD_ACL = """\
  defer
    message        = $sender_host_address is not yet authorized to deliver \\
                     mail from <$sender_address> to <$local_part@$domain>. \\
                     Please try later.
    log_message    = greylisted.
    !senders       = :
    !authenticated = *
    condition      = ${readsocket{GREYLISTD_SOCKET}\\
                                 {--grey \\
                                  $sender_host_address \\
                                  $sender_address \\
                                  $local_part@$domain}\\
                                 {5s}{}{false}}
"""

POLICYD_CONFIG = """\
[server]
socket = {socket}
socket_mode = "0666"
deadline = "1s"
fallback = "accept"

[store]
url = {store}

[greylist]
enabled = true
delay = "{delay}s"
retry_window = "2d"
auto_whitelist_after = 0
learn = false
add_header = true
# The senders are on loopback, which the default whitelists: greylist them like anyone.
whitelist_clients = []

[metrics]
enabled = false

[admin]
socket = {admin}
"""


# --------------------------------------------------------------------------------------------
# The lab


def make_config(template: str, kind: str) -> str:
    """test.conf for ``kind``: as shipped, without the includes, or with greylistd's ACL."""
    if kind == "policyd":
        return template
    includes = INCLUDE_RE.findall(template)
    assert {"rcpt.acl", "data.acl", "00_policyd"} <= set(includes), includes
    if kind == "nocheck":
        return INCLUDE_RE.sub("", template)
    assert kind == "greylistd"
    text = template.replace(".include SNIPPETS/rcpt.acl\n", GREYLISTD_ACL, 1)
    return INCLUDE_RE.sub("", text)


def make_lab() -> Path:
    """Root-owned 0755 lab; per config spool/log/mail owned by Debian-exim."""
    lab = Path(tempfile.mkdtemp(prefix="policyd-eximbench-"))
    lab.chmod(0o755)
    snippets = lab / "snippets"
    snippets.mkdir(mode=0o755)
    for name in SNIPPET_FILES:
        target = snippets / name
        shutil.copyfile(SNIPPETS_DIR / name, target)
        os.chown(target, 0, 0)
        target.chmod(0o644)
    template = (SNIPPETS_DIR / "test.conf").read_text()
    for kind in CONFIGS:
        home = lab / kind
        home.mkdir(mode=0o755)
        for sub in ("spool", "log", "mail"):
            (home / sub).mkdir()
            shutil.chown(home / sub, EXIM_USER, EXIM_USER)
        conf = lab / f"{kind}.conf"
        conf.write_text(make_config(template, kind))
        os.chown(conf, 0, 0)
        conf.chmod(0o644)
    return lab


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# The sink


@dataclass
class Sink:
    """Arrival time (monotonic) of each delivered copy, keyed by its X-Bench-Id header."""

    arrivals: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    event: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        now = time.monotonic()
        m = re.search(rb"^X-Bench-Id: (\S+)", envelope.original_content, re.MULTILINE)
        if m:
            with self.event:
                self.arrivals[m.group(1).decode()] = now
                self.event.notify_all()
        return "250 2.0.0 stored"

    def wait_for(self, keys: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.event:
            while not all(k in self.arrivals for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.event.wait(left)


# --------------------------------------------------------------------------------------------
# Exim daemons


@dataclass
class Exim:
    kind: str
    port: int
    process: subprocess.Popen[bytes]
    stderr: Path


def start_exim(lab: Path, kind: str, macros: dict[str, str]) -> Exim:
    port = free_port()
    defines = {"LAB": str(lab / kind), "SNIPPETS": str(lab / "snippets"), **macros}
    argv = [str(EXIM), "-C", str(lab / f"{kind}.conf")]
    argv += [f"-D{k}={v}" for k, v in defines.items()]
    argv += ["-bdf", "-oX", str(port), "-oP", str(lab / kind / "exim-bd.pid")]
    stderr = lab / kind / "exim-bd.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    step = 0.05
    for _ in range(int(START_TIMEOUT_S / step)):
        if proc.poll() is not None:
            raise RuntimeError(f"exim {kind} exited {proc.returncode}: {stderr.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return Exim(kind, port, proc, stderr)
        time.sleep(step)
    stop_process(proc)
    raise RuntimeError(f"exim {kind} not listening after {START_TIMEOUT_S}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(10)


# --------------------------------------------------------------------------------------------
# Sending


@dataclass
class Message:
    mid: str
    sender: str
    rcpts: list[str]
    pending: list[str] = field(default_factory=list)
    attempts: int = 0
    smtp_s: float = 0.0
    accepted_at: dict[str, float] = field(default_factory=dict)  # bench id -> time of 250
    last_key: str | None = None
    error: str | None = None

    def body(self, key: str) -> bytes:
        return (
            f"From: <{self.sender}>\r\nTo: <{self.rcpts[0]}>\r\n"
            f"Subject: bench {self.mid}\r\nMessage-ID: <{key}@bench.example>\r\n"
            f"X-Bench-Id: {key}\r\n\r\n"
            + "A short plain message body, a few lines long, like a notification.\r\n"
            * 12
        ).encode()


def _quit_no_wait(s: smtplib.SMTP) -> None:
    """Send QUIT and close without waiting for the 221, as Postfix does by default
    (``smtp_skip_quit_response``): Exim 4.96 answers QUIT only after ~200 ms (it waits for
    the client to close first), which would otherwise dominate every figure."""
    try:
        if s.sock is not None:
            s.sock.sendall(b"QUIT\r\n")
    except OSError:
        pass
    s.close()


def attempt(port: int, msg: Message) -> None:
    """One SMTP session for the recipients still pending; updates ``msg``. The SMTP time
    runs from connect to the answer to DATA's end (or to the refusals), QUIT not waited."""
    msg.attempts += 1
    key = f"{msg.mid}.{msg.attempts}"
    t0 = time.monotonic()
    s = None
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=SMTP_TIMEOUT_S)
        s.ehlo("client.bench.example")
        try:
            refused = s.sendmail(msg.sender, msg.pending, msg.body(key))
            msg.accepted_at[key] = time.monotonic()
            msg.last_key = key
        except smtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients
        msg.pending = [r for r in msg.pending if r in refused]
    except (OSError, smtplib.SMTPException) as exc:
        msg.error = f"{type(exc).__name__}: {exc}"[:200]
    msg.smtp_s += time.monotonic() - t0
    if s is not None:
        _quit_no_wait(s)


def send_batch(port: int, messages: list[Message], senders: int) -> float:
    """Send (and retry) ``messages`` with ``senders`` threads; returns the wall time."""
    for m in messages:
        m.pending, m.attempts, m.smtp_s = list(m.rcpts), 0, 0.0
        m.accepted_at, m.last_key, m.error = {}, None, None
    t_start = time.monotonic()
    deadline = t_start + BATCH_DEADLINE_S

    def worker(mine: list[Message]) -> None:
        queue = [(t_start, i, m) for i, m in enumerate(mine)]
        heapq.heapify(queue)
        while queue:
            due, i, m = heapq.heappop(queue)
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            if time.monotonic() > deadline:
                m.error = m.error or "batch deadline"
                continue
            attempt(port, m)
            if m.pending and m.error is None and m.attempts < MAX_ATTEMPTS:
                wait = FIRST_RETRY_S if m.attempts == 1 else NEXT_RETRY_S
                heapq.heappush(queue, (time.monotonic() + wait, i, m))
            elif m.pending and m.error is None:
                m.error = f"still deferred after {m.attempts} attempts"

    threads = [
        threading.Thread(target=worker, args=(messages[k::senders],), daemon=True)
        for k in range(senders)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline + SMTP_TIMEOUT_S - time.monotonic()))
    return time.monotonic() - t_start


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Exim's delivery processes outlive the receiving process
    that forked them) so that reaping them adds their CPU to our cutime/cstime."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_orphans(known: set[int]) -> None:
    """Reap exited adopted processes; never one of our own daemons (``known``)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in known:
            return
        os.waitpid(info.si_pid, 0)


def proc_cpu_s(pid: int | str, children: bool) -> float:
    """utime+stime (and cutime+cstime, the reaped children's, when ``children``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / servers.CLOCK_TICKS


@dataclass
class CpuProbe:
    """CPU of one configuration: the Exim daemon and everything it forked (receivers reaped
    by the daemon, delivery processes reaped by us) plus the policy daemon, if any."""

    exim_pid: int
    policy: servers.Server | None
    known: set[int]

    def read(self) -> tuple[float, float]:
        reap_orphans(self.known)
        exim = (
            proc_cpu_s(self.exim_pid, True) + proc_cpu_s("self", True) - proc_cpu_s("self", False)
        )
        pol = self.policy.cpu_seconds() if self.policy is not None else 0.0
        return exim, pol


def run_batch(
    exim: Exim, sink: Sink, messages: list[Message], senders: int, probe: CpuProbe
) -> dict:
    exim0, pol0 = probe.read()
    wall = send_batch(exim.port, messages, senders)
    keys = [k for m in messages for k in m.accepted_at]
    sink.wait_for(keys, DELIVERY_WAIT_S)
    wall_all = time.monotonic() - min(
        (min(m.accepted_at.values()) for m in messages if m.accepted_at), default=0.0
    )
    time.sleep(0.3)  # let the delivery processes finish (spool, log) and exit
    exim1, pol1 = probe.read()
    exim_cpu, pol_cpu = exim1 - exim0, pol1 - pol0
    cpu = exim_cpu + pol_cpu
    smtp_ms, deliver_ms, total_ms, attempts, errors = [], [], [], [], []
    undelivered = 0
    for m in messages:
        if m.error:
            errors.append(m.error)
        attempts.append(m.attempts)
        smtp_ms.append(m.smtp_s * 1e3)
        if m.last_key and m.last_key in sink.arrivals:
            d = (sink.arrivals[m.last_key] - m.accepted_at[m.last_key]) * 1e3
            deliver_ms.append(d)
            total_ms.append(m.smtp_s * 1e3 + d)
        else:
            undelivered += 1
    n = len(messages)
    return {
        "messages": n,
        "wall_s": round(wall, 3),
        "msgs_per_s": round(n / wall, 2) if wall else None,
        "smtp_ms_p50": _med(smtp_ms),
        "smtp_ms_mean": _mean(smtp_ms),
        "deliver_ms_p50": _med(deliver_ms),
        "deliver_ms_mean": _mean(deliver_ms),
        "total_ms_p50": _med(total_ms),
        "total_ms_mean": _mean(total_ms),
        "attempts_mean": _mean(attempts),
        "cpu_ms_per_msg": round(cpu / n * 1e3, 2) if n else None,
        "exim_cpu_ms_per_msg": round(exim_cpu / n * 1e3, 2) if n else None,
        "policy_cpu_ms_per_msg": round(pol_cpu / n * 1e3, 2) if n else None,
        "undelivered": undelivered,
        "errors": errors[:5],
        "n_errors": len(errors),
        "_wall_until_delivered_s": round(wall_all, 3),
    }


def _med(v: list[float]) -> float | None:
    return round(statistics.median(v), 2) if v else None


def _mean(v: list[float]) -> float | None:
    return round(statistics.fmean(v), 2) if v else None


def new_messages(kind: str, rnd: int, n: int, k: int) -> list[Message]:
    out = []
    for i in range(n):
        mid = f"{kind[:2]}{rnd}x{i}x{os.getpid()}"
        sender = f"news{i}-{rnd}@sender{i % 7}.{kind}.example"
        rcpts = [f"user{j}-{mid}@sink.example" for j in range(k)]
        out.append(Message(mid, sender, rcpts))
    return out


MEDIAN_KEYS = (
    "smtp_ms_p50",
    "smtp_ms_mean",
    "deliver_ms_p50",
    "deliver_ms_mean",
    "total_ms_p50",
    "total_ms_mean",
    "attempts_mean",
    "cpu_ms_per_msg",
    "exim_cpu_ms_per_msg",
    "policy_cpu_ms_per_msg",
    "msgs_per_s",
)


def medians(rows: list[dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in MEDIAN_KEYS:
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = round(statistics.median(vals), 2) if vals else None
    return out


def overhead(a: dict, base: dict) -> dict[str, float | None]:
    """(a − base) ÷ base in %, per figure."""
    out: dict[str, float | None] = {}
    for key in ("smtp_ms_p50", "deliver_ms_p50", "total_ms_p50", "total_ms_mean", "cpu_ms_per_msg"):
        x, y = a.get(key), base.get(key)
        out[key] = round((x - y) / y * 100, 1) if x is not None and y else None
    return out


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# bench/exim_msg.py — {meta['mode']} mode, {meta['date']}",
        "",
        f"Exim {meta['exim_version']}, git {meta['git']}, {meta['cpus']} CPUs; "
        f"{meta['rounds']} interleaved rounds ({', '.join(meta['configs'])}) of "
        f"{meta['messages']} messages × {meta['rcpts']} recipients, {meta['senders']} "
        "concurrent senders; medians over rounds of per-batch medians (ms per message). "
        "SMTP = connect → answer to the end of DATA (or to the refused RCPTs), summed over a "
        "message's attempts; QUIT is sent without waiting for the reply, as Postfix does.",
        "",
    ]
    for phase, title in (
        ("steady", "Steady state (known triplets: every recipient asked, nothing deferred)"),
        ("greylist", "Greylisting with retries (new triplets; retry after 1.2 s, then 0.5 s)"),
    ):
        res = report["results"].get(phase)
        if not res:
            continue
        lines += [
            f"## {title}",
            "",
            "| config | SMTP ms | accepted→delivered ms | total ms | attempts "
            "| CPU ms/msg (Exim + policy daemon) "
            "| msgs/s | overhead total / SMTP / CPU |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for kind in meta["configs"]:
            m = res[kind]["median"]
            ov = res["overhead_pct"].get(kind)
            ovs = (
                "—"
                if ov is None
                else f"{_fmt(ov['total_ms_p50'])}% / {_fmt(ov['smtp_ms_p50'])}% / "
                f"{_fmt(ov['cpu_ms_per_msg'])}%"
            )
            lines.append(
                f"| {kind} | {_fmt(m['smtp_ms_p50'])} | {_fmt(m['deliver_ms_p50'])} "
                f"| {_fmt(m['total_ms_p50'])} | {_fmt(m['attempts_mean'], '.2f')} "
                f"| {_fmt(m['cpu_ms_per_msg'], '.2f')} ({_fmt(m['exim_cpu_ms_per_msg'], '.2f')} "
                f"+ {_fmt(m['policy_cpu_ms_per_msg'], '.2f')}) | {_fmt(m['msgs_per_s'])} | {ovs} |"
            )
        lines.append("")
    h = report.get("headline", {})
    lines += [
        "**Headline** (steady state): the time the policy questions add to the SMTP "
        "transaction, in % of Exim's own time per message (no-check SMTP + accepted→delivered, "
        f"{_fmt(h.get('exim_own_ms'))} ms) = **{_fmt(h.get('policyd_overhead_pct'))}%** with "
        f"policyd, {_fmt(h.get('greylistd_overhead_pct'))}% with greylistd (measured total "
        f"per message: {_fmt(h.get('policyd_total_overhead_pct'))}% / "
        f"{_fmt(h.get('greylistd_total_overhead_pct'))}%, delivery noise included); "
        f"CPU per message (Exim + policy daemon) +{_fmt(h.get('policyd_cpu_overhead_pct'))}% / "
        f"+{_fmt(h.get('greylistd_cpu_overhead_pct'))}%.",
    ]
    for kind, note in report.get("skipped", {}).items():
        lines.append(f"\n{kind}: **{note}**")
    if report.get("errors"):
        lines.append(f"\nErrors: {report['errors']}")
    return "\n".join(lines) + "\n"


def exim_version() -> str:
    try:
        out = subprocess.run(
            [str(EXIM), "-bV"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "unknown"
    m = re.search(r"Exim version (\S+)", out.stdout)
    return m.group(1) if m else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 short rounds (~50 s)")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/exim-…)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--messages", type=int, help="messages per batch")
    parser.add_argument("--rcpts", type=int, help="recipients per message")
    parser.add_argument("--senders", type=int, help="concurrent SMTP senders")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not EXIM.exists():
        print("exim_msg.py needs root and /usr/sbin/exim4 (exim4-daemon-heavy)", file=sys.stderr)
        return 2
    from aiosmtpd.controller import Controller

    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    for key in ("rounds", "messages", "rcpts", "senders"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or servers.BENCH_DIR / "results" / f"exim-{mode}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    skipped: dict[str, str] = {}
    configs = list(CONFIGS)
    notes = peers.ensure_installed(["greylistd"])
    if notes:
        skipped["greylistd"] = notes["greylistd"]
        configs.remove("greylistd")

    subreaper = become_subreaper()
    lab = make_lab()
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    daemons: list[servers.Server] = []
    exims: dict[str, Exim] = {}
    report: dict = {}
    try:
        pd_dir = lab / "policyd-d"
        pd_dir.mkdir(mode=0o755)
        pd_conf = pd_dir / "policyd.toml"
        pd_conf.write_text(
            POLICYD_CONFIG.format(
                socket=json.dumps(str(pd_dir / "policyd.sock")),
                store=json.dumps(f"sqlite://{pd_dir / 'state.sqlite3'}"),
                admin=json.dumps(str(pd_dir / "admin.sock")),
                delay=GREYLIST_DELAY_S,
            )
        )
        pd = servers._spawn(
            "policyd",
            [sys.executable, "-m", "policyd", "--config", str(pd_conf)],
            str(pd_dir / "policyd.sock"),
            pd_dir,
            env=servers.POLICYD_ENV,
        )
        daemons.append(pd)
        # No host name: test.conf has host_lookup off and this machine no resolver, so
        # $sender_host_name would cost a reverse DNS timeout per connection (5-10 s stalls);
        # the other variants do no lookup either. Debian's host_lookup = * pays it anyway.
        macros = {
            "SINK_PORT": str(controller.port),
            "POLICYD_SOCKET": pd.socket,
            "POLICYD_HOST_NAME": "no",
        }
        if "greylistd" in configs:
            try:
                gd = peers.start_greylistd(
                    lab, delay_s=GREYLIST_DELAY_S, socket_mode="0666", name="greylistd-d"
                )
                daemons.append(gd)
                macros["GREYLISTD_SOCKET"] = gd.socket
            except (RuntimeError, OSError) as exc:
                skipped["greylistd"] = f"failed to start: {str(exc)[-300:]}: skipped"
                configs.remove("greylistd")
        for kind in configs:
            exims[kind] = start_exim(lab, kind, macros)
        known = {d.pid for d in daemons} | {e.process.pid for e in exims.values()}
        policy_of = {"policyd": pd, "greylistd": daemons[-1] if "greylistd" in configs else None}
        probes = {k: CpuProbe(exims[k].process.pid, policy_of.get(k), known) for k in configs}
        # Warm-up (unmeasured): the first session of a daemon is slow (loading, caches).
        for kind in configs:
            warm = new_messages(kind, 99, cfg["senders"], 1)
            send_batch(exims[kind].port, warm, cfg["senders"])
            send_batch(exims[kind].port, warm, cfg["senders"])

        rows: dict[str, dict[str, list[dict]]] = {
            ph: {k: [] for k in configs} for ph in ("greylist", "steady")
        }
        for rnd in range(cfg["rounds"]):
            batches = {k: new_messages(k, rnd, cfg["messages"], cfg["rcpts"]) for k in configs}
            for phase in ("greylist", "steady"):
                for kind in configs:
                    row = run_batch(exims[kind], sink, batches[kind], cfg["senders"], probes[kind])
                    row["round"] = rnd
                    rows[phase][kind].append(row)
                    print(
                        f"  round {rnd} {phase:8} {kind:9}: smtp {row['smtp_ms_p50']} ms, "
                        f"delivered {row['deliver_ms_p50']} ms, attempts {row['attempts_mean']}, "
                        f"cpu {row['cpu_ms_per_msg']} ms/msg, errors {row['n_errors']}",
                        file=sys.stderr,
                    )
                    for d in daemons:
                        if not d.alive():
                            raise RuntimeError(f"{d.name} died:\n{d.log_tail()}")
        results: dict[str, dict] = {}
        for phase, per in rows.items():
            med = {k: medians(v) for k, v in per.items()}
            results[phase] = {k: {"median": med[k], "rounds": per[k]} for k in configs}
            results[phase]["overhead_pct"] = {
                k: overhead(med[k], med["nocheck"]) for k in configs if k != "nocheck"
            }
        st = results["steady"]["overhead_pct"]
        base = results["steady"]["nocheck"]["median"]

        def added_pct(kind: str) -> float | None:
            # The policy questions happen inside the SMTP transaction; what they add there,
            # in % of Exim's own time per message (its SMTP time + accepted -> delivered).
            m = results["steady"][kind]["median"]
            own = (base["smtp_ms_p50"] or 0) + (base["deliver_ms_p50"] or 0)
            if m["smtp_ms_p50"] is None or not own:
                return None
            return round((m["smtp_ms_p50"] - base["smtp_ms_p50"]) / own * 100, 1)

        headline = {
            "policyd_overhead_pct": added_pct("policyd"),
            "policyd_total_overhead_pct": st["policyd"]["total_ms_p50"],
            "policyd_smtp_overhead_pct": st["policyd"]["smtp_ms_p50"],
            "policyd_cpu_overhead_pct": st["policyd"]["cpu_ms_per_msg"],
            "exim_own_ms": round((base["smtp_ms_p50"] or 0) + (base["deliver_ms_p50"] or 0), 2),
            "exim_own_total_ms": base["total_ms_p50"],
            "policyd_total_ms": results["steady"]["policyd"]["median"]["total_ms_p50"],
        }
        if "greylistd" in st:
            headline["greylistd_overhead_pct"] = added_pct("greylistd")
            headline["greylistd_total_overhead_pct"] = st["greylistd"]["total_ms_p50"]
            headline["greylistd_smtp_overhead_pct"] = st["greylistd"]["smtp_ms_p50"]
            headline["greylistd_cpu_overhead_pct"] = st["greylistd"]["cpu_ms_per_msg"]
        errors = [
            e for per in rows.values() for rs in per.values() for r in rs for e in r["errors"]
        ]
        report = {
            "meta": {
                "mode": mode,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "git": _git(),
                "python": platform.python_version(),
                "exim_version": exim_version(),
                "greylistd_version": peers.version("greylistd"),
                "cpus": os.cpu_count(),
                "configs": configs,
                **cfg,
                "greylist_delay_s": GREYLIST_DELAY_S,
                "first_retry_s": FIRST_RETRY_S,
                "cpu_includes_delivery_processes": subreaper,
                "elapsed_s": None,
            },
            "results": results,
            "headline": headline,
            "skipped": skipped,
            "errors": errors[:10],
            "policyd_memory_kib": pd.memory_kib(),
        }
        paniclogs = [p for p in lab.glob("*/log/paniclog") if p.stat().st_size]
        if paniclogs:
            report["paniclog"] = paniclogs[0].read_text(errors="replace")[-2000:]
    finally:
        for ex in exims.values():
            stop_process(ex.process)
        for d in daemons:
            servers.stop(d)
        controller.stop()
        if args.keep:
            print(f"kept {lab}", file=sys.stderr)
        else:
            shutil.rmtree(lab, ignore_errors=True)
    report["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    servers.write_results(out, report, summary_markdown(report))
    return 0


def _git() -> str:
    try:
        done = subprocess.run(  # noqa: PLW1510
            ["git", "describe", "--always", "--dirty"],
            cwd=servers.REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())

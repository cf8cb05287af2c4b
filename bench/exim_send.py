"""Sending mail through an Exim of bench/exim_msg.py and measuring it: messages, SMTP
sessions with retries after a 451, the CPU of one configuration, one measured batch.

SMTP time = connect → answer to the end of DATA (or to the refused RCPTs), summed over a
message's attempts; QUIT is sent without waiting for the reply, as Postfix does. CPU of a
batch = the Exim daemon's and its reaped children's (receivers) + the delivery processes
(the bench is a child subreaper, so it reaps them and they count in its cutime) + the
policy server's.
"""

from __future__ import annotations

import heapq
import os
import smtplib
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
import stats
from exim_lab import Exim, Sink

SMTP_TIMEOUT_S = 15.0
BATCH_DEADLINE_S = 60.0  # a batch (sends, retries, deliveries) never runs longer
DELIVERY_WAIT_S = 15.0
FIRST_RETRY_S = 1.2  # after the first 451 (policyd delay 1 s, greylistd retryMin 1 s)
NEXT_RETRY_S = 0.5
MAX_ATTEMPTS = 8
#: After the sink has every copy: let the delivery processes finish (spool, log) and exit
#: before the CPU is read.
DELIVERY_SETTLE_S = 0.3


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
    #: Batches this message was sent in: with the attempt, it makes each copy's bench id
    #: unique, so a copy from an earlier batch is never taken for this one's.
    sends: int = 0

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
    key = f"{msg.mid}.{msg.sends}.{msg.attempts}"
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
        m.sends += 1
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
) -> dict[str, object]:
    """Send a batch through ``exim``, wait for its deliveries; its figures per message."""
    exim0, pol0 = probe.read()
    wall = send_batch(exim.port, messages, senders)
    keys = [k for m in messages for k in m.accepted_at]
    sink.wait_for(keys, DELIVERY_WAIT_S)
    time.sleep(DELIVERY_SETTLE_S)
    exim1, pol1 = probe.read()
    n = len(messages)
    row = batch_figures(messages, sink)
    row.update(
        wall_s=round(wall, 3),
        msgs_per_s=round(n / wall, 2) if wall else None,
        cpu_ms_per_msg=round((exim1 - exim0 + pol1 - pol0) / n * 1e3, 2),
        exim_cpu_ms_per_msg=round((exim1 - exim0) / n * 1e3, 2),
        policy_cpu_ms_per_msg=round((pol1 - pol0) / n * 1e3, 2),
    )
    return row


def batch_figures(messages: list[Message], sink: Sink) -> dict[str, object]:
    """Per message of a batch: SMTP time, accepted → delivered, their sum, attempts."""
    smtp_ms, deliver_ms, total_ms = [], [], []
    errors = [m.error for m in messages if m.error]
    for m in messages:
        smtp_ms.append(m.smtp_s * 1e3)
        if m.last_key and m.last_key in sink.arrivals:
            d = (sink.arrivals[m.last_key] - m.accepted_at[m.last_key]) * 1e3
            deliver_ms.append(d)
            total_ms.append(m.smtp_s * 1e3 + d)
    return {
        "messages": len(messages),
        "smtp_ms_p50": _med(smtp_ms),
        "smtp_ms_mean": _mean(smtp_ms),
        "deliver_ms_p50": _med(deliver_ms),
        "deliver_ms_mean": _mean(deliver_ms),
        "total_ms_p50": _med(total_ms),
        "total_ms_mean": _mean(total_ms),
        "attempts_mean": _mean([float(m.attempts) for m in messages]),
        "undelivered": len(messages) - len(deliver_ms),
        "errors": errors[:5],
        "n_errors": len(errors),
    }


def _med(v: list[float]) -> float | None:
    m = stats.median(v)
    return None if m is None else round(m, 2)


def _mean(v: list[float]) -> float | None:
    return round(statistics.fmean(v), 2) if v else None


def new_messages(kind: str, rnd: int, n: int, k: int) -> list[Message]:
    """``n`` new messages (new triplets) with ``k`` recipients at sink.example each."""
    out = []
    for i in range(n):
        mid = f"{kind[:2]}{rnd}x{i}x{os.getpid()}"
        sender = f"news{i}-{rnd}@sender{i % 7}.{kind}.example"
        rcpts = [f"user{j}-{mid}@sink.example" for j in range(k)]
        out.append(Message(mid, sender, rcpts))
    return out

"""A steady load of real questions for the fault cases, and what every case asserts on it.

The load runs in a thread of its own, on its own event loop, so a case's body can block
(mount, kill, restart) while questions keep coming at a fixed rate. Each question is asked
as Exim's ``${readsocket}`` does: a new unix-socket connection, the request in one write, a
half-close, the answer read until the daemon closes. For each one the load records when it
was sent, how long it took and what came back (or how it failed). Every 0.25 s it also
samples the daemon's RSS and, for the embedded store, the size of the WAL file.

The questions (``mixed_question``): a new triplet, a retry of a triplet first asked
``RETRY_AFTER`` seconds earlier (it passes once the greylisting delay is over), and a client
of the whitelisted network (answered without the store), in turn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from support.policyd_process import rss_kib

#: Questions per second of the load: a busy small MX is far below; high enough that every
#: state of a fault lasting a fraction of a second is asked about many times.
RATE = 200.0
#: A question that has not been answered and closed after this long failed (Exim's own
#: readsocket timer in our snippets is 2 s).
EXIM_TIMEOUT = 2.0
#: The daemon's ``[server] deadline`` in every fault case (its default).
DEADLINE = 1.0
#: Room for a busy 2-core CI machine above the deadline, still inside Exim's 2 s timer.
DEADLINE_SLACK = 0.5
#: How often the RSS (and WAL) sampler looks.
SAMPLE_INTERVAL = 0.25
#: design.md §5: daemon RSS ≤ 64 MiB steady state under any load.
RSS_LIMIT_KIB = 64 * 1024
#: Issue #16: the WAL stays below 64 MiB whatever the load and the faults.
WAL_LIMIT_BYTES = 64 * 1024 * 1024
#: The network every fault case whitelists (``[greylist] whitelist_clients``).
WHITELISTED_NET = "192.0.2.0/24"
#: A retry in the mix repeats a triplet first asked this long before (more than the delay).
RETRY_AFTER = 1.5

GREYLISTED = b"defer 451 4.7.1 "
PASSED = b"ok passed"
WHITELISTED = b"ok whitelisted-client"
#: ``[server] fallback = "accept"`` (the default): the answer when the daemon cannot decide.
FALLBACK_PREFIX = b"ok fallback "


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def rcpt(ip: str, sender: str, recipient: str, txn: str = "") -> bytes:
    """An RCPT question as exim-snippets/rcpt.acl writes it."""
    return (
        f"rcpt v=1 ip={ip} port=25 helo_b64={b64('mx.example.net')} from_b64={b64(sender)} "
        f"rcpt_b64={b64(recipient)} auth_b64= nrcpt=1 txn={txn}\n"
    ).encode()


def new_triplet(n: int, tag: str = "", txn: str = "") -> bytes:
    """Triplet ``n``: its own client /24, sender and recipient (no auto-whitelisting). Each
    attempt is its own SMTP transaction (``txn``): a retry is a new one."""
    ip = f"10.{(n >> 8) & 255}.{n & 255}.{n % 200 + 1}"
    return rcpt(ip, f"s{n}{tag}@example.net", f"u{n}@test.example", txn=txn or f"t{tag}{n}")


def mixed_question(rate: float, tag: str = "") -> Callable[[int], bytes]:
    """Question ``i`` of the load: new, retry (of the new triplet RETRY_AFTER earlier) or
    whitelisted, in turn. ``tag`` keeps the triplets of two loads on one store apart."""
    lag = int(RETRY_AFTER * rate) // 3 * 3

    def question(i: int) -> bytes:
        kind = i % 3
        if kind == 2:
            return rcpt(f"192.0.2.{i % 250 + 1}", "w@example.net", "w@test.example")
        if kind == 1:
            first = i - 1 - lag
            return new_triplet(first if first >= 0 else 1_000_000 + i, tag, f"r{tag}{i}")
        return new_triplet(i, tag, f"n{tag}{i}")

    return question


@dataclass(slots=True)
class Sample:
    """One question: sent (monotonic, before connect), seconds to the close, the answer,
    and the failure if there was one (refused, reset, timeout)."""

    index: int
    request: bytes
    sent: float
    seconds: float = 0.0
    answer: bytes = b""
    error: str = ""


async def exchange(path: str, request: bytes, budget: float = EXIM_TIMEOUT) -> Sample:
    """One question; never raises for the daemon's failures (they are in ``error``).

    Connect, write and half-close happen in one step, without giving the loop a turn
    between them, as Exim's C code does: the daemon closes a connection that has not sent
    its request within ``[server] request_timeout`` (250 ms), and a client descheduled
    between its connect and its write on a loaded machine would be taken for an idle one."""
    loop = asyncio.get_running_loop()
    sample = Sample(-1, request, time.monotonic())
    received = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(budget):
                try:
                    sock.connect(path)
                except BlockingIOError:  # the daemon's backlog is full: wait for room
                    await loop.sock_connect(sock, path)
                sock.sendall(request)  # one small write: the socket buffer takes it
                sock.shutdown(socket.SHUT_WR)
                while chunk := await loop.sock_recv(sock, 65536):
                    received += chunk
            sample.answer = bytes(received)
        except TimeoutError:
            sample.error = "timeout"
        except OSError as exc:
            sample.error = type(exc).__name__
    sample.seconds = time.monotonic() - sample.sent
    return sample


def ask(path: str, request: bytes, budget: float = EXIM_TIMEOUT) -> Sample:
    """One question from synchronous test code."""
    return asyncio.run(exchange(path, request, budget))


@dataclass
class Gauge:
    """The daemon's RSS (KiB) and the WAL's size (bytes), sampled while the load runs."""

    at: float
    rss_kib: int
    wal_bytes: int


@dataclass
class Load:
    """``rate`` questions per second at ``path`` until stopped (see the module docstring)."""

    path: str
    question: Callable[[int], bytes]
    pid: Callable[[], int | None]
    wal: Path | None = None
    rate: float = RATE
    samples: list[Sample] = field(default_factory=list)
    gauges: list[Gauge] = field(default_factory=list)
    started: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # -- running ------------------------------------------------------------------------------

    def start(self) -> Load:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fault-load")
        self._thread.start()
        ready.wait(5.0)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # Every question ends by EXIM_TIMEOUT; the sampler at its next tick.
            self._thread.join(EXIM_TIMEOUT + 5.0)
            assert not self._thread.is_alive(), "the load did not stop"

    def _run(self, ready: threading.Event) -> None:
        asyncio.run(self._main(ready))

    async def _main(self, ready: threading.Event) -> None:
        pending: set[asyncio.Task[None]] = set()
        sampler = asyncio.create_task(self._sample_forever())
        self.started = time.monotonic()
        ready.set()
        index = 0
        while not self._stop.is_set():
            due = self.started + index / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            task = asyncio.create_task(self._one(index))
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
        if pending:
            await asyncio.wait(pending)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler

    async def _one(self, index: int) -> None:
        sample = await exchange(self.path, self.question(index))
        sample.index = index
        self.samples.append(sample)

    async def _sample_forever(self) -> None:
        while True:
            pid = self.pid()
            rss = 0
            if pid is not None:
                with contextlib.suppress(OSError, AssertionError):
                    rss = rss_kib(pid)
            wal = 0
            if self.wal is not None:
                with contextlib.suppress(OSError):
                    wal = self.wal.stat().st_size
            self.gauges.append(Gauge(time.monotonic(), rss, wal))
            await asyncio.sleep(SAMPLE_INTERVAL)

    # -- reading ------------------------------------------------------------------------------

    def between(self, first: float, last: float = float("inf")) -> list[Sample]:
        """The questions sent in [first, last), in the order they were sent."""
        chosen = [s for s in list(self.samples) if first <= s.sent < last]
        return sorted(chosen, key=lambda s: s.index)

    def wait_for(self, predicate: Callable[[Sample], bool], what: str, timeout: float) -> float:
        """Until a question sent from now on satisfies ``predicate``; when it was sent."""
        since = time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            for sample in self.between(since):
                if predicate(sample):
                    return sample.sent
            time.sleep(0.05)
        raise AssertionError(f"no question answered {what} within {timeout}s")


@contextlib.contextmanager
def running(load: Load) -> Iterator[Load]:
    """The load, started, and stopped at the end; the collector stays off meanwhile (a full
    collection in this process would show up as every question's latency)."""
    gc.collect()
    gc.disable()
    load.start()
    try:
        yield load
    finally:
        load.stop()
        gc.enable()


# --- what every case asserts ----------------------------------------------------------------


def describe(sample: Sample) -> str:
    what = sample.error or repr(sample.answer[:80])
    return f"question {sample.index} ({sample.seconds * 1000:.0f} ms): {what}"


def acceptable(answer: bytes) -> bool:
    """A real decision or the configured fallback: ``ok …`` or a temporary ``defer 4…``;
    never ``error``, never a 5xx, never nothing."""
    return answer.startswith(b"ok") or answer.startswith(b"defer 4")


def assert_every_question_answered(
    samples: list[Sample], limit: float = DEADLINE + DEADLINE_SLACK
) -> None:
    """Every question answered (no refusal, reset, timeout) within ``limit`` seconds with
    an answer no worse than the fallback."""
    assert samples, "no question was asked"
    failed = [s for s in samples if s.error or not acceptable(s.answer)]
    assert not failed, f"{len(failed)} of {len(samples)} failed; first: {describe(failed[0])}"
    slow = [s for s in samples if s.seconds > limit]
    assert not slow, (
        f"{len(slow)} of {len(samples)} slower than {limit}s; slowest: "
        f"{describe(max(slow, key=lambda s: s.seconds))}"
    )


def assert_bounded(load: Load) -> None:
    """RSS (and the WAL, for the embedded store) within their limits at every sample."""
    assert load.gauges, "no RSS sample"
    rss = max(g.rss_kib for g in load.gauges)
    assert 0 < rss <= RSS_LIMIT_KIB, f"RSS reached {rss} KiB (limit {RSS_LIMIT_KIB})"
    wal = max(g.wal_bytes for g in load.gauges)
    assert wal <= WAL_LIMIT_BYTES, f"WAL reached {wal} bytes (limit {WAL_LIMIT_BYTES})"


def assert_no_traceback(log: str) -> None:
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]

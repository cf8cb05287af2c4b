"""Load client that asks like Exim: one unix-socket connection per question.

Each question: connect, write the whole request in one write, ``shutdown(SHUT_WR)``, read
until EOF, close; the latency is measured from just before connect to EOF. Two engines:

- ``blocking`` (default): one process per asker, blocking sockets, exactly the shape of Exim,
  where every SMTP session is its own process doing a blocking ``readsocket``. Measured to be
  the cheapest Python client per question (see bench/README.md).
- ``async``: ``concurrency`` askers spread over ``procs`` processes, each an asyncio loop
  (uvloop when installed) using the Protocol API.

On a 2-core machine the client and the server share the cores; bench/README.md says what that
does to the figures.

    python3 bench/loadgen.py --socket /tmp/floor.sock -c 16 -d 5 [--engine async --procs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import Packed, Workload, generate

Requests = Sequence[bytes] | Packed

# Blocking askers use no socket timeout: SO_RCVTIMEO or settimeout() cost the client 10-25% of
# its throughput. Instead the parent gives a child this long past the end of the run, then
# kills it and counts its askers as "stuck" (Exim's own timer is 2s in our snippets).
STUCK_AFTER_S = 5.0
ENGINES = ("blocking", "async")

# Answers that mean "policyd gave up" (docs/protocol.md, [server] fallback).
FALLBACK_MARKERS = (b"ok fallback", b"defer 451 4.3.0 policy service busy")


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _json_number(v: object) -> object:
    """Floats rounded for reading; NaN (no data) as null, which JSON can hold."""
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 1)
    return v


def classify(answer: bytes) -> str:
    if not answer:
        return "empty"
    if answer.startswith(FALLBACK_MARKERS):
        return "fallback"
    verb = answer.split(b" ", 1)[0].split(b"\n", 1)[0]
    if verb in (b"ok", b"defer", b"reject", b"error"):
        return verb.decode()
    # Peers (bench/peers.py): greylistd's "--grey" answers true (greylisted) or false;
    # postgrey answers Postfix's "action=VERB ..." lines.
    if verb in (b"true", b"false"):
        return verb.decode()
    if verb.startswith(b"action="):
        return verb.split(b"\n", 1)[0].decode("ascii", "replace")[:40]
    return "other"


@dataclass
class LoadResult:
    """What one load run measured; latencies in microseconds."""

    target: str
    concurrency: int
    procs: int
    duration_s: float
    questions: int
    qps: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    mean_us: float
    errors: int  # connect/write/read failures (Exim would take its FAIL branch)
    answers: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    issued: int = 0  # all questions sent, warm-up and failures included
    next_index: int = 0  # where the next run should start in the workload to get fresh requests

    @property
    def fallbacks(self) -> int:
        return self.answers.get("fallback", 0)

    def to_dict(self) -> dict[str, object]:
        d = {k: _json_number(v) for k, v in asdict(self).items()}
        d["fallbacks"] = self.fallbacks
        return d


class _Question(asyncio.Protocol):
    """One Exim-like exchange: write, half-close, collect until the server closes."""

    __slots__ = ("_chunks", "_done", "_request")

    def __init__(self, request: bytes, done: asyncio.Future[bytes]) -> None:
        self._request = request
        self._done = done
        self._chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self._request)  # type: ignore[attr-defined]
        transport.write_eof()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)

    def eof_received(self) -> None:
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done.done():
            return
        if exc is not None:
            self._done.set_exception(exc)
        else:
            self._done.set_result(b"".join(self._chunks))


@dataclass
class _Partial:
    latencies: array  # type: ignore[type-arg]
    answers: dict[str, int]
    error_kinds: dict[str, int]
    max_n: int  # most questions one asker sent
    issued: int = 0  # questions sent, warm-up and failures included (for CPU per question)


async def _ask_loop(
    path: str,
    requests: Requests,
    first: int,
    stride: int,
    t_measure: float,
    t_stop: float,
    out: _Partial,
) -> None:
    loop = asyncio.get_running_loop()
    lat = out.latencies
    answers = out.answers
    n_req = len(requests)
    clock = time.perf_counter
    n = 0
    while True:
        t0 = clock()
        if t0 >= t_stop:
            break
        request = requests[(first + n * stride) % n_req]
        n += 1
        done: asyncio.Future[bytes] = loop.create_future()
        try:
            await loop.create_unix_connection(lambda r=request, d=done: _Question(r, d), path)
            answer = await done
        except OSError as exc:
            kind = type(exc).__name__
            out.error_kinds[kind] = out.error_kinds.get(kind, 0) + 1
            continue
        if t0 >= t_measure:
            lat.append(int((clock() - t0) * 1e9))
            kind = classify(answer)
            answers[kind] = answers.get(kind, 0) + 1
    out.max_n = max(out.max_n, n)
    out.issued += n


def _blocking_loop(
    path: str,
    requests: Requests,
    first: int,
    stride: int,
    t_measure: float,
    t_stop: float,
    out: _Partial,
) -> None:
    """One Exim process: blocking connect, one write, half-close, read to EOF, close."""
    lat = out.latencies
    answers = out.answers
    n_req = len(requests)
    clock = time.perf_counter
    n = 0
    while True:
        t0 = clock()
        if t0 >= t_stop:
            break
        request = requests[(first + n * stride) % n_req]
        n += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        chunks = []
        try:
            sock.connect(path)
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        except OSError as exc:
            kind = type(exc).__name__
            out.error_kinds[kind] = out.error_kinds.get(kind, 0) + 1
            continue
        finally:
            sock.close()
        if t0 >= t_measure:
            lat.append(int((clock() - t0) * 1e9))
            kind = classify(b"".join(chunks))
            answers[kind] = answers.get(kind, 0) + 1
    out.max_n = max(out.max_n, n)
    out.issued += n


def _framed_loop(
    path: str,
    requests: Requests,
    first: int,
    stride: int,
    t_measure: float,
    t_stop: float,
    out: _Partial,
    terminator: bytes,
    persistent: bool,
) -> None:
    """Blocking asker for protocols whose answer ends with ``terminator`` (Postfix policy
    delegation: a blank line). Connection per question (connect, write, read to the
    terminator, close) or ``persistent`` (one connection reused, as Postfix does)."""
    lat = out.latencies
    answers = out.answers
    n_req = len(requests)
    clock = time.perf_counter
    n = 0
    sock: socket.socket | None = None
    while True:
        t0 = clock()
        if t0 >= t_stop:
            break
        request = requests[(first + n * stride) % n_req]
        n += 1
        buf = b""
        try:
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
            sock.sendall(request)
            while not buf.endswith(terminator):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionResetError("closed before the end of the answer")
                buf += chunk
        except OSError as exc:
            kind = type(exc).__name__
            out.error_kinds[kind] = out.error_kinds.get(kind, 0) + 1
            if sock is not None:
                sock.close()
                sock = None
            continue
        if not persistent:
            sock.close()
            sock = None
        if t0 >= t_measure:
            lat.append(int((clock() - t0) * 1e9))
            kind = classify(buf)
            answers[kind] = answers.get(kind, 0) + 1
    if sock is not None:
        sock.close()
    out.max_n = max(out.max_n, n)
    out.issued += n


def _measure_window(t_start: float, warmup: float, duration: float) -> tuple[float, float]:
    """Sleep until the shared start time; return (t_measure, t_stop) on the perf_counter clock."""
    delay = t_start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    base = time.perf_counter() - time.monotonic()  # the same clock on Linux; re-base anyway
    return t_start + warmup + base, t_start + warmup + duration + base


async def _run_askers(
    path: str,
    requests: Requests,
    asker_ids: range,
    stride: int,
    start_index: int,
    window: tuple[float, float],
) -> _Partial:
    out = _Partial(array("q"), {}, {}, 0)
    await asyncio.gather(
        *(
            _ask_loop(path, requests, start_index + a, stride, window[0], window[1], out)
            for a in asker_ids
        )
    )
    return out


def _askers(
    engine: str,
    path: str,
    requests: Requests,
    asker_ids: range,
    stride: int,
    start_index: int,
    t_start: float,
    warmup: float,
    duration: float,
    terminator: bytes | None = None,
    persistent: bool = False,
) -> _Partial:
    """Run some askers in this process with the chosen engine."""
    window = _measure_window(t_start, warmup, duration)
    if terminator is not None:
        out = _Partial(array("q"), {}, {}, 0)
        for a in asker_ids:
            _framed_loop(
                path,
                requests,
                start_index + a,
                stride,
                window[0],
                window[1],
                out,
                terminator,
                persistent,
            )
        return out
    if engine == "blocking":
        out = _Partial(array("q"), {}, {}, 0)
        for a in asker_ids:  # one asker per process with this engine
            _blocking_loop(path, requests, start_index + a, stride, window[0], window[1], out)
        return out
    install_uvloop()
    return asyncio.run(_run_askers(path, requests, asker_ids, stride, start_index, window))


def _child(conn: multiprocessing.connection.Connection, *args: object) -> None:
    part = _askers(*args)  # type: ignore[arg-type]
    conn.send((part.latencies.tobytes(), part.answers, part.error_kinds, part.max_n, part.issued))
    conn.close()


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values), max(1, math.ceil(q * len(sorted_values) / 100 - 1e-9))) - 1
    return float(sorted_values[k])


def summarise(
    target: str,
    concurrency: int,
    procs: int,
    duration: float,
    parts: list[_Partial],
    start_index: int,
) -> LoadResult:
    lat: list[int] = []
    answers: dict[str, int] = {}
    error_kinds: dict[str, int] = {}
    max_n = 0
    for p in parts:
        lat.extend(p.latencies)
        for k, v in p.answers.items():
            answers[k] = answers.get(k, 0) + v
        for k, v in p.error_kinds.items():
            error_kinds[k] = error_kinds.get(k, 0) + v
        max_n = max(max_n, p.max_n)
    lat.sort()
    us = 1e-3
    return LoadResult(
        target=target,
        concurrency=concurrency,
        procs=procs,
        duration_s=duration,
        questions=len(lat),
        qps=len(lat) / duration,
        p50_us=percentile(lat, 50) * us,
        p90_us=percentile(lat, 90) * us,
        p99_us=percentile(lat, 99) * us,
        p999_us=percentile(lat, 99.9) * us,
        max_us=(lat[-1] * us) if lat else float("nan"),
        mean_us=(sum(lat) / len(lat) * us) if lat else float("nan"),
        errors=sum(error_kinds.values()),
        answers=answers,
        error_kinds=error_kinds,
        issued=sum(p.issued for p in parts),
        next_index=start_index + max_n * concurrency,
    )


def run_load(
    path: str,
    requests: Requests,
    *,
    concurrency: int,
    duration: float,
    warmup: float = 0.25,
    engine: str = "blocking",
    procs: int = 1,
    start_index: int = 0,
    target: str = "",
    terminator: bytes | None = None,
    persistent: bool = False,
) -> LoadResult:
    """Run ``concurrency`` askers for ``warmup + duration`` seconds; measure the last part.

    Asker ``g`` sends ``requests[start_index + g + n*concurrency]`` (wrapping), so successive
    runs given the previous ``next_index`` see requests the server has not seen yet. With the
    ``blocking`` engine every asker is a process; with ``async`` they share ``procs`` processes.

    With ``terminator`` (peers speaking the Postfix policy protocol) the askers are blocking
    processes that read each answer up to ``terminator`` instead of EOF, on a new connection
    per question, or on one kept open when ``persistent``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if terminator is not None:
        engine = "blocking"
    elif persistent:
        raise ValueError("persistent connections need a terminator to frame the answers")
    procs = concurrency if engine == "blocking" else max(1, min(procs, concurrency))
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    # Forked children share the workload copy-on-write; give them time to start.
    t_start = time.monotonic() + 0.05 + 0.005 * procs
    ctx = multiprocessing.get_context("fork")
    gc.freeze()  # keep the children's collector off the parent's objects (no COW copies)
    children = []
    lo = 0
    for count in per:
        parent_end, child_end = ctx.Pipe(duplex=False)
        args = (engine, path, requests, range(lo, lo + count), concurrency, start_index)
        proc = ctx.Process(
            target=_child,
            args=(child_end, *args, t_start, warmup, duration, terminator, persistent),
        )
        proc.start()
        child_end.close()
        children.append((proc, parent_end))
        lo += count
    parts = []
    deadline = t_start + warmup + duration + STUCK_AFTER_S
    for proc, conn in children:
        if conn.poll(max(0.0, deadline - time.monotonic())):
            raw, answers, error_kinds, max_n, issued = conn.recv()
            lat = array("q")
            lat.frombytes(raw)
            parts.append(_Partial(lat, answers, error_kinds, max_n, issued))
        else:
            proc.kill()
            parts.append(_Partial(array("q"), {}, {"stuck": 1}, 0))
        proc.join(timeout=STUCK_AFTER_S)
    return summarise(target or path, concurrency, procs, duration, parts, start_index)


def format_result(r: LoadResult) -> str:
    ans = " ".join(f"{k}={v}" for k, v in sorted(r.answers.items()))
    return (
        f"{r.target} c={r.concurrency} procs={r.procs}: {r.qps:,.0f} q/s  "
        f"p50={r.p50_us:.0f}µs p90={r.p90_us:.0f}µs p99={r.p99_us:.0f}µs "
        f"p99.9={r.p999_us:.0f}µs max={r.max_us:.0f}µs  errors={r.errors} [{ans}]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=0.25, help="seconds not measured")
    parser.add_argument("--engine", choices=ENGINES, default="blocking")
    parser.add_argument("--procs", type=int, default=1, help="client processes (async engine)")
    parser.add_argument("--size", type=int, default=100_000, help="distinct questions")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--newline", action="store_true", help="end requests with \\n")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    wl: Workload = generate(args.size, args.seed, eol=args.newline)
    res = run_load(
        args.socket,
        wl.packed(),
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        engine=args.engine,
        procs=args.procs,
    )
    if args.json:
        print(json.dumps({"workload": wl.counts(), "result": res.to_dict()}, indent=2))
    else:
        print(format_result(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

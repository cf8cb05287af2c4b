"""The paced asker: one Exim-like asker with a pause between questions.

Under Exim at a small host's load the daemon mostly sleeps between questions; a question
then costs more than under a closed loop (cold caches, a write transaction of its own).
bench/run.py runs this after its closed-loop rounds (``--paced-gap``, 5 ms by default),
against every target that answers one question per connection, in paired rounds.
"""

from __future__ import annotations

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loadgen import Requests, classify, percentile

#: A server that does not answer within this long counts as an error (Exim's own timer
#: in our snippets is 2 s, POLICYD_TIMEOUT).
ASK_TIMEOUT_S = 2.0


def ask(path: str, request: bytes) -> bytes:
    """One Exim-like question: connect, write, half-close, read to EOF."""
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        # A timeout costs throughput, not latency: fine for a paced asker.
        sock.settimeout(ASK_TIMEOUT_S)
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def run_paced(
    path: str, requests: Requests, *, start: int, count: int, gap_s: float
) -> dict[str, object]:
    """``count`` questions from ``requests[start:]``, ``gap_s`` apart (pause after each
    answer); latency percentiles in µs, the answers, and where the next run starts."""
    latencies: list[int] = []
    answers: dict[str, int] = {}
    errors = 0
    clock = time.perf_counter
    for i in range(count):
        request = requests[(start + i) % len(requests)]
        t0 = clock()
        try:
            kind = classify(ask(path, request))
        except OSError:
            errors += 1
        else:
            latencies.append(int((clock() - t0) * 1e9))
            answers[kind] = answers.get(kind, 0) + 1
        time.sleep(gap_s)
    latencies.sort()
    return {
        "questions": len(latencies),
        "gap_ms": round(gap_s * 1e3, 3),
        **{
            f"p{q}_us": round(percentile(latencies, q) / 1e3, 1) if latencies else None
            for q in (50, 90, 99)
        },
        "answers": answers,
        "errors": errors,
        "next_index": start + count,
    }

"""What the daemon's log writes at a fixed question rate, default settings (stderr).

One daemon from a source tree (``--tree``, default this checkout; give an older tree, e.g.
``git archive main | tar -x -C /tmp/before``, for a before/after), one paced asker on its
Unix socket for ``--duration`` seconds at ``--rate`` questions per second. Two mixes:

- ``known``: every question is a triplet the store already passed (the daily bulk of a
  small MX: decisions that change nothing). The triplets are asked once, then passed with
  the admin socket's ``greylist.pass``, before the measured window.
- ``workload``: bench/workload.py's mix (60 % new triplets, 30 % early retries, 10 %
  whitelisted clients): nearly every question is a greylist defer.

    python3 bench/logvolume.py [--tree DIR] [--mix known|workload] [--rate 2000]
                               [--duration 20]

Prints JSON: bytes written to stderr in the window, per question, and MB per minute.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
from workload import distinct_triplets, format_request, generate

#: Distinct triplets of the ``known`` mix (asked round-robin).
KNOWN_TRIPLETS = 2_000


def ask(path: str, request: bytes) -> bytes:
    """One Exim-like question: connect, write, half-close, read to EOF."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        while chunk := sock.recv(4096):
            answer += chunk
    return bytes(answer)


def admin(path: str, command: dict[str, object]) -> object:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(json.dumps(command).encode() + b"\n")
        reply = sock.makefile("rb").readline()
    return json.loads(reply)


def paced(path: str, requests: list[bytes], rate: float, duration: float) -> int:
    """Ask round-robin at ``rate`` per second for ``duration`` seconds; questions asked."""
    interval = 1.0 / rate
    start = time.perf_counter()
    count = int(rate * duration)
    for number in range(count):
        ahead = start + number * interval - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        ask(path, requests[number % len(requests)])
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=servers.REPO_DIR)
    parser.add_argument("--mix", choices=("known", "workload"), default="known")
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="policyd-logvolume-") as tmp:
        workdir = Path(tmp)
        config = servers.policyd_config(workdir)
        server = servers.start_policyd(workdir, config, tree=args.tree)
        try:
            if args.mix == "known":
                triplets = distinct_triplets(KNOWN_TRIPLETS)
                requests = [format_request(t, txn=f"k-{i}") for i, t in enumerate(triplets)]
                for request in requests:
                    ask(server.socket, request)
                admin(str(workdir / "policyd-admin.sock"), {"cmd": "greylist.pass", "all": True})
                # New transactions: the first ones were deferred (multi_recipient = "first").
                requests = [format_request(t, txn=f"m-{i}") for i, t in enumerate(triplets)]
            else:
                requests = generate(int(args.rate * args.duration)).requests
            before = server.log.stat().st_size
            started = time.perf_counter()
            asked = paced(server.socket, requests, args.rate, args.duration)
            elapsed = time.perf_counter() - started
            time.sleep(0.2)  # the decision log's batch (20 ms) is out
            written = server.log.stat().st_size - before
            sample = server.log.read_text(errors="replace").splitlines()[-1:]
        finally:
            servers.stop(server)
    report = {
        "tree": str(args.tree),
        "mix": args.mix,
        "questions": asked,
        "rate_asked": round(args.rate),
        "rate_achieved": round(asked / elapsed),
        "bytes": written,
        "bytes_per_question": round(written / asked, 1),
        "mb_per_minute": round(written / elapsed * 60 / 1e6, 2),
        "last_line": sample,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

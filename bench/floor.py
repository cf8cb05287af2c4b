"""The floor: a do-nothing asyncio server that answers ``ok`` to every question.

To a question that says ``skipdata=1`` (the shipped RCPT fragments) it answers
``ok`` + ``skipdata``, as policyd does with its default configuration (no DATA-stage rule):
behind the fragments, the floor then asks what policyd asks (docs/protocol.md).

It speaks the same connection shape as policyd (read until EOF or a newline, answer, close)
with the fastest plain-Python stack we have: uvloop when installed, the Protocol API, no
parsing. Whatever policyd costs above this server is the price of its own work.

    python3 bench/floor.py --socket /tmp/floor.sock [--stdlib-loop]

Runs in the foreground until SIGTERM or SIGINT, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

ANSWER = b"ok"
#: policyd's answer to an accepted ``skipdata=1`` question when DATA decides nothing.
SKIP_DATA_ASK = b" skipdata=1"
SKIP_DATA_ANSWER = b"ok\nskipdata"
# Same bound as policyd's default ``max_request_bytes``: a runaway client cannot grow a buffer.
MAX_REQUEST_BYTES = 4096


class FloorProtocol(asyncio.Protocol):
    """Collects bytes until EOF or newline, answers once, closes."""

    __slots__ = ("_answered", "_buf", "_transport")
    #: ``--answer``: one fixed answer to every question instead (e.g. greylistd's ``false``).
    fixed: bytes | None = None

    def __init__(self) -> None:
        self._buf = b""
        self._answered = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if b"\n" in data or len(self._buf) > MAX_REQUEST_BYTES:
            self._answer()

    def eof_received(self) -> bool:
        self._answer()
        return False

    def _answer(self) -> None:
        if self._answered or self._transport is None:
            return
        self._answered = True
        if self.fixed is not None:
            self._transport.write(self.fixed)
        else:
            self._transport.write(SKIP_DATA_ANSWER if SKIP_DATA_ASK in self._buf else ANSWER)
        self._transport.close()


def install_loop(stdlib: bool) -> str:
    """Use uvloop unless told not to (or it is missing); return the loop's name."""
    if stdlib:
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await loop.create_unix_server(FloorProtocol, path, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--stdlib-loop", action="store_true", help="do not use uvloop")
    parser.add_argument("--answer", help="answer this to every question (e.g. false)")
    args = parser.parse_args(argv)
    if args.answer is not None:
        FloorProtocol.fixed = args.answer.encode()
    loop_name = install_loop(args.stdlib_loop)
    print(f"floor: {loop_name} Protocol server on {args.socket}", file=sys.stderr)
    asyncio.run(serve(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())

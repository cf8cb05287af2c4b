"""Integration fixtures: an Exim-like client, the real server in-process, the daemon as a
subprocess, and the golden request → answer table.

The client asks the way Exim's ``${readsocket}`` does: one connection per question, write
the request, shut the write side down, read the answer until the daemon closes. Every read
has a timeout, so a daemon that hangs fails the test instead of stalling the run.
Sockets live in ``tmp_path``; TCP listeners bind port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# tests/ on the path: tests/support/ is shared with tests/faults and tests/contract.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.policyd_process import (
    ANSWER_TIMEOUT,
    REPO,
    DaemonFactory,
    daemons,
    server_mapping,
)

from policyd.config import Config, from_mapping
from policyd.dispatch import Dispatcher
from policyd.server import PolicyServer
from policyd.stores import Store, open_store

GOLDEN = REPO / "tests" / "data" / "golden.tsv"
#: A first line as docs/protocol.md defines it, then header lines (continuations start
#: with a tab); printable ASCII only, no trailing newline.
WELL_FORMED = re.compile(
    rb"(ok( [\x21-\x7e][\x20-\x7e]*)?"
    rb"|defer 4\d\d 4\.\d{1,3}\.\d{1,3} [\x20-\x7e]+"
    rb"|reject 5\d\d 5\.\d{1,3}\.\d{1,3} [\x20-\x7e]+"
    rb"|error [\x20-\x7e]+)"
    rb"(\n\t?[\x21-\x7e][\x20-\x7e]*)*"
)

# --- the golden table -----------------------------------------------------------------------


@dataclass(frozen=True)
class GoldenRow:
    line: int
    request: bytes
    answer: bytes

    def __str__(self) -> str:
        return f"golden.tsv:{self.line} {self.request[:60]!r}"


def unescape(field_text: str) -> bytes:
    return field_text.encode("ascii").decode("unicode_escape").encode("latin-1")


def load_golden(path: Path = GOLDEN) -> tuple[dict[str, Any], list[GoldenRow]]:
    """The config the table assumes (its ``# config:`` line) and its rows."""
    config: dict[str, Any] | None = None
    rows: list[GoldenRow] = []
    for number, line in enumerate(path.read_text("ascii").splitlines(), 1):
        if line.startswith("# config:"):
            config = json.loads(line.removeprefix("# config:"))
        elif line and not line.startswith("#"):
            request, answer = line.split("\t")
            rows.append(GoldenRow(number, unescape(request), unescape(answer)))
    assert config is not None, f"{path}: no '# config:' line"
    return config, rows


GOLDEN_CONFIG, GOLDEN_ROWS = load_golden()


# --- the server in-process ------------------------------------------------------------------


@dataclass
class RunningServer:
    """A PolicyServer with its dispatcher and store, wired as daemon.py wires them."""

    config: Config
    store: Store
    dispatcher: Dispatcher
    server: PolicyServer

    @property
    def socket(self) -> str:
        return self.config.server.socket

    @property
    def tcp(self) -> tuple[str, int]:
        port = self.server.tcp_port()
        assert port is not None, "no TCP listener"
        return ("127.0.0.1", port)

    # The server has no public event for these states; polling, bounded by ANSWER_TIMEOUT.
    async def wait_until_open(self, count: int) -> None:
        """Until the server has accepted ``count`` connections."""
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while len(self.server.open_connections) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    async def wait_idle(self) -> None:
        """Until the server holds no connection (closing is asynchronous on its side)."""
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while self.server.open_connections:  # noqa: ASYNC110
                await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running_server(root: Path, **sections: dict[str, Any]) -> AsyncIterator[RunningServer]:
    """Build, start, and finally stop and close; usable on any event loop."""
    config = from_mapping(server_mapping(root, sections), "<test>")
    store = await open_store(config.store)
    try:
        dispatcher = Dispatcher(config, store)
        server = PolicyServer(config.server, dispatcher.answer, dispatcher.fallback)
        await server.start()
        try:
            yield RunningServer(config, store, dispatcher, server)
        finally:
            await server.stop(drain_timeout=1.0)
    finally:
        await store.aclose()


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def server_factory(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """``await server_factory(server={...}, greylist={...})`` → a started server; every
    server is stopped and its store closed at teardown."""
    numbers = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def make(**sections: dict[str, Any]) -> RunningServer:
            root = tmp_path / f"server{next(numbers)}"
            return await stack.enter_async_context(running_server(root, **sections))

        yield make


# --- the daemon as a subprocess: tests/support/policyd_process.py ---------------------------


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """``daemon_factory(name, greylist={...})`` → a DaemonProcess with its config written
    (not started); any process still running at teardown is killed."""
    with daemons(tmp_path) as make:
        yield make

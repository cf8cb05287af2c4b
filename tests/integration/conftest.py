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
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from policyd.config import Config, from_mapping
from policyd.dispatch import Dispatcher
from policyd.server import PolicyServer
from policyd.stores import Store, open_store

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "golden.tsv"
#: Far above every deadline used here: reaching it means the daemon hung.
ANSWER_TIMEOUT = 5.0
#: Start-up of a subprocess daemon (interpreter, imports, SQLite, bind).
START_TIMEOUT = 10.0
#: A first line as docs/protocol.md defines it, then header lines (continuations start
#: with a tab); printable ASCII only, no trailing newline.
WELL_FORMED = re.compile(
    rb"(ok( [\x21-\x7e][\x20-\x7e]*)?"
    rb"|defer 4\d\d 4\.\d{1,3}\.\d{1,3} [\x20-\x7e]+"
    rb"|reject 5\d\d 5\.\d{1,3}\.\d{1,3} [\x20-\x7e]+"
    rb"|error [\x20-\x7e]+)"
    rb"(\n\t?[\x21-\x7e][\x20-\x7e]*)*"
)

Address = str | tuple[str, int]


# --- the Exim-like client -------------------------------------------------------------------


class Question:
    """One connection driven step by step: connect, send (in chunks), then read the answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, address: Address) -> Question:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes, chunk: int | None = None) -> None:
        """Write ``data``; with ``chunk``, in pieces the server reads one at a time."""
        loop = asyncio.get_running_loop()
        step = chunk or max(1, len(data))
        for start in range(0, len(data), step):
            await loop.sock_sendall(self.sock, data[start : start + step])
            if chunk:
                # Two loop iterations: the server's read callback runs before the next piece.
                await asyncio.sleep(0)
                await asyncio.sleep(0)

    async def answer(self, *, half_close: bool = True) -> bytes:
        """Everything the server writes until it closes (after our half-close, if asked)."""
        loop = asyncio.get_running_loop()
        if half_close:
            self.sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := await loop.sock_recv(self.sock, 65536):
            received += chunk
        return bytes(received)

    def close(self) -> None:
        self.sock.close()


async def ask(
    address: Address,
    request: bytes,
    *,
    chunk: int | None = None,
    half_close: bool = True,
) -> bytes:
    """One question as Exim asks it; fails the test if the answer and the close do not come
    within ANSWER_TIMEOUT."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            question = await Question.connect(address)
            try:
                await question.send(request, chunk)
                return await question.answer(half_close=half_close)
            finally:
                question.close()
    except TimeoutError:
        pytest.fail(f"no answer (or no close) within {ANSWER_TIMEOUT}s for {request[:80]!r}")


def ask_blocking(address: Address, request: bytes, **kwargs: Any) -> bytes:
    """``ask`` for synchronous tests (the daemon runs in another process)."""
    return asyncio.run(ask(address, request, **kwargs))


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


def server_mapping(root: Path, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``sections`` with the socket and the SQLite file placed under ``root``."""
    raw = {name: dict(body) for name, body in sections.items()}
    raw.setdefault("server", {}).setdefault("socket", str(root / "policyd.sock"))
    raw.setdefault("store", {}).setdefault("url", f"sqlite://{root / 'state.sqlite3'}")
    return raw


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


# --- the daemon as a subprocess -------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = ANSWER_TIMEOUT) -> None:
    """Poll ``predicate`` (another process changes state: nothing to wait on but time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout}s")
        time.sleep(0.02)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in body.items())
        lines.append("")
    return "\n".join(lines)


@dataclass
class DaemonProcess:
    """``python -m policyd --config FILE`` in its own directory, with stderr in a file."""

    directory: Path
    process: subprocess.Popen[bytes] | None = None
    stderr_offset: int = field(default=0)

    @property
    def config_path(self) -> Path:
        return self.directory / "policyd.toml"

    @property
    def socket(self) -> str:
        return str(self.directory / "policyd.sock")

    @property
    def stderr_path(self) -> Path:
        return self.directory / "stderr.log"

    def write_config(self, **sections: dict[str, Any]) -> None:
        """Write the config file. Socket, store and admin socket default to this daemon's
        directory, the metrics exporter to a free port: nothing shared between tests."""
        raw = server_mapping(self.directory, sections)
        raw.setdefault("metrics", {}).setdefault("listen", "127.0.0.1:0")
        raw.setdefault("admin", {}).setdefault("socket", str(self.directory / "admin.sock"))
        self.config_path.write_text(to_toml(raw))

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "policyd", "--config", str(self.config_path), *args]

    @staticmethod
    def environment() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def launch(self) -> None:
        """Spawn the process (``start`` also waits until it accepts)."""
        assert self.process is None, "already running"
        self.stderr_offset = len(self.stderr())
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.directory,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def start(self) -> None:
        """Spawn and wait until the socket accepts."""
        self.launch()
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not self.accepting():
            if self.process.poll() is not None:
                pytest.fail(f"policyd exited with {self.process.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"policyd did not accept within {START_TIMEOUT}s:\n{self.stderr()}")
            time.sleep(0.02)

    def accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket)
            except OSError:
                return False
        return True

    def send_signal(self, signum: int) -> None:
        assert self.process is not None, "not running"
        self.process.send_signal(signum)  # by PID, to our own child only

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        self.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = ANSWER_TIMEOUT) -> int:
        """The exit status once the process ends; killed (and the test failed) after
        ``timeout``."""
        assert self.process is not None, "not running"
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"policyd still running after {timeout}s:\n{self.stderr()}")
        self.process = None
        return code

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_since_start(self) -> str:
        return self.stderr()[self.stderr_offset :]

    def log_mark(self) -> int:
        """A position in stderr, for ``wait_for_log(..., since=mark)``."""
        return len(self.stderr())

    def wait_for_log(self, text: str, since: int | None = None, timeout: float = 5.0) -> str:
        """Until ``text`` appears in stderr after ``since`` (default: the last start)."""
        start = self.stderr_offset if since is None else since
        deadline = time.monotonic() + timeout
        while text not in (log := self.stderr()[start:]):
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not logged within {timeout}s:\n{log}")
            time.sleep(0.02)
        return log

    def kill(self) -> None:
        if self.process is not None:
            process, self.process = self.process, None
            if process.poll() is None:
                process.kill()
            process.wait()


DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """``daemon_factory(name, greylist={...})`` → a DaemonProcess with its config written
    (not started); any process still running at teardown is killed."""
    made: list[DaemonProcess] = []

    def make(name: str = "policyd", **sections: dict[str, Any]) -> DaemonProcess:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        daemon = DaemonProcess(directory)
        daemon.write_config(**sections)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()

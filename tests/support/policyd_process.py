"""The daemon as operators run it, for tests: ``python -m policyd --config FILE`` as a
subprocess in its own directory, its config written from Python mappings, and the admin socket
``policyctl`` talks to.

Shared by tests/integration and tests/faults (as ``redis_server.py`` and ``dns_server.py``
are): every process is ours, signalled by its PID, killed at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Far above every deadline used in tests: reaching it means the daemon hung.
ANSWER_TIMEOUT = 5.0
#: Start-up of a subprocess daemon (interpreter, imports, SQLite, bind).
START_TIMEOUT = 10.0


def server_mapping(root: Path, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``sections`` with the socket and the SQLite file placed under ``root``."""
    raw = {name: dict(body) for name, body in sections.items()}
    raw.setdefault("server", {}).setdefault("socket", str(root / "policyd.sock"))
    raw.setdefault("store", {}).setdefault("url", f"sqlite://{root / 'state.sqlite3'}")
    return raw


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


@contextlib.contextmanager
def daemons(root: Path) -> Iterator[DaemonFactory]:
    """``make(name, greylist={...})`` → a DaemonProcess under ``root`` with its config
    written (not started); any process still running on exit is killed."""
    made: list[DaemonProcess] = []

    def make(name: str = "policyd", **sections: dict[str, Any]) -> DaemonProcess:
        directory = root / name
        directory.mkdir(exist_ok=True)
        daemon = DaemonProcess(directory)
        daemon.write_config(**sections)
        made.append(daemon)
        return daemon

    try:
        yield make
    finally:
        for daemon in made:
            daemon.kill()


# --- the admin socket (what policyctl sends) -------------------------------------------------


def admin(path: str, request: dict[str, Any]) -> Any:
    """One policyctl request on the admin socket; the result, or the test fails."""
    reply = admin_reply(path, request)
    assert reply["ok"], reply
    return reply["result"]


def admin_reply(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One policyctl request on the admin socket; the whole reply, failed or not."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    reply: dict[str, Any] = json.loads(answer)
    return reply


def rss_kib(pid: int) -> int:
    """The resident set of process ``pid`` (VmRSS), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")

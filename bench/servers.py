"""Start and stop the servers under test (policyd, the floor) and read their /proc figures.

Both run as subprocesses in a temporary directory; readiness is "the socket accepts a
connection", polled a bounded number of times. CPU comes from ``/proc/PID/stat`` (utime +
stime, all threads) and memory from ``/proc/PID/status`` (VmRSS, VmHWM).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workload import WHITELIST_CIDRS

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


@dataclass
class Server:
    """A running server under test."""

    name: str
    socket: str
    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU of the process (all its threads) so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def memory_kib(self) -> dict[str, int]:
        """VmRSS, VmHWM (peak RSS) and friends, in KiB."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmData", "Threads"):
                    out[key] = int(value.split()[0])
        return out

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def policyd_config(
    workdir: Path,
    *,
    db_path: Path | None = None,
    deadline: str = "1s",
    max_connections: int = 256,
    log_level: str | None = None,
) -> Path:
    """The bench config: the brief's settings, our whitelist, files in ``workdir``."""
    db = db_path or workdir / "state.sqlite3"
    wl = ", ".join(f'"{c}"' for c in WHITELIST_CIDRS)
    level = f'log_level = "{log_level}"\n' if log_level else ""
    text = (
        "[server]\n"
        f'socket = "{workdir / "policyd.sock"}"\n'
        'socket_mode = "0600"\n'
        f'deadline = "{deadline}"\n'
        f"max_connections = {max_connections}\n"
        f"{level}"
        "\n[store]\n"
        f'url = "sqlite://{db}"\n'
        "\n[greylist]\n"
        'delay = "5m"\n'
        "auto_whitelist_after = 5\n"
        f"whitelist_clients = [{wl}]\n"
        "learn = false\n"
    )
    path = workdir / "policyd.toml"
    path.write_text(text)
    return path


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _spawn(name: str, argv: list[str], sock: str, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(  # our own interpreter and files
            argv,
            cwd=REPO_DIR,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            preexec_fn=_raise_nofile,  # noqa: PLW1509  # no threads in the bench parent yet
        )
    server = Server(name, sock, proc, log, workdir)
    wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll until the socket accepts a connection; fail early if the process died."""
    step = 0.05
    for _ in range(int(timeout / step)):
        if not server.alive():
            raise RuntimeError(f"{server.name} exited early:\n{server.log_tail()}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(server.socket)
        except OSError:
            time.sleep(step)
            continue
        finally:
            probe.close()
        return
    stop(server)
    raise RuntimeError(f"{server.name} not ready after {timeout}s:\n{server.log_tail()}")


def start_floor(workdir: Path, *, stdlib_loop: bool = False, name: str = "floor") -> Server:
    sock = str(workdir / f"{name}.sock")
    argv = [sys.executable, str(BENCH_DIR / "floor.py"), "--socket", sock]
    if stdlib_loop:
        argv.append("--stdlib-loop")
    return _spawn(name, argv, sock, workdir)


def start_policyd(workdir: Path, config: Path) -> Server:
    sock = str(workdir / "policyd.sock")
    argv = [sys.executable, "-m", "policyd", "--config", str(config)]
    return _spawn("policyd", argv, sock, workdir)


def stop(server: Server) -> int | None:
    """SIGTERM, wait, then SIGKILL this one process; returns its exit code."""
    if server.alive():
        server.proc.send_signal(signal.SIGTERM)
        try:
            return server.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.proc.kill()
    return server.proc.wait(STOP_TIMEOUT_S)

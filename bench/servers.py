"""Start and stop the servers under test (policyd, the floor, a private redis-server) and
read their /proc figures.

All run as subprocesses in a temporary directory; readiness is "the socket accepts a
connection" (for Redis: answers PING), polled a bounded number of times. CPU comes from
``/proc/PID/stat`` (utime + stime, all threads) and memory from ``/proc/PID/status`` (VmRSS,
VmHWM). The redis-server is the bench's own: a Unix socket in the temporary directory,
``port 0`` (no TCP at all), no persistence, stopped by its PID; never the machine's Redis.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from workload import WHITELIST_CIDRS

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
REDIS_SERVER = "redis-server"
#: The interpreter the servers under test (floor.py, policyd) run on: the bench's own unless
#: a bench's ``--python`` says otherwise. The daemon's CPU per question depends on the
#: interpreter's build (bench/README.md, "Which Python").
SERVER_PYTHON = sys.executable
#: linux/prctl.h: signal the child gets when its parent dies.
PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child


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
    store_url: str | None = None,
    name: str = "policyd",
    extra: str = "",
) -> Path:
    """The bench config: the brief's settings, our whitelist, files in ``workdir``.

    ``store_url`` replaces the SQLite file (e.g. ``unix:///…/redis.sock``); ``name`` names
    the socket and the config file, so several daemons can share ``workdir``; ``extra`` is
    TOML appended (``TWO_RATE_RULES``)."""
    url = store_url or f"sqlite://{db_path or workdir / 'state.sqlite3'}"
    wl = ", ".join(f'"{c}"' for c in WHITELIST_CIDRS)
    level = f'log_level = "{log_level}"\n' if log_level else ""
    text = (
        "[server]\n"
        f'socket = "{workdir / f"{name}.sock"}"\n'
        'socket_mode = "0600"\n'
        f'deadline = "{deadline}"\n'
        f"max_connections = {max_connections}\n"
        f"{level}"
        "\n[store]\n"
        f'url = "{url}"\n'
        "\n[greylist]\n"
        'delay = "5m"\n'
        "auto_whitelist_after = 5\n"
        f"whitelist_clients = [{wl}]\n"
        "learn = false\n"
        # Every daemon its own admin socket and a free metrics port: several daemons (and
        # other benches on the machine) run side by side.
        "\n[admin]\n"
        f'socket = "{workdir / f"{name}-admin.sock"}"\n'
        "\n[metrics]\n"
        'listen = "127.0.0.1:0"\n'
        f"{extra}"
    )
    path = workdir / f"{name}.toml"
    path.write_text(text)
    return path


#: Two rate-limit rules whose limits are far above any bench load: they cost their work on
#: every question but refuse nothing. "Greylisting + two rate rules" is the configuration the
#: per-question targets are set for (run.py's default; variants.py's second variant).
TWO_RATE_RULES = """
[[ratelimit.rule]]
name = "per-client-messages"
key = "client"
count = "messages"
rate = "1000000/1h"

[[ratelimit.rule]]
name = "per-sender-domain-recipients"
key = "sender_domain"
count = "recipients"
rate = "1000000/1h"
"""


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the bench dies without stopping it (one C
    call between fork and exec, nothing that takes a lock)."""
    _raise_nofile()
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


#: The environment systemd/policyd.service gives the daemon: MALLOC_ARENA_MAX=2 keeps glibc
#: from adding a malloc arena per worker thread (docs/memory.md), so RSS is measured as shipped.
POLICYD_ENV = {**os.environ, "MALLOC_ARENA_MAX": "2"}


def write_results(out: Path, report: object, markdown: str) -> None:
    """A bench's results: the JSON at ``out``, the markdown summary beside it (``.md``),
    the summary on stdout and both paths on stderr."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def _spawn(
    name: str,
    argv: list[str],
    sock: str,
    workdir: Path,
    *,
    probe: bytes = b"",
    cwd: Path = REPO_DIR,
    preexec: Callable[[], None] = _raise_nofile,
    env: dict[str, str] | None = None,
) -> Server:
    log = workdir / f"{name}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(  # our own interpreter and files
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            preexec_fn=preexec,  # noqa: PLW1509  # no threads in the bench parent yet
        )
    server = Server(name, sock, proc, log, workdir)
    wait_ready(server, probe=probe)
    return server


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S, *, probe: bytes = b"") -> None:
    """Poll until the socket accepts a connection (and, with ``probe``, answers something
    to it); fail early if the process died."""
    step = 0.05
    for _ in range(int(timeout / step)):
        if not server.alive():
            raise RuntimeError(f"{server.name} exited early:\n{server.log_tail()}")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(1.0)
            conn.connect(server.socket)
            if probe:
                conn.sendall(probe)
                if not conn.recv(64).startswith(b"+"):
                    raise OSError("not ready")
        except OSError:
            time.sleep(step)
            continue
        finally:
            conn.close()
        return
    stop(server)
    raise RuntimeError(f"{server.name} not ready after {timeout}s:\n{server.log_tail()}")


def start_floor(
    workdir: Path, *, stdlib_loop: bool = False, name: str = "floor", python: str = ""
) -> Server:
    sock = str(workdir / f"{name}.sock")
    argv = [python or SERVER_PYTHON, str(BENCH_DIR / "floor.py"), "--socket", sock]
    if stdlib_loop:
        argv.append("--stdlib-loop")
    return _spawn(name, argv, sock, workdir)


def start_redis(workdir: Path, name: str = "redis-server") -> Server:
    """A private redis-server for the Redis store: Unix socket in ``workdir`` (mode 0700),
    ``port 0`` (no TCP listener), no RDB or AOF, its files in ``workdir/redis``. It dies
    with the bench (PDEATHSIG) if the bench is killed before ``stop``."""
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        raise FileNotFoundError(f"{REDIS_SERVER} not found")
    data = workdir / "redis"
    data.mkdir(exist_ok=True)
    sock = str(workdir / "redis.sock")
    argv = [binary, "--port", "0", "--bind", "127.0.0.1", "--unixsocket", sock]
    argv += ["--unixsocketperm", "700", "--dir", str(data), "--daemonize", "no"]
    argv += ["--save", "", "--appendonly", "no", "--logfile", ""]
    server = _spawn(
        name, argv, sock, workdir, probe=b"PING\r\n", cwd=data, preexec=_die_with_parent
    )
    server.extra["version"] = redis_version(binary)
    return server


def redis_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for word in out.stdout.split():
        if word.startswith("v="):
            return word[2:]
    return out.stdout.strip() or "unknown"


def start_policyd(
    workdir: Path, config: Path, name: str = "policyd", tree: Path = REPO_DIR, python: str = ""
) -> Server:
    """The daemon as shipped (``POLICYD_ENV``), run from the source tree ``tree`` on
    ``python`` (default ``SERVER_PYTHON``)."""
    sock = str(workdir / f"{name}.sock")
    argv = [python or SERVER_PYTHON, "-m", "policyd", "--config", str(config)]
    return _spawn(name, argv, sock, workdir, cwd=tree, env=POLICYD_ENV)


_DESCRIBE = """
import json, os, platform, sys
with open("/proc/self/maps") as maps:
    linked = "shared" if "/libpython" in maps.read() else "static"
found = {}
for name in ("uvloop", "hiredis", "redis"):
    try:
        found[name] = __import__(name).__version__
    except Exception:
        found[name] = None
print(json.dumps({"path": os.path.realpath(sys.executable), "version": platform.python_version(),
                  "libpython": linked, **found}))
"""


@functools.cache  # one subprocess per interpreter, however many servers and sides use it
def interpreter(python: str) -> dict[str, str | None]:
    """What ``python`` is: its real path, version, whether libpython is linked into the
    executable ("static", as Debian's /usr/bin/python3.11) or loaded as a shared library
    ("shared", as pyenv's default build), and the versions of uvloop, hiredis and redis-py it
    would give the daemon (None: not installed)."""
    out = subprocess.run([python, "-c", _DESCRIBE], capture_output=True, text=True, check=True)
    info: dict[str, str | None] = json.loads(out.stdout)
    return info


def describe(info: dict[str, str | None]) -> str:
    """One line for a result header: "3.11.2 (/usr/bin/python3.11, libpython static,
    uvloop 0.23.0)"."""
    loop = f"uvloop {info['uvloop']}" if info.get("uvloop") else "no uvloop"
    return f"{info['version']} ({info['path']}, libpython {info['libpython']}, {loop})"


def stop(server: Server) -> int | None:
    """SIGTERM, wait, then SIGKILL this one process; returns its exit code."""
    if server.alive():
        server.proc.send_signal(signal.SIGTERM)
        try:
            return server.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.proc.kill()
    return server.proc.wait(STOP_TIMEOUT_S)

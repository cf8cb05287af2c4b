"""Private Redis processes for tests: single servers, replicas, sentinels and clusters.

Every process runs in its own temporary directory, listens on a Unix socket there and, when
asked, on a free loopback port; it is stopped by its own PID, never by name. The machine's
shared Redis is never touched. Without ``redis-server`` the tests that need it FAIL with a
message saying so (a silent skip would hide a broken CI job).
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"
#: Start-up of one redis-server (it loads its AOF first when there is one).
START_TIMEOUT = 10.0
#: linux/prctl.h
PR_SET_PDEATHSIG = 1
#: Cluster bus ports are the data port + 10000.
CLUSTER_BUS_OFFSET = 10000


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies without tearing down
    (an interrupted run), so no private Redis outlives its tests."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def require(binary: str = REDIS_SERVER) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(
            f"{binary} not found: the Redis tests need a real server "
            "(Debian: apt-get install redis-server)",
            pytrace=False,
        )
    return path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A loopback port nobody listens on (and, for a cluster node, its bus port too)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not cluster or (
            port + CLUSTER_BUS_OFFSET < 65536 and _port_free(port + CLUSTER_BUS_OFFSET)
        ):
            return port
    raise RuntimeError("no free loopback port")


@dataclass
class RedisServer:
    """One redis-server (or sentinel) process in ``directory``."""

    directory: Path
    port: int = 0
    options: tuple[str, ...] = ()
    sentinel: bool = False
    #: The CA of a sentinel that listens over TLS only (its client() then speaks TLS).
    tls_ca: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def unix_socket(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        """The store URL: the Unix socket (a TCP port is for sentinels and clusters)."""
        return f"unix://{self.unix_socket}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not running"
        return self.process.pid

    def command(self) -> list[str]:
        if self.sentinel:
            return [require(), str(self.directory / "sentinel.conf"), "--sentinel"]
        return [
            require(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self.unix_socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "local",
            # A replica gets its first sync at once (the default waits 5 s for others).
            "--repl-diskless-sync-delay",
            "0",
            *self.options,
        ]

    def start(self) -> RedisServer:
        """Spawn and wait until it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.unix_socket.unlink()
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # One C call between fork and exec, nothing that takes a lock.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"redis-server did not answer within {START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def client(self, **options: object) -> redis.Redis:
        """A synchronous client for test set-up and checks."""
        if self.sentinel:
            if self.tls_ca is not None:
                options = {"ssl": True, "ssl_ca_certs": str(self.tls_ca), **options}
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **options)  # type: ignore[arg-type]
        return redis.Redis(unix_socket_path=str(self.unix_socket), socket_timeout=5, **options)  # type: ignore[arg-type]

    def answers(self) -> bool:
        try:
            with self.client(socket_connect_timeout=0.2) as probe:
                return bool(probe.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Signal our own process by PID and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        for name in ("redis.log", "sentinel.log"):
            path = self.directory / name
            if path.exists():
                return path.read_text(errors="replace")[-3000:]
        return ""


@dataclass(frozen=True)
class TLSFiles:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it."""

    ca: Path
    cert: Path
    key: Path

    def options_pairs(self) -> list[tuple[str, str]]:
        """The server side: this certificate; clients are not asked for one."""
        return [
            ("tls-cert-file", str(self.cert)),
            ("tls-key-file", str(self.key)),
            ("tls-ca-cert-file", str(self.ca)),
            ("tls-auth-clients", "no"),
        ]

    def server_options(self, tls_port: int) -> tuple[str, ...]:
        """redis-server arguments: TLS on ``tls_port``, and TLS to its master."""
        pairs = [*self.options_pairs(), ("tls-port", str(tls_port)), ("tls-replication", "yes")]
        return tuple(arg for name, value in pairs for arg in (f"--{name}", value))


def make_certificates(directory: Path) -> TLSFiles:
    """A CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key_file, csr, cert = (
        directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    new_key = ["-newkey", "rsa:2048", "-nodes", "-days", "1"]
    run = [
        ["req", "-x509", *new_key, "-keyout", ca_key, "-out", ca, "-subj", "/CN=test CA"],
        ["req", *new_key, "-keyout", key_file, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"],
    ]
    run[-1] += ["-out", cert, "-days", "1", "-extfile", ext]
    for args in run:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return TLSFiles(ca, cert, key_file)


def sentinel_config(
    directory: Path,
    port: int,
    service: str,
    master: RedisServer,
    *,
    tls: TLSFiles | None = None,
) -> None:
    """A sentinel watching ``master`` alone (quorum 1), quick to decide (tests). With
    ``tls`` it listens on ``port`` over TLS only and speaks TLS to the master and replicas."""
    directory.mkdir(parents=True, exist_ok=True)
    listen = f"port {port}\n"
    if tls is not None:
        listen = f"port 0\ntls-port {port}\ntls-replication yes\n" + "".join(
            f"{name} {value}\n" for name, value in tls.options_pairs()
        )
    (directory / "sentinel.conf").write_text(
        listen + "bind 127.0.0.1\n"
        "daemonize no\n"
        f'dir "{directory}"\n'
        f'logfile "{directory / "sentinel.log"}"\n'
        f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {service} 400\n"
        f"sentinel failover-timeout {service} 3000\n"
        f"sentinel parallel-syncs {service} 1\n"
    )


def create_cluster(
    nodes: list[RedisServer], timeout: float = 15.0, *, tls: TLSFiles | None = None
) -> None:
    """``redis-cli --cluster create`` over ``nodes`` (masters only; with ``tls``, over TLS
    to the nodes' ``port``), then wait until every node says the cluster is ok."""
    cli_tls = ["--tls", "--cacert", str(tls.ca)] if tls is not None else []
    subprocess.run(
        [
            require(REDIS_CLI),
            *cli_tls,
            "--cluster",
            "create",
            *(node.address for node in nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
    )
    deadline = time.monotonic() + timeout
    for node in nodes:
        with node.client() as client:
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    pytest.fail(f"cluster not ok within {timeout}s:\n{node.log()}")
                time.sleep(0.05)

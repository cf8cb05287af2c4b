"""The fault matrix (issue #16, "Never hurt the mail"): a real daemon (``python -m policyd``)
under a steady load of real questions while something it depends on breaks, then heals.

Every case asserts, over the questions of the whole case (tests/faults/load.py): each one
answered within the deadline, no answer worse than the configured fallback, the daemon's
RSS (and WAL) bounded, no traceback in its log, and recovery without help. The cases that
break the disk under the embedded store mount a small tmpfs: they need root, and FAIL
saying so without it (CI runs as root).

This directory is a package (``faults``): its conftest must not evict the ``conftest``
module that tests/integration's modules import by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ holds the helpers shared with tests/integration (daemon process, Redis, DNS).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families
from support.policyd_process import DaemonFactory, DaemonProcess, daemons
from support.redis_server import RedisServer, require

from .load import DEADLINE, RATE, WHITELISTED_NET, Load, mixed_question

#: Greylisting delay of the fault cases: retries pass within a case's seconds.
DELAY = 1.0


def policy(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The sections every fault daemon runs with; ``sections`` add or override keys."""
    base: dict[str, dict[str, Any]] = {
        "server": {"deadline": f"{DEADLINE}s"},
        "greylist": {
            "delay": f"{DELAY}s",
            "auto_whitelist_after": 0,
            "whitelist_clients": [WHITELISTED_NET],
        },
    }
    for name, body in sections.items():
        base[name] = {**base.get(name, {}), **body}
    return base


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """``daemon_factory(name, **policy(...))`` → a DaemonProcess, config written, not
    started; killed at teardown."""
    with daemons(tmp_path) as make:
        yield make


LoadFactory = Callable[..., Load]


@pytest.fixture
def load_on() -> LoadFactory:
    """``load_on(daemon, wal=None, rate=RATE, tag="")`` → a Load (not started) asking the
    daemon's socket; RSS is read from whatever process the daemon runs now (restarts)."""

    def make(
        daemon: DaemonProcess, *, wal: Path | None = None, rate: float = RATE, tag: str = ""
    ) -> Load:
        def pid() -> int | None:
            process = daemon.process
            return process.pid if process is not None and process.poll() is None else None

        return Load(daemon.socket, mixed_question(rate, tag), pid, wal=wal, rate=rate)

    return make


# --- metrics and log ------------------------------------------------------------------------


def metrics_port(daemon: DaemonProcess) -> int:
    log = daemon.wait_for_log("metrics on http://")
    found = re.search(r"metrics on http://127\.0\.0\.1:([0-9]+)/metrics", log)
    assert found, log
    return int(found.group(1))


def metric_total(daemon: DaemonProcess, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples (over the labels not given) on the daemon's /metrics."""
    url = f"http://127.0.0.1:{metrics_port(daemon)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback, our own daemon
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def log_lines(log: str, *needles: str) -> list[str]:
    """The lines of ``log`` holding every one of ``needles``."""
    return [line for line in log.splitlines() if all(n in line for n in needles)]


# --- what breaks ----------------------------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server on a unix socket (support/redis_server.py), killed at the end."""
    require()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root (CI runs the tests as root)", pytrace=False)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``, lazily unmounted at the end (a daemon killed at
    teardown may still hold its files for a moment)."""
    require_root("mounting a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def remount(path: Path, option: str) -> None:
    """``mount -o remount,OPTION`` of a tmpfs of ours (``ro`` / ``rw``)."""
    subprocess.run(["mount", "-o", f"remount,{option}", str(path)], check=True)

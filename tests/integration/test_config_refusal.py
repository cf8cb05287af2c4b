"""A bad config is refused before the first question, the same way by ``--check-config``,
by a start and by a SIGHUP: exit 2 and one line naming the key or the file, or, for a
reload, one error line and the old config kept. Values that only risk harm start with one
warning line. Real files (truncated, random, text, read-only), real groups, real sockets;
what root would be allowed anyway runs as ``nobody`` through setpriv(1)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.exim_client import ask_blocking
from support.policyd_process import REPO, START_TIMEOUT, DaemonFactory, DaemonProcess
from test_daemon import GREYLISTED, POLICY, rcpt

from policyd.config import from_mapping
from policyd.config.preflight import SUN_PATH_MAX, Refused
from policyd.daemon import EXIT_REFUSED, Daemon
from policyd.stores.sqlite import connect

REFUSED = "policyd: invalid configuration: "
#: setpriv(1) arguments that drop root for the user the check is about.
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
NO_GROUP = "policyd-test-no-such-group"

Sections = dict[str, dict[str, Any]]


def real_database(path: Path, rows: int = 400) -> Path:
    """A database of the daemon's own schema, several pages long, checkpointed and closed."""
    db = connect(path, cache_kib=1024)
    db.executemany(
        "INSERT INTO triplet VALUES (?, 0, 0, 0, 1, 0)",
        [(f"key-{i:06d}-" * 8,) for i in range(rows)],
    )
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path


def truncated(d: Path) -> Sections:
    path = real_database(d / "state.sqlite3")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return {"store": {"url": f"sqlite://{path}"}}


def random_bytes(d: Path) -> Sections:
    (d / "state.sqlite3").write_bytes(os.urandom(8192))
    return {"store": {"url": f"sqlite://{d / 'state.sqlite3'}"}}


def text_file(d: Path) -> Sections:
    (d / "state.sqlite3").write_text("this is not a database\n" * 50)
    return {"store": {"url": f"sqlite://{d / 'state.sqlite3'}"}}


def other_schema(d: Path) -> Sections:
    db = sqlite3.connect(d / "state.sqlite3")
    db.execute("PRAGMA user_version = 99")
    db.close()
    return {"store": {"url": f"sqlite://{d / 'state.sqlite3'}"}}


def read_only_database(d: Path) -> Sections:
    path = real_database(d / "state.sqlite3")
    path.chmod(0o444)
    return {"store": {"url": f"sqlite://{path}"}}


def socket_on_a_file(d: Path) -> Sections:
    (d / "plain").write_text("x")
    return {"server": {"socket": str(d / "plain")}}


def parent_is_a_file(d: Path) -> Sections:
    (d / "f").write_text("x")
    return {"store": {"url": f"sqlite://{d}/f/db/s.sqlite3"}}


def root_directory(d: Path) -> Path:
    """A directory ``nobody`` can enter but not write."""
    locked = d / "locked"
    locked.mkdir()
    locked.chmod(0o755)
    os.chown(locked, 0, 0)
    return locked


def secret(content: bytes | None) -> Callable[[Path], Sections]:
    def make(d: Path) -> Sections:
        path = d / "secret"
        if content is not None:
            path.write_bytes(content)
        return {"store": {"hash_secret_file": str(path)}}

    return make


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Sections]
    #: In the one line: the key, and the file when there is one ("{d}": the directory).
    names: tuple[str, ...]
    as_nobody: bool = False


def const(sections: Sections) -> Callable[[Path], Sections]:
    return lambda _d: sections


REFUSED_CASES = [
    Case("delay-nan", const({"greylist": {"delay": float("nan")}}), ("greylist.delay",)),
    Case("spf-timeout-inf", const({"spf": {"timeout": float("inf")}}), ("spf.timeout",)),
    Case("retry-negative", const({"greylist": {"retry_window": -1}}), ("greylist.retry_window",)),
    Case("deadline-zero", const({"server": {"deadline": 0}}), ("server.deadline",)),
    Case("expiry-zero", const({"store": {"expire_interval": 0}}), ("store.expire_interval",)),
    Case("max-age-zero", const({"greylist": {"max_age": 0}}), ("greylist.max_age",)),
    Case("cache-negative", const({"spf": {"cache_size": -5}}), ("spf.cache_size",)),
    Case("listen-port", const({"metrics": {"listen": "127.0.0.1:99999"}}), ("metrics.listen",)),
    Case("group", const({"server": {"socket_group": NO_GROUP}}), ("server.socket_group", NO_GROUP)),
    Case(
        "admin-group",
        const({"admin": {"socket_group": NO_GROUP}}),
        ("admin.socket_group", NO_GROUP),
    ),
    Case("sqlite-bare", const({"store": {"url": "sqlite://"}}), ("store.url", "sqlite://")),
    Case("sqlite-dir", lambda d: {"store": {"url": f"sqlite://{d}"}}, ("store.url", "{d}")),
    Case(
        "socket-long",
        lambda d: {"server": {"socket": str(d / ("s" * SUN_PATH_MAX))}},
        ("server.socket", str(SUN_PATH_MAX)),
    ),
    Case(
        "admin-long",
        lambda d: {"admin": {"socket": str(d / ("a" * SUN_PATH_MAX))}},
        ("admin.socket", str(SUN_PATH_MAX)),
    ),
    Case(
        "socket-is-a-file",
        socket_on_a_file,
        ("server.socket", "{d}/plain", "move it aside"),
    ),
    Case("db-truncated", truncated, ("store.url", "{d}/state.sqlite3", "move it aside")),
    Case("db-random", random_bytes, ("store.url", "{d}/state.sqlite3", "move it aside")),
    Case("db-text", text_file, ("store.url", "{d}/state.sqlite3", "move it aside")),
    Case("db-schema", other_schema, ("store.url", "{d}/state.sqlite3", "schema version 99")),
    Case(
        "db-parent-is-a-file",
        parent_is_a_file,
        ("store.url", "{d}/f/db", "not a directory"),
    ),
    Case("secret-missing", secret(None), ("store.hash_secret_file", "{d}/secret")),
    Case("secret-empty", secret(b"\n"), ("store.hash_secret_file", "{d}/secret", "empty")),
    Case(
        "secret-short", secret(b"0123456789"), ("store.hash_secret_file", "{d}/secret", "16 bytes")
    ),
    # root may write anything: these are refused for the user the daemon runs as.
    Case(
        "db-read-only",
        read_only_database,
        ("store.url", "{d}/state.sqlite3", "'nobody'"),
        as_nobody=True,
    ),
    Case(
        "db-dir-read-only",
        lambda d: {"store": {"url": f"sqlite://{root_directory(d)}/state.sqlite3"}},
        ("store.url", "{d}/locked", "'nobody'"),
        as_nobody=True,
    ),
    Case(
        "db-dir-cannot-create",
        lambda d: {"store": {"url": f"sqlite://{root_directory(d)}/new/state.sqlite3"}},
        ("store.url", "{d}/locked/new", "'nobody'"),
        as_nobody=True,
    ),
    Case(
        "socket-dir-read-only",
        lambda d: {"server": {"socket": str(root_directory(d) / "p.sock")}},
        ("server.socket", "{d}/locked", "'nobody'"),
        as_nobody=True,
    ),
    Case(
        "group-not-a-member",
        const({"server": {"socket_group": "root"}}),
        ("server.socket_group", "'root'", "'nobody'"),
        as_nobody=True,
    ),
]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that ``nobody`` owns (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="policyd-refusal-", dir="/tmp"))
    os.chown(path, 65534, 65534)  # nobody:nogroup, as id(1) names them here
    try:
        with code_reachable_by_others():
            yield path
    finally:
        shutil.rmtree(path)


@contextlib.contextmanager
def code_reachable_by_others() -> Iterator[None]:
    """``nobody`` must reach the checkout and its .venv to run the daemon at all: a clone in
    a 0700 directory (mktemp -d, as `make fresh-check` makes) is not. The directories above
    the checkout that others cannot enter get o+x for the test's duration, then back."""
    opened = []
    for directory in [REPO, *REPO.parents]:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)
            opened.append((directory, mode))
    try:
        yield
    finally:
        for directory, mode in opened:
            directory.chmod(mode)


def run(
    daemon: DaemonProcess, *args: str, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    """The daemon's command line to its end; a start that does not end in time has served,
    which is a failure here (subprocess.run kills it)."""
    prefix = AS_NOBODY if as_nobody else []
    try:
        return subprocess.run(
            [*prefix, *daemon.command(*args)],
            cwd=daemon.directory,
            env=daemon.environment(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"policyd {' '.join(args)} did not end: it started serving")


@pytest.mark.parametrize("case", REFUSED_CASES, ids=[c.id for c in REFUSED_CASES])
def test_refused_by_check_and_by_start_with_one_line(
    case: Case, daemon_factory: DaemonFactory, shared_dir: Path
) -> None:
    if case.as_nobody:
        daemon = DaemonProcess(shared_dir)
        files = shared_dir / "files"
        files.mkdir()
        os.chown(files, 65534, 65534)
    else:
        daemon = daemon_factory("d")
        files = daemon.directory / "files"
        files.mkdir()
    daemon.write_config(**case.build(files))
    if case.as_nobody:
        os.chown(daemon.config_path, 65534, 65534)

    check = run(daemon, "--check-config", as_nobody=case.as_nobody)
    start = run(daemon, as_nobody=case.as_nobody)

    for result in (check, start):
        assert result.returncode == EXIT_REFUSED, result.stderr
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(REFUSED)
        for text in case.names:
            assert text.replace("{d}", str(files)) in lines[0]
    assert check.stderr == start.stderr, "--check-config and the start must say the same"
    assert not Path(daemon.socket).exists()


WARNED = [
    ("deadline", {"server": {"deadline": "30s"}}, "server.deadline"),
    ("max-age", {"greylist": {"max_age": "1m", "delay": "5m"}}, "greylist.max_age"),
    ("request-size", {"server": {"max_request_bytes": 10}}, "server.max_request_bytes"),
]


@pytest.mark.parametrize(("sections", "key"), [w[1:] for w in WARNED], ids=[w[0] for w in WARNED])
def test_warned_values_start_with_one_warning(
    sections: Sections, key: str, daemon_factory: DaemonFactory
) -> None:
    daemon = daemon_factory("d", **sections)
    check = run(daemon, "--check-config")
    assert check.returncode == 0, check.stderr
    assert check.stderr.splitlines() == [line for line in check.stderr.splitlines() if key in line]
    assert len(check.stderr.splitlines()) == 1 and "warning" in check.stderr

    daemon.start()
    log = daemon.wait_for_log("ready")
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and key in warnings[0], log
    assert daemon.stop() == 0


def test_sighup_with_a_refused_config_keeps_the_old_one(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    daemon = daemon_factory(**POLICY)
    daemon.start()
    (tmp_path / "junk.sqlite3").write_text("not a database\n")
    broken = [
        ({"greylist": {**POLICY["greylist"], "delay": float("nan")}}, "greylist.delay"),
        ({**POLICY, "server": {"socket_group": NO_GROUP}}, "server.socket_group"),
        ({**POLICY, "store": {"url": "sqlite://"}}, "store.url"),
        ({**POLICY, "store": {"url": f"sqlite://{tmp_path / 'junk.sqlite3'}"}}, "junk.sqlite3"),
    ]
    for number, (sections, named) in enumerate(broken):
        daemon.write_config(**sections)
        mark = daemon.log_mark()
        daemon.send_signal(signal.SIGHUP)
        log = daemon.wait_for_log("reload refused", since=mark)
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and named in errors[0], log
        # Still the running policy: a new sender is greylisted (a NaN delay would pass it).
        answer = ask_blocking(daemon.socket, rcpt("198.51.100.9", f"r{number}@test.example"))
        assert answer.startswith(GREYLISTED)
    assert "Traceback" not in daemon.stderr()
    assert daemon.stop() == 0


def test_sighup_with_a_warned_config_applies_it_with_one_warning(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory(**POLICY)
    daemon.start()
    daemon.write_config(greylist={**POLICY["greylist"], "max_age": "0.5s"})
    mark = daemon.log_mark()
    daemon.send_signal(signal.SIGHUP)
    log = daemon.wait_for_log("reloaded configuration", since=mark)
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "greylist.max_age" in warnings[0], log
    assert daemon.stop() == 0


async def test_a_database_that_fails_at_open_is_refused_naming_it(tmp_path: Path) -> None:
    """Past the preflight (a file damaged in between): the open itself gives the one line."""
    path = tmp_path / "state.sqlite3"
    truncated(tmp_path)
    config = from_mapping(
        {
            "server": {"socket": str(tmp_path / "p.sock")},
            "admin": {"socket": str(tmp_path / "a.sock")},
            "store": {"url": f"sqlite://{path}"},
            "metrics": {"enabled": False},
        }
    )
    with pytest.raises(Refused) as info:
        await Daemon(None, config).run()
    assert str(info.value).startswith(f"store.url: {path} is not a usable policyd database")
    assert not (tmp_path / "p.sock").exists()

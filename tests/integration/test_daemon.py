"""The daemon as operators run it: ``python -m policyd --config FILE`` in a subprocess,
stopped and reloaded by signals to its PID, restarted over the same SQLite file."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support.exim_client import Question, ask, ask_blocking
from support.policyd_process import DaemonFactory, to_toml, wait_until

from policyd.checks.greylist import DEFER_CODE, DEFER_ECODE, Status
from policyd.ctl.main import main as main_ctl
from policyd.daemon import main

DELAY = 1.0
GREYLISTED = f"defer {DEFER_CODE} {DEFER_ECODE} ".encode()
#: Greylisting with a short delay; 192.0.2.0/24 whitelisted, 198.51.100.0/24 greylisted.
POLICY: dict[str, Any] = {
    "greylist": {
        "delay": f"{DELAY}s",
        "whitelist_clients": ["192.0.2.0/24"],
        "auto_whitelist_after": 2,
    }
}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def rcpt(ip: str, recipient: str, sender: str = "alice@example.net") -> bytes:
    """An RCPT question as exim-snippets/rcpt.acl writes it."""
    return (
        f"rcpt v=1 ip={ip} port=25 helo_b64={b64('mx.example.net')} from_b64={b64(sender)} "
        f"rcpt_b64={b64(recipient)} auth_b64= nrcpt=1\n"
    ).encode()


def ok(reason: str) -> bytes:
    return f"ok {reason}".encode()


# --- stop -----------------------------------------------------------------------------------


async def test_sigterm_delivers_the_answer_in_flight(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(server={"deadline": "3s"}, **POLICY)
    daemon.start()
    request = rcpt("192.0.2.7", "bob@test.example")
    question = await Question.connect(daemon.socket)
    try:
        await question.send(request[:25])
        # Accepted in order: once a later question is answered, ours has been accepted too.
        assert await ask(daemon.socket, request) == ok("whitelisted-client")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait_for_log("draining")
        wait_until(lambda: not daemon.accepting(), "refusing new connections while draining")
        await question.send(request[25:])
        assert await question.answer() == ok("whitelisted-client")
    finally:
        question.close()
    assert daemon.wait() == 0
    assert not Path(daemon.socket).exists()
    assert "policyd stopped" in daemon.log_since_start()


# --- reload ---------------------------------------------------------------------------------


def test_reload_with_an_invalid_config_keeps_the_running_policy(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory(**POLICY)
    daemon.start()
    assert ask_blocking(daemon.socket, rcpt("198.51.100.1", "a@test.example")).startswith(
        GREYLISTED
    )
    # Would disable greylisting if applied, but one key is invalid: nothing of it applies.
    daemon.write_config(greylist={**POLICY["greylist"], "enabled": False, "delay": "soon"})
    daemon.send_signal(signal.SIGHUP)
    log = daemon.wait_for_log("reload refused")
    refused = next(line for line in log.splitlines() if "reload refused" in line)
    assert "greylist.delay" in refused
    assert ask_blocking(daemon.socket, rcpt("198.51.100.1", "b@test.example")).startswith(
        GREYLISTED
    )
    assert daemon.stop() == 0


def test_reload_with_a_valid_config_applies_the_new_policy(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory(**POLICY)
    daemon.start()
    client = "198.51.100.2"
    assert ask_blocking(daemon.socket, rcpt(client, "a@test.example")).startswith(GREYLISTED)

    whitelist = [*POLICY["greylist"]["whitelist_clients"], f"{client}/32"]
    daemon.write_config(
        server={"deadline": "2s"}, greylist={**POLICY["greylist"], "whitelist_clients": whitelist}
    )
    daemon.send_signal(signal.SIGHUP)
    log = daemon.wait_for_log("reloaded configuration")
    assert "[server] changes take effect only after a restart" in log
    assert ask_blocking(daemon.socket, rcpt(client, "b@test.example")) == ok("whitelisted-client")

    mark = daemon.log_mark()
    daemon.write_config(greylist={**POLICY["greylist"], "enabled": False})
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_for_log("reloaded configuration", since=mark)
    assert ask_blocking(daemon.socket, rcpt("198.51.100.3", "c@test.example")) == ok("disabled")
    assert daemon.stop() == 0


# --- --check-config -------------------------------------------------------------------------


def test_check_config_accepts_a_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policyd.toml"
    path.write_text(to_toml({"server": {"socket": str(tmp_path / "s.sock")}, **POLICY}))
    assert main(["--config", str(path), "--check-config"]) == 0
    assert "is valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"greylist": {"dealy": "5m"}}, "greylist.dealy"),
        ({"greylist": {"delay": "five minutes"}}, "greylist.delay"),
        ({"server": {"deadline": "-1s"}}, "server.deadline"),
        ({"greylist": {"whitelist_clients": ["192.0.2.0/33"]}}, "greylist.whitelist_clients"),
        ({"greylist": {"whitelist_clients": ["192.0.2.1.0/24"]}}, "192.0.2.1.0/24"),
        ({"greylisting": {"enabled": True}}, "[greylisting]"),
    ],
    ids=["unknown-key", "bad-duration", "negative-duration", "bad-cidr", "bad-address", "section"],
)
def test_check_config_names_the_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sections: dict[str, Any], named: str
) -> None:
    path = tmp_path / "policyd.toml"
    path.write_text(to_toml(sections))
    assert main(["--config", str(path), "--check-config"]) != 0
    captured = capsys.readouterr()
    assert named in captured.err
    assert captured.out == ""


def test_check_config_from_the_command_line(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(**POLICY)
    good = subprocess.run(
        daemon.command("--check-config"),
        env=daemon.environment(),
        capture_output=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    daemon.write_config(greylist={"delay": "5 parsecs"})
    bad = subprocess.run(
        daemon.command("--check-config"),
        env=daemon.environment(),
        capture_output=True,
        check=False,
    )
    assert bad.returncode != 0
    assert b"greylist.delay" in bad.stderr
    assert not Path(daemon.socket).exists(), "--check-config must not start serving"


# --- restart: state lives in the store ------------------------------------------------------


def test_greylist_state_survives_restarts(daemon_factory: DaemonFactory) -> None:
    """First attempt, restart, retry passes; the passed triplet and then the auto-whitelisted
    client (auto_whitelist_after = 2) are still known after further restarts."""
    daemon = daemon_factory(**POLICY)
    first, second = rcpt("198.51.100.20", "one@test.example"), rcpt("198.51.100.20", "two@test")
    daemon.start()
    first_seen = time.monotonic()
    assert ask_blocking(daemon.socket, first).startswith(GREYLISTED)
    assert ask_blocking(daemon.socket, second).startswith(GREYLISTED)
    assert daemon.stop() == 0

    daemon.start()
    time.sleep(max(0.0, first_seen + DELAY + 0.1 - time.monotonic()))
    assert ask_blocking(daemon.socket, first) == ok(Status.PASSED.value)
    assert daemon.stop() == 0

    daemon.start()
    assert ask_blocking(daemon.socket, first) == ok(Status.KNOWN.value)
    assert ask_blocking(daemon.socket, second) == ok(Status.PASSED.value)  # 2nd pass
    assert daemon.stop() == 0

    daemon.start()
    newcomer = rcpt("198.51.100.21", "three@test.example", sender="carol@example.org")
    assert ask_blocking(daemon.socket, newcomer) == ok(Status.AUTO.value)
    assert daemon.stop() == 0


# --- one daemon per socket ------------------------------------------------------------------


def test_second_daemon_on_a_live_socket_refuses_to_start(daemon_factory: DaemonFactory) -> None:
    first = daemon_factory("first", **POLICY)
    first.start()
    inode = os.stat(first.socket).st_ino
    second = daemon_factory("second", server={"socket": first.socket}, **POLICY)
    second.launch()
    assert second.wait() != 0
    assert "already listening" in second.stderr()
    assert os.stat(first.socket).st_ino == inode
    assert ask_blocking(first.socket, rcpt("192.0.2.9", "x@test.example")) == ok(
        "whitelisted-client"
    )
    assert first.stop() == 0


def test_second_daemon_on_a_live_admin_socket_refuses_to_start(
    daemon_factory: DaemonFactory,
) -> None:
    """The same check as for the query socket: taking over the admin socket (and deleting
    it at stop) would leave the running daemon unreachable for policyctl."""
    first = daemon_factory("first", **POLICY)
    first.start()
    admin_socket = str(first.directory / "admin.sock")
    inode = os.stat(admin_socket).st_ino
    second = daemon_factory("second", admin={"socket": admin_socket}, **POLICY)
    second.launch()
    assert second.wait() != 0
    # The start logs which configuration it read, then one error line, no traceback.
    lines = second.stderr().splitlines()
    assert "Traceback" not in second.stderr()
    [line] = [line for line in lines if "ERROR" in line]
    assert f"cannot start: {admin_socket}: another process is already listening there" in line
    assert not Path(second.socket).exists(), "the refused daemon left its query socket"
    assert os.stat(admin_socket).st_ino == inode
    assert main_ctl(["--socket", admin_socket, "ping"]) == 0
    assert first.stop() == 0


def test_stale_socket_of_a_killed_daemon_is_replaced(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(**POLICY)
    daemon.start()
    daemon.kill()  # SIGKILL: no chance to remove its socket file
    assert Path(daemon.socket).exists()
    daemon.start()
    assert ask_blocking(daemon.socket, rcpt("192.0.2.9", "x@test.example")) == ok(
        "whitelisted-client"
    )
    assert daemon.stop() == 0

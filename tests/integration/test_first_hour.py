"""An admin's first hour: ``policyctl`` with no options on an installed system, whitelist
values that are a mistake, what ``greylist show`` keys mean, and socket set-up failures
without systemd, all against a real daemon in a subprocess.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.policyd_process import START_TIMEOUT, DaemonProcess
from test_policyctl import GREYLISTED, POLICY, ask, ctl, ok_ctl, rcpt, start

from policyd.config import files as configfile
from policyd.ctl.main import EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, main
from policyd.sockets import SOCKET_DIR_MODE


@dataclass
class ImplicitDaemon(DaemonProcess):
    """The daemon started without ``--config``: it finds its file the way an installed one
    does. ``system_config`` stands in for /etc/policyd/policyd.toml (the module constant is
    pointed at it before ``main`` runs); ``env`` is added to the environment."""

    system_config: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    wrapper: tuple[str, ...] = ()
    #: The Exim socket when the config puts it elsewhere than the daemon's directory.
    exim_socket: str = ""

    @property
    def socket(self) -> str:
        return self.exim_socket or str(self.directory / "policyd.sock")

    def command(self, *args: str) -> list[str]:
        redirect = (
            f"configfile.SYSTEM_CONFIG = Path({str(self.system_config)!r}); "
            if self.system_config
            else ""
        )
        code = (
            "import sys; from pathlib import Path; from policyd.config import files as configfile; "
            f"{redirect}from policyd.daemon import main; sys.exit(main(sys.argv[1:]))"
        )
        return [*self.wrapper, sys.executable, "-c", code, *args]

    def environment(self) -> dict[str, str]:  # type: ignore[override]  # per instance here
        env = DaemonProcess.environment()
        env.pop(configfile.ENV_VAR, None)
        return {**env, **self.env}

    def run_to_exit(self) -> subprocess.CompletedProcess[str]:
        """For a start that must fail: run to the end, stderr captured."""
        return subprocess.run(
            self.command(),
            cwd=self.directory,
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )


@pytest.fixture
def implicit(tmp_path: Path) -> Iterator[list[ImplicitDaemon]]:
    made: list[ImplicitDaemon] = []
    yield made
    for daemon in made:
        daemon.kill()


def make(made: list[ImplicitDaemon], directory: Path, **kwargs: object) -> ImplicitDaemon:
    directory.mkdir(parents=True, exist_ok=True)
    daemon = ImplicitDaemon(directory, **kwargs)  # type: ignore[arg-type]
    made.append(daemon)
    return daemon


@pytest.fixture(autouse=True)
def no_installed_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This machine's /etc and environment play no part unless a test says so."""
    monkeypatch.delenv(configfile.ENV_VAR, raising=False)
    monkeypatch.setattr(configfile, "SYSTEM_CONFIG", tmp_path / "no-such" / "policyd.toml")


# --- policyctl finds the installed configuration ------------------------------------------


def test_ping_with_no_options_through_policyd_config(
    implicit: list[ImplicitDaemon], tmp_path: Path
) -> None:
    config = tmp_path / "etc-policyd" / "policyd.toml"
    daemon = make(implicit, tmp_path / "daemon", env={configfile.ENV_VAR: str(config)})
    daemon.write_config(**POLICY)
    config.parent.mkdir()
    daemon.config_path.rename(config)
    start(daemon)
    assert f"configuration: {config} ($POLICYD_CONFIG)" in daemon.log_since_start()

    env = {**DaemonProcess.environment(), configfile.ENV_VAR: str(config)}
    pong = subprocess.run(
        [sys.executable, "-m", "policyd.ctl", "ping"],
        cwd=tmp_path,  # not the daemon's directory: the path comes from the config
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert pong.returncode == EXIT_OK, pong.stderr
    assert pong.stdout.startswith("policyd ") and f"(pid {daemon.process.pid})" in pong.stdout  # type: ignore[union-attr]
    assert daemon.stop() == 0


def test_ping_with_no_options_through_the_installed_default(
    implicit: list[ImplicitDaemon],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    installed = tmp_path / "etc" / "policyd" / "policyd.toml"
    daemon = make(implicit, tmp_path / "daemon", system_config=installed)
    daemon.write_config(**POLICY)
    installed.parent.mkdir(parents=True)
    daemon.config_path.rename(installed)
    start(daemon)
    assert f"configuration: {installed} (installed default)" in daemon.log_since_start()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(configfile, "SYSTEM_CONFIG", installed)
    assert main(["ping"]) == EXIT_OK
    assert f"(pid {daemon.process.pid})" in capsys.readouterr().out  # type: ignore[union-attr]
    # Named explicitly, another file wins over the installed one.
    assert main(["--config", str(tmp_path / "absent.toml"), "ping"]) == EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err
    assert daemon.stop() == 0
    assert main(["ping"]) == EXIT_NOT_RUNNING
    err = capsys.readouterr().err
    assert f"the path is the [admin] socket of {installed} (installed default)" in err


def test_without_any_config_the_message_says_where_the_socket_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["ping"]) == EXIT_NOT_RUNNING
    err = capsys.readouterr().err
    assert "admin socket var/policyd-admin.sock" in err
    assert "built-in defaults (no --config, $POLICYD_CONFIG unset" in err


# --- whitelist values that are a mistake -----------------------------------------------------


@pytest.fixture
def daemon(implicit: list[ImplicitDaemon], tmp_path: Path) -> DaemonProcess:
    made = make(implicit, tmp_path / "policyd")
    made.write_config(**POLICY)
    made.env[configfile.ENV_VAR] = str(made.config_path)
    return start(made)


def test_the_whole_internet_needs_force(daemon: DaemonProcess) -> None:
    refused = ctl(daemon, "whitelist", "add", "ip", "0.0.0.0/0")
    assert refused.code == EXIT_USAGE
    assert "0.0.0.0/0 covers 2^32 addresses, wider than an IPv4 /8" in refused.err
    assert ok_ctl(daemon, "whitelist", "list", "--json").json() == []
    # The daemon refuses it too when asked directly, unless "force" is set.
    assert ask(daemon, rcpt("198.51.100.7", "a@test.example")).startswith(GREYLISTED)
    ok_ctl(daemon, "whitelist", "add", "ip", "0.0.0.0/0", "--force")
    assert ask(daemon, rcpt("198.51.100.7", "b@test.example")) == b"ok whitelist-client"
    ok_ctl(daemon, "whitelist", "remove", "ip", "0.0.0.0/0")


def test_a_bare_recipient_word_is_refused_and_postmaster_at_works(daemon: DaemonProcess) -> None:
    refused = ctl(daemon, "whitelist", "add", "recipient", "postmaster")
    assert refused.code == EXIT_USAGE
    assert "write postmaster@ for that local part in every domain" in refused.err
    ok_ctl(daemon, "whitelist", "add", "recipient", "info@")
    assert ask(daemon, rcpt("198.51.100.8", "info@test.example")) == b"ok whitelist-recipient"


def test_greylist_show_says_what_a_normalised_sender_was(daemon: DaemonProcess) -> None:
    ask(daemon, rcpt("192.0.2.10", "one@test.example", sender="v6@six.example"))
    shown = ok_ctl(daemon, "greylist", "show", "--sender", "v6@six.example").out.splitlines()
    assert shown[1].split()[0] == "192.0.2.0/24|v#@six.example|one@test.example"
    assert "sender v6@six.example is keyed as v#@six.example" in shown
    assert any(line.startswith("note: the sender in a key is normalised") for line in shown)
    plain = ok_ctl(daemon, "greylist", "show", "--client", "192.0.2.10").out
    assert "note: the sender in a key is normalised" in plain
    assert "is keyed as" not in plain


# --- socket set-up without systemd ---------------------------------------------------------


def socket_daemon(
    implicit: list[ImplicitDaemon], root: Path, socket_dir: Path, **server: str
) -> ImplicitDaemon:
    made = make(implicit, root)
    made.exim_socket = str(socket_dir / "policyd.sock")
    made.write_config(**POLICY, server={"socket": made.exim_socket, **server})
    made.env[configfile.ENV_VAR] = str(made.config_path)
    return made


#: Root without the capabilities that let it ignore file permissions and group membership:
#: the daemon then meets the refusals an unprivileged ``policyd`` user meets.
UNPRIVILEGED = ("setpriv", "--bounding-set=-chown,-dac_override,-dac_read_search,-fowner", "--")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to a group")
def test_a_missing_socket_directory_is_created_0750_with_the_socket_group(
    implicit: list[ImplicitDaemon], tmp_path: Path
) -> None:
    run = tmp_path / "run" / "policyd"
    daemon = socket_daemon(implicit, tmp_path / "d", run, socket_group="nogroup")
    start(daemon)
    status = run.stat()
    assert stat.S_IMODE(status.st_mode) == SOCKET_DIR_MODE
    assert status.st_gid == grp.getgrnam("nogroup").gr_gid
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_a_socket_directory_the_daemon_may_not_create_names_the_command(
    implicit: list[ImplicitDaemon], tmp_path: Path
) -> None:
    assert shutil.which("setpriv"), "util-linux's setpriv is part of Debian's base system"
    parent = tmp_path / "run"
    parent.mkdir()
    os.chown(parent, 65534, 65534)  # someone else's, 0755: not writable for the daemon
    run = parent / "policyd"
    daemon = socket_daemon(implicit, tmp_path / "d", run)
    daemon.wrapper = UNPRIVILEGED
    failed = daemon.run_to_exit()
    assert failed.returncode == 2, failed.stderr
    # Refused before the start by the checks --check-config runs too: one line.
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    command = f"install -d -m 0750 -o root -g root {run}"
    assert len(lines) == 1 and f"create {run} in directory {parent}" in lines[0], lines
    assert f"run '{command}'" in lines[0] and "Traceback" not in failed.stderr

    subprocess.run(command.split(), check=True)  # what the message says to do
    daemon.wrapper = UNPRIVILEGED
    start(daemon)
    assert ask(daemon, rcpt("192.0.2.20", "a@test.example")).startswith(GREYLISTED)
    assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_a_socket_group_the_daemon_cannot_use_says_what_to_do(
    implicit: list[ImplicitDaemon], tmp_path: Path
) -> None:
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    daemon = socket_daemon(implicit, tmp_path / "d", sock_dir, socket_group="nogroup")
    daemon.wrapper = UNPRIVILEGED
    failed = daemon.run_to_exit()
    assert failed.returncode == 2, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1, failed.stderr
    assert (
        f"cannot give {sock_dir / 'policyd.sock'} to group 'nogroup' ([server] socket_group): "
        "user root is not a member; as root run 'usermod -aG nogroup root'"
    ) in lines[0]

    missing = socket_daemon(
        implicit, tmp_path / "e", sock_dir, socket_group="no-such-group-policyd"
    )
    failed = missing.run_to_exit()
    assert failed.returncode == 2, failed.stderr
    # Refused by the checks before the start (as --check-config): one line naming it.
    assert failed.stderr.splitlines() == [
        "policyd: invalid configuration: server.socket_group: there is no group "
        "'no-such-group-policyd' on this machine"
    ]

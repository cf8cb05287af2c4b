"""The Debian package, end to end on this machine: ``make deb``, lintian, ``apt install``,
the daemon started as README.Debian says for a host without systemd, ``policyctl exim
enable``, real Exim greylisting an outside client and accepting its retry, then ``apt
remove`` and ``apt purge``, after which Exim's configuration is as before and accepts mail.

This test changes the machine (it installs into /usr, adds the user policyd, hooks
/etc/exim4) and puts it back: the package is purged whatever happens, and /etc/exim4 is
compared file by file with what it was. It refuses to run where policyd is already
installed, rather than remove someone's real installation. The package is built once per
session.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.policyd_process import wait_until

from .conftest import REPO, SNIPPETS_DIR
from .test_exim_hook import tree_digest

pytestmark = pytest.mark.exim

PACKAGE = "policyd"
EXIM_GROUP = "Debian-exim"
CONFIG = Path("/etc/policyd/policyd.toml")
DROP_IN = Path("/etc/policyd/policyd.toml.d/50-test.toml")
#: The greylisting delay the drop-in sets: short, so the retry comes soon.
DELAY = 2.0
#: A documentation address: outside, not a relay host (Debian relays for loopback).
CLIENT = "192.0.2.1"
#: A local user at a local domain of Debian's default configuration.
RECIPIENT = "root@localhost"
#: What README.Debian gives for a host without systemd.
START = ["runuser", "-u", PACKAGE, "--", "/usr/bin/policyd", "--config", str(CONFIG)]
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
BUILD_TIMEOUT = 600
STEP_TIMEOUT = 120
#: swaks: "-> RCPT TO:<…>" then the server's "<** 451-…" / "<-  250 …" lines.
REPLY_RE = re.compile(r"^<[-~*]{1,2} +([0-9]{3})[ -]")


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        command, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False, **kwargs
    )


def ok(command: list[str], **kwargs: object) -> str:
    done = run(command, **kwargs)
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def installed() -> bool:
    status = run(["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE]).stdout
    return status not in ("", "not-installed")


def replies(sender: str) -> dict[str, int]:
    """Send one message through ``exim4 -bh`` as an outside client: each SMTP command's
    reply code (RCPT, DATA, and "." for the end of the message)."""
    done = run(
        [
            *("swaks", "--pipe", f"exim4 -bh {CLIENT}", "--helo", "mx.example.net"),
            *("--from", sender, "--to", RECIPIENT),
        ]
    )
    codes: dict[str, int] = {}
    command = "banner"
    for line in done.stdout.splitlines():
        if line.startswith(" -> "):
            words = line[4:].split(":")[0].split()
            command = words[0] if words else command
        elif (match := REPLY_RE.match(line)) and command not in codes:
            codes[command] = int(match.group(1))
    return codes


@pytest.fixture(scope="session")
def deb() -> Iterator[Path]:
    """``make deb`` once per session; the package file is removed afterwards."""
    if shutil.which("dpkg-buildpackage") is None or shutil.which("dh") is None:
        pytest.fail("dpkg-dev and debhelper are missing (.ci/run installs them)", pytrace=False)
    done = subprocess.run(
        ["make", "deb"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    version = ok(["dpkg-parsechangelog", "-SVersion"], cwd=REPO).strip()
    arch = ok(["dpkg-architecture", "-qDEB_HOST_ARCH"]).strip()
    path = REPO / f"{PACKAGE}_{version}_{arch}.deb"
    assert path.is_file(), f"make deb did not leave {path.name} in the repository root"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_lintian_finds_no_error(deb: Path) -> None:
    done = run(["lintian", "--fail-on", "error", str(deb)])
    errors = [line for line in done.stdout.splitlines() if line.startswith("E:")]
    assert done.returncode == 0 and not errors, done.stdout + done.stderr


def daemon_pid() -> int:
    out = ok(["policyctl", "--json", "ping"])  # finds /etc/policyd/policyd.toml itself
    return int(json.loads(out)["pid"])


def groups_of(pid: int) -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Groups:"))
    return {int(gid) for gid in line.split()[1:]}


def test_install_greylist_through_exim_remove_purge(deb: Path, tmp_path: Path) -> None:
    if installed() or CONFIG.parent.exists():
        pytest.fail(
            f"{PACKAGE} is installed here (or /etc/policyd exists): this test would remove "
            "it; purge it first",
            pytrace=False,
        )
    exim_conf = Path("/etc/exim4")
    before = tree_digest(exim_conf)
    ok(["exim4", "-bV"])
    sender = f"pkg-{uuid.uuid4().hex[:12]}@example.net"
    log = tmp_path / "policyd.log"
    daemon: subprocess.Popen[bytes] | None = None
    try:
        ok(["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)], env=APT_ENV)

        # What the package put in place.
        assert Path("/usr/bin/policyd").exists() and Path("/usr/bin/policyctl").exists()
        assert os.path.realpath("/usr/bin/policyd").startswith("/usr/lib/policyd/bin/")
        conffiles = ok(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE])
        assert str(CONFIG) in conffiles
        assert CONFIG.read_text() == (REPO / "etc/policyd.toml").read_text()
        for name in ("00_policyd", "rcpt.acl", "data.acl", "outbound.acl"):
            shipped = Path("/usr/share/policyd/exim") / name
            assert shipped.read_text() == (SNIPPETS_DIR / name).read_text()
        for unit in ("policyd.service", "policyd.socket"):
            assert Path("/lib/systemd/system", unit).exists()
        user = pwd.getpwnam(PACKAGE)
        exim_gid = grp.getgrnam(EXIM_GROUP).gr_gid
        assert PACKAGE not in grp.getgrgid(exim_gid).gr_mem  # not a member of Exim's group
        ok(["runuser", "-u", PACKAGE, "--", "policyd", "--config", str(CONFIG), "--check-config"])

        # A host without systemd: README.Debian's command, with a short delay in a drop-in.
        DROP_IN.parent.mkdir(exist_ok=True)
        DROP_IN.write_text(f'[greylist]\ndelay = "{int(DELAY)}s"\n')
        ok(["systemd-tmpfiles", "--create", "policyd.conf"])
        run_dir = Path("/run/policyd").stat()
        assert run_dir.st_gid == exim_gid and run_dir.st_mode & 0o2000, "not setgid Debian-exim"
        with open(log, "wb") as out:
            daemon = subprocess.Popen(START, stdout=out, stderr=subprocess.STDOUT)
        wait_until(
            lambda: run(["policyctl", "ping"]).returncode == 0 or daemon.poll() is not None,
            "the daemon to answer policyctl ping",
            30.0,
        )
        assert daemon.poll() is None, log.read_text()
        pid = daemon_pid()
        assert pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name == PACKAGE
        assert exim_gid not in groups_of(pid), "the daemon runs with Debian-exim's group"
        sock = Path("/run/policyd/policyd.sock").stat()
        assert (sock.st_uid, sock.st_gid, sock.st_mode & 0o777) == (user.pw_uid, exim_gid, 0o660)

        enable = ok(["policyctl", "exim", "enable"])
        assert "update-exim4.conf and exim4 -bV passed" in enable, enable

        first = replies(sender)
        assert first.get("RCPT") == 451, (first, log.read_text())
        time.sleep(DELAY + 0.5)
        retried = replies(sender)
        assert retried.get("RCPT") == 250 and retried.get(".") == 250, (retried, log.read_text())
        decisions = [line for line in log.read_text().splitlines() if f"'{sender}'" in line]
        assert "action=defer check=greylist reason=new" in decisions[0], decisions
        assert "action=ok check=greylist reason=passed" in decisions[-1], decisions

        # An upgrade (here: the same version again) keeps the hook and its fragments.
        again = ok(
            ["apt-get", "install", "--reinstall", "-y", "-q", str(deb)],
            env=APT_ENV,
        )
        assert "nothing to change, already enabled" in again, again
        assert run(["policyctl", "exim", "status"]).returncode == 0

        # apt remove: the hook taken out, the daemon stopped, Exim as it was.
        removal = ok(["apt-get", "remove", "-y", "-q", PACKAGE], env=APT_ENV)
        assert daemon.wait(timeout=30) is not None, removal
        daemon = None
        assert tree_digest(exim_conf) == before, removal
        ok(["exim4", "-bV"])
        after = replies(f"after-{sender}")
        assert after.get("RCPT") == 250 and after.get(".") == 250, after
        assert Path("/var/lib/policyd").exists()  # state is kept until purge

        ok(["apt-get", "purge", "-y", "-q", PACKAGE], env=APT_ENV)
        assert not installed()
        for gone in ("/etc/policyd", "/var/lib/policyd", "/run/policyd", "/usr/lib/policyd"):
            assert not Path(gone).exists(), gone
        with pytest.raises(KeyError):
            pwd.getpwnam(PACKAGE)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        if installed():
            run(["apt-get", "purge", "-y", "-q", PACKAGE], env=APT_ENV)
    assert tree_digest(exim_conf) == before
    ok(["exim4", "-bV"])

"""The Debian package's files agree with the rest of the tree (the package itself is built
and installed by tests/integration/exim/test_debian_package.py)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_debian_changelog_names_the_projects_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    first = (REPO / "debian/changelog").read_text().splitlines()[0]
    match = re.match(r"^policyd \(([^)]+)\) ", first)
    assert match, first
    # A native package: policyd_<version>_<arch>.deb, the version of pyproject.toml.
    assert match.group(1) == version
    assert (REPO / "debian/source/format").read_text().strip() == "3.0 (native)"


def test_the_package_ships_the_trees_units_sysusers_and_tmpfiles() -> None:
    for name in ("service", "socket", "sysusers", "tmpfiles"):
        link = REPO / f"debian/policyd.{name}"
        assert link.is_symlink() and link.resolve() == REPO / f"systemd/policyd.{name}"


def test_the_daemon_does_not_join_exims_group() -> None:
    service = (REPO / "systemd/policyd.service").read_text()
    assert not re.search(r"^SupplementaryGroups=", service, re.M)
    # RuntimeDirectory= would chown /run/policyd to policyd:policyd, losing Debian-exim.
    assert not re.search(r"^RuntimeDirectory=", service, re.M)
    sysusers = (REPO / "systemd/policyd.sysusers").read_text()
    assert not re.search(r"^m\s", sysusers, re.M)
    tmpfiles = (REPO / "systemd/policyd.tmpfiles").read_text()
    assert re.search(r"^d /run/policyd\s+2755\s+policyd\s+Debian-exim\s", tmpfiles, re.M)
    socket = (REPO / "systemd/policyd.socket").read_text()
    assert re.search(r"^SocketGroup=Debian-exim$", socket, re.M)
    config = tomllib.loads((REPO / "etc/policyd.toml").read_text())
    assert config["server"].get("socket_group", "") == ""

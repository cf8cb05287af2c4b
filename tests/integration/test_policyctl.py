"""``policyctl`` as operators run it: a subprocess against a running ``python -m policyd``
(unix sockets and SQLite in ``tmp_path``), checked by asking the daemon's Exim socket the way
Exim does. The pure parts (argument errors, import-file parsers) run in-process via ``main``.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.exim_client import ask_blocking
from support.policyd_process import REPO, DaemonFactory, DaemonProcess

from policyd.checks.greylist import DEFER_CODE, DEFER_ECODE
from policyd.ctl.importers import parse
from policyd.ctl.main import (
    EXIT_DAEMON_ERROR,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_USAGE,
    main,
)

GREYLISTED = f"defer {DEFER_CODE} {DEFER_ECODE} ".encode()
#: Greylisting with a 2 s delay; nothing whitelisted but loopback.
POLICY: dict[str, Any] = {"greylist": {"delay": "2s"}}
#: policyctl's own start-up is ~0.15 s; this only catches a hang.
CTL_TIMEOUT = 15.0


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def rcpt(ip: str, recipient: str, sender: str = "alice@example.net", host: str = "") -> bytes:
    """An RCPT question as exim-snippets/rcpt.acl writes it (no trailing newline)."""
    return (
        f"rcpt v=1 ip={ip} port=25 host_b64={b64(host)} helo_b64={b64('mx.example.net')} "
        f"from_b64={b64(sender)} rcpt_b64={b64(recipient)} auth_b64= nrcpt=1"
    ).encode()


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_ctl(*args: str, command: tuple[str, ...] | None = None) -> Run:
    """policyctl in a subprocess; a traceback on stderr fails the test whatever the code."""
    argv = [*(command or (sys.executable, "-m", "policyd.ctl")), *args]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT,
        env=DaemonProcess.environment(),
        cwd=REPO,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Run(done.returncode, done.stdout, done.stderr)


def admin_socket(daemon: DaemonProcess) -> str:
    return str(daemon.directory / "admin.sock")


def ctl(daemon: DaemonProcess, *args: str) -> Run:
    return run_ctl("--socket", admin_socket(daemon), *args)


def ok_ctl(daemon: DaemonProcess, *args: str) -> Run:
    result = ctl(daemon, *args)
    assert result.code == EXIT_OK, result
    return result


def ask(daemon: DaemonProcess, request: bytes) -> bytes:
    return ask_blocking(daemon.socket, request)


def start(daemon: DaemonProcess) -> DaemonProcess:
    """Start and wait for READY: the admin socket is bound after the Exim one."""
    daemon.start()
    daemon.wait_for_log("ready")
    return daemon


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> DaemonProcess:
    return start(daemon_factory(**POLICY))


# --- whitelists -----------------------------------------------------------------------------


def test_whitelist_add_applies_at_once_and_remove_greylists_again(daemon: DaemonProcess) -> None:
    client = "198.51.100.7"
    assert ask(daemon, rcpt(client, "one@test.example")).startswith(GREYLISTED)

    added = ok_ctl(daemon, "whitelist", "add", "cidr", "198.51.100.7/24", "--comment", "stuck")
    assert added.out.startswith("added client 198.51.100.0/24 (expires never)")
    assert ask(daemon, rcpt(client, "two@test.example")) == b"ok whitelist-client"

    listed = ok_ctl(daemon, "whitelist", "list", "--json").json()
    assert [(e["kind"], e["value"], e["comment"], e["expires"]) for e in listed] == [
        ("client", "198.51.100.0/24", "stuck", 0)
    ]
    human = ok_ctl(daemon, "whitelist", "list").out.splitlines()
    assert human[0].split() == ["KIND", "VALUE", "EXPIRES", "COMMENT"]
    assert human[1].split() == ["client", "198.51.100.0/24", "never", "stuck"]

    removed = ok_ctl(daemon, "whitelist", "remove", "client", "198.51.100.0/24")
    assert removed.out.strip() == "removed client 198.51.100.0/24"
    assert ask(daemon, rcpt(client, "three@test.example")).startswith(GREYLISTED)
    assert ok_ctl(daemon, "whitelist", "list", "--json").json() == []

    again = ctl(daemon, "whitelist", "remove", "client", "198.51.100.0/24")
    assert again.code == EXIT_DAEMON_ERROR
    assert "no client entry '198.51.100.0/24'" in again.err


def test_whitelist_expiry_is_honoured(daemon: DaemonProcess) -> None:
    client = "203.0.113.9"
    ok_ctl(daemon, "--json", "whitelist", "add", "ip", client, "--expires", "1s")
    added_at = time.monotonic()
    assert ask(daemon, rcpt(client, "one@test.example")) == b"ok whitelist-client"
    time.sleep(max(0.0, added_at + 1.2 - time.monotonic()))
    assert ask(daemon, rcpt(client, "two@test.example")).startswith(GREYLISTED)
    assert ok_ctl(daemon, "whitelist", "list", "--json").json() == []


def test_whitelist_entries_survive_a_restart(daemon: DaemonProcess) -> None:
    entries = [
        ("client", "2001:db8:5::/48"),
        ("client_host", "mail.example.org"),
        ("sender", "alerts@bank.example"),
        ("sender_domain", "example.com"),
        ("recipient", "postmaster@"),
        ("client_host_re", r"^mx\d+\.example\.net$"),
    ]
    for kind, value in entries:
        ok_ctl(daemon, "whitelist", "add", kind, value, "--comment", f"{kind} entry")
    assert daemon.stop() == 0
    start(daemon)

    listed = ok_ctl(daemon, "whitelist", "list", "--json").json()
    assert sorted((e["kind"], e["value"]) for e in listed) == sorted(entries)
    assert ask(daemon, rcpt("2001:db8:5:1::25", "a@test.example")) == b"ok whitelist-client"
    assert (
        ask(daemon, rcpt("198.51.100.30", "a@test.example", host="smtp1.mail.example.org"))
        == b"ok whitelist-client_host"
    )
    assert (
        ask(daemon, rcpt("198.51.100.31", "a@test.example", host="mx12.example.net"))
        == b"ok whitelist-client_host_re"
    )
    assert (
        ask(daemon, rcpt("198.51.100.32", "a@test.example", sender="Alerts@bank.example"))
        == b"ok whitelist-sender"
    )
    only_hosts = ok_ctl(daemon, "whitelist", "list", "--kind", "host", "--json").json()
    assert [e["value"] for e in only_hosts] == ["mail.example.org"]


# --- explain --------------------------------------------------------------------------------


def explain(daemon: DaemonProcess, ip: str, recipient: str, *extra: str) -> dict[str, Any]:
    args = ("--ip", ip, "--sender", "alice@example.net", "--recipient", recipient, *extra)
    result: dict[str, Any] = ok_ctl(daemon, "explain", *args, "--json").json()
    return result


def test_explain_matches_the_next_real_decision(daemon: DaemonProcess) -> None:
    client, recipient = "198.51.100.40", "bob@test.example"
    # Twice: explaining changes nothing, so the real question is still a first attempt.
    explain(daemon, client, recipient)
    new = explain(daemon, client, recipient)
    assert ok_ctl(daemon, "greylist", "show", "--json").json() == []
    answer = ask(daemon, rcpt(client, recipient))
    assert answer.startswith(GREYLISTED)
    assert new["decision"]["answer"].encode() == answer
    assert new["checks"][0]["status"] == "new"

    ok_ctl(daemon, "greylist", "pass", "--client", client, "--recipient", recipient)
    known = explain(daemon, client, recipient)
    assert known["decision"]["answer"] == "ok known"
    assert ask(daemon, rcpt(client, recipient)) == b"ok known"

    ok_ctl(daemon, "whitelist", "add", "ip", "192.0.2.44")
    listed = explain(daemon, "192.0.2.44", recipient)
    assert listed["checks"][0]["entry"]["value"] == "192.0.2.44/32"
    assert listed["decision"]["answer"].encode() == ask(daemon, rcpt("192.0.2.44", recipient))

    human = ok_ctl(
        daemon,
        "explain",
        *(
            "--ip",
            "198.51.100.41",
            "--sender",
            "alice@example.net",
            "--recipient",
            "c@test.example",
        ),
    ).out.splitlines()
    assert human[0].startswith(f"decision: {GREYLISTED.decode()}")
    assert human[1].strip().startswith("greylist: defer (new), retry in 2s (key 198.51.100.0/24|")


# --- greylist state -------------------------------------------------------------------------


def test_greylist_show_pass_and_flush(daemon: DaemonProcess) -> None:
    client = "198.51.100.50"
    asked = [
        ("alice@example.net", "one@test.example"),
        ("alice@example.net", "two@test.example"),
        ("bob@example.org", "one@test.example"),
    ]
    for sender, recipient in asked:
        assert ask(daemon, rcpt(client, recipient, sender)).startswith(GREYLISTED)

    shown = ok_ctl(daemon, "greylist", "show", "--json").json()
    assert sorted(t["key"] for t in shown) == sorted(f"198.51.100.0/24|{s}|{r}" for s, r in asked)
    assert all(not t["passed"] and t["attempts"] == 1 for t in shown)
    by_sender = ok_ctl(daemon, "greylist", "show", "--sender", "Bob@example.org", "--json").json()
    assert [t["key"] for t in by_sender] == ["198.51.100.0/24|bob@example.org|one@test.example"]
    table = ok_ctl(daemon, "greylist", "show", "--client", client).out.splitlines()
    assert table[0].split()[:3] == ["TRIPLET", "STATE", "ATTEMPTS"]
    assert len(table) == 4

    passed = ok_ctl(
        daemon,
        *("greylist", "pass", "--client", client),
        *("--sender", "alice@example.net", "--recipient", "one@test.example", "--json"),
    ).json()
    assert passed["passed"] == 1
    assert ask(daemon, rcpt(client, "one@test.example")) == b"ok known"

    flushed = ok_ctl(daemon, "greylist", "flush", "--recipient", "two@test.example", "--json")
    assert flushed.json() == {"flushed": 1}
    assert len(ok_ctl(daemon, "greylist", "show", "--json").json()) == 2

    refused = ctl(daemon, "greylist", "flush")
    assert refused.code == EXIT_USAGE
    assert "--all" in refused.err
    assert ctl(daemon, "greylist", "pass").code == EXIT_USAGE
    assert ok_ctl(daemon, "greylist", "flush", "--all").out.strip() == "flushed 2 triplet(s)"
    assert ok_ctl(daemon, "greylist", "show").out.strip() == "(none)"


# --- rate limits ----------------------------------------------------------------------------

#: Greylisting skips 192.0.2.0/24, so those questions reach the rate limit.
RATE_POLICY: dict[str, Any] = {"greylist": {"whitelist_clients": ["192.0.2.0/24"]}}
RATE_RULE = """
[[ratelimit.rule]]
name = "per-sender"
key = "sender"
count = "recipients"
rate = "2/1h"
"""


def test_ratelimit_show_top_and_reset(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(**RATE_POLICY)
    daemon.config_path.write_text(daemon.config_path.read_text() + RATE_RULE)
    start(daemon)
    flood, calm = "flood@example.net", "calm@example.org"
    for n in range(2):
        assert ask(daemon, rcpt("192.0.2.5", f"r{n}@test.example", flood)).startswith(b"ok ")
    assert ask(daemon, rcpt("192.0.2.5", "r2@test.example", flood)).startswith(b"defer 451 ")
    assert ask(daemon, rcpt("192.0.2.6", "r0@test.example", calm)).startswith(b"ok ")

    shown = ok_ctl(daemon, "ratelimit", "show", "--rule", "per-sender", "--json").json()
    assert {r["key"]: r["fill"] for r in shown} == pytest.approx(
        {f"per-sender|{flood}": 1.0, f"per-sender|{calm}": 0.5}, abs=0.01
    )
    top = ok_ctl(daemon, "ratelimit", "top", "--limit", "1", "--json").json()
    assert [r["key"] for r in top] == [f"per-sender|{flood}"]
    human = ok_ctl(daemon, "ratelimit", "top").out.splitlines()
    assert human[0].split() == ["RULE", "KEY", "FILL", "EMPTY", "AT"]
    assert human[1].split()[:3] == ["per-sender", flood, "100%"]

    unknown = ctl(daemon, "ratelimit", "show", "--rule", "per-planet")
    assert unknown.code == EXIT_DAEMON_ERROR
    assert "unknown rate-limit rule 'per-planet'" in unknown.err
    assert ctl(daemon, "ratelimit", "reset").code == EXIT_USAGE

    reset = ok_ctl(daemon, "ratelimit", "reset", "--rule", "per-sender", "--key", flood)
    assert reset.out.strip() == "reset 1 key(s) of rule per-sender"
    assert ask(daemon, rcpt("192.0.2.5", "r3@test.example", flood)).startswith(b"ok ")
    remaining = ok_ctl(daemon, "ratelimit", "show", "--json").json()
    assert {r["key"] for r in remaining} == {f"per-sender|{flood}", f"per-sender|{calm}"}

    stats = ok_ctl(daemon, "stats", "--json").json()
    assert stats["ratelimit"]["per-sender"]["limited"] == 1
    assert stats["rss_bytes"] > 0
    assert "ratelimit.per-sender.limited: 1" in ok_ctl(daemon, "stats").out


# --- import ---------------------------------------------------------------------------------

POSTGREY_CLIENTS = r"""# postgrey whitelist for mail client hostnames
# --------------------------------------------
# put this file in /etc/postgrey or specify its path
# with --whitelist-clients=xxx

# greylisting.org: Southwest Airlines (unique sender, no retry)
southwest.com
# 2004-06-29: rr.com (no retry, reported by Duncan Hill)
/^ms-smtp.*\.rr\.com$/
# 2004-07-02: papersinvited.com (no retry)
66.216.126.174
# jcsw.nato.int (several servers, no retry, reported by Vito Robar)
195.235.39
relay.example.net   # our backup MX
2001:db8:25::/48
/^mail(\d+\.example\.org$/
localhost
southwest.com
"""

POSTGREY_RECIPIENTS = r"""# postgrey whitelist for mail recipients
# --------------------------------------
# put this file in /etc/postgrey or specify its path
# with --whitelist-recipients=xxx

postmaster@
abuse@
spam-reports@example.org
lists.example.net
/^(info|sales)@example\.com$/
"""

SQLGREY_IP = """# Reference : http://www.greylisting.org
12.5.136.141    # Southwest Airlines (unique sender, no retry)
64.12.137       # AOL (common pool) - http://postmaster.aol.com/servers/imo.html
#64.233.170\t# gmail (common server pool)
66.135\t# Ebay (class B)
205.188.300\t# typo
"""

SQLGREY_FQDN = r"""##
# SQLgrey expects the following expressions:
#
# hostname.domain.com # whole system name (least CPU intensive)
# *.domain.com        # whitelist any fqdn in the domain 'domain.com'
# /regexp/            # whitelist any fqdn matching the regexp (by far most CPU intensive)

*.southwest.com
isp.belgacom.be
/^sc\d+pub\.verizon\.net$/
unitymail.alapage.com # Alapage newsletter
*.cacert.org
cacert.org
"""

SAMPLES = {
    "postgrey-clients": ("whitelist_clients", POSTGREY_CLIENTS),
    "postgrey-recipients": ("whitelist_recipients", POSTGREY_RECIPIENTS),
    "sqlgrey-ip": ("clients_ip_whitelist", SQLGREY_IP),
    "sqlgrey-fqdn": ("clients_fqdn_whitelist", SQLGREY_FQDN),
}
#: (kind, value) each sample adds, and the line numbers it skips.
EXPECTED: dict[str, tuple[set[tuple[str, str]], list[int]]] = {
    "postgrey-clients": (
        {
            ("client_host", "southwest.com"),
            ("client_host_re", r"^ms-smtp.*\.rr\.com$"),
            ("client", "66.216.126.174/32"),
            ("client", "195.235.39.0/24"),
            ("client_host", "relay.example.net"),
            ("client", "2001:db8:25::/48"),
        },
        [16, 17, 18],
    ),
    "postgrey-recipients": (
        {
            ("recipient", "postmaster@"),
            ("recipient", "abuse@"),
            ("recipient", "spam-reports@example.org"),
            ("recipient", "lists.example.net"),
        },
        [10],
    ),
    "sqlgrey-ip": (
        {
            ("client", "12.5.136.141/32"),
            ("client", "64.12.137.0/24"),
            ("client", "66.135.0.0/16"),
        },
        [6],
    ),
    "sqlgrey-fqdn": (
        {
            ("client_host", "southwest.com"),
            ("client_host", "isp.belgacom.be"),
            ("client_host_re", r"^sc\d+pub\.verizon\.net$"),
            ("client_host", "unitymail.alapage.com"),
            ("client_host", "cacert.org"),
        },
        [13],
    ),
}


@pytest.mark.parametrize("form", list(SAMPLES))
def test_import_parsers(form: str) -> None:
    parsed = parse(form, SAMPLES[form][1])
    entries, skipped = EXPECTED[form]
    assert {(i.kind, i.value) for i in parsed.items} == entries
    assert [s.line for s in parsed.skipped] == skipped


def test_import_reports_why_lines_are_skipped() -> None:
    clients = {s.line: s.reason for s in parse("postgrey-clients", POSTGREY_CLIENTS).skipped}
    assert "invalid regular expression" in clients[16]
    assert "not a host or domain name" in clients[17]
    assert clients[18] == "duplicate of line 7"
    (regex,) = parse("postgrey-recipients", POSTGREY_RECIPIENTS).skipped
    assert "recipient regular expression cannot be represented" in regex.reason
    (typo,) = parse("sqlgrey-ip", SQLGREY_IP).skipped
    assert typo.text == "205.188.300"
    relay = next(i for i in parse("postgrey-clients", POSTGREY_CLIENTS).items if i.line == 14)
    assert relay.note == "our backup MX"


def test_import_dry_run_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "whitelist_recipients"
    path.write_text(POSTGREY_RECIPIENTS)
    # No daemon at this socket: a dry run never connects.
    socket_arg = ["--socket", str(tmp_path / "absent.sock")]
    args = [*socket_arg, "import", "postgrey-recipients", str(path), "--dry-run"]
    assert main([*args, "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 4
    assert report["entries"][0] == {
        "kind": "recipient",
        "value": "postmaster@",
        "comment": "whitelist_recipients:6",
    }
    assert [s["line"] for s in report["skipped"]] == [10]
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:10: skipped '/^(info|sales)@example\\\\.com$/': ")
    assert out[-1] == (
        f"would add 4 entries, skipped 1 line(s) of postgrey whitelist_recipients {path}"
    )


def test_import_adds_the_entries_to_the_running_daemon(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    for form, (name, text) in SAMPLES.items():
        path = tmp_path / name
        path.write_text(text)
        report = ok_ctl(daemon, "import", form, str(path), "--json").json()
        entries, skipped = EXPECTED[form]
        assert report["added"] == len(entries), form
        assert [s["line"] for s in report["skipped"]] == skipped, form
    human = ok_ctl(daemon, "import", "sqlgrey-ip", str(tmp_path / "clients_ip_whitelist"))
    assert human.out.splitlines()[-1].startswith("added 3 entries, skipped 1 line(s)")

    listed = ok_ctl(daemon, "whitelist", "list", "--json").json()
    everything = set().union(*(entries for entries, _ in EXPECTED.values()))
    assert {(e["kind"], e["value"]) for e in listed} == everything
    relay = next(e for e in listed if e["value"] == "relay.example.net")
    assert relay["comment"] == "whitelist_clients:14 our backup MX"

    assert ask(daemon, rcpt("64.12.137.200", "a@test.example")) == b"ok whitelist-client"
    assert ask(daemon, rcpt("66.135.9.9", "a@test.example")) == b"ok whitelist-client"
    assert (
        ask(daemon, rcpt("198.51.100.60", "a@test.example", host="mx3.southwest.com"))
        == b"ok whitelist-client_host"
    )
    assert (
        ask(daemon, rcpt("198.51.100.61", "a@test.example", host="ms-smtp-04.nyroc.rr.com"))
        == b"ok whitelist-client_host_re"
    )
    assert (
        ask(daemon, rcpt("198.51.100.62", "spam-reports@example.org")) == b"ok whitelist-recipient"
    )
    assert ask(daemon, rcpt("198.51.100.63", "x@lists.example.net")) == b"ok whitelist-recipient"


# --- access and failures --------------------------------------------------------------------


@pytest.fixture
def open_directory() -> Iterator[Path]:
    """A directory every user may traverse (``tmp_path``'s parents are private to root), so
    only the admin socket's own mode decides who may connect."""
    path = Path(tempfile.mkdtemp(prefix="policyctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run policyctl as another user")
def test_a_user_without_access_gets_a_permission_error(
    daemon_factory: DaemonFactory, open_directory: Path
) -> None:
    sock = open_directory / "admin.sock"
    daemon = start(daemon_factory(**POLICY, admin={"socket": str(sock), "socket_mode": "0600"}))
    status = sock.stat()
    assert (stat.S_IMODE(status.st_mode), status.st_uid) == (0o600, 0)
    nobody = pwd.getpwnam("nobody")
    # Modules are loaded as root (this interpreter may live under /root, which nobody cannot
    # read; argparse loads ``locale`` lazily), then policyctl runs as nobody.
    as_nobody = (
        sys.executable,
        "-c",
        "import locale, os, sys; from policyd.ctl.main import build_parser, main; build_parser(); "
        f"os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid}); "
        "sys.exit(main(sys.argv[1:]))",
    )
    denied = run_ctl("--socket", str(sock), "whitelist", "list", command=as_nobody)
    assert denied.code == EXIT_PERMISSION
    assert denied.err.strip() == (
        f"policyctl: permission denied on the admin socket {sock}: run policyctl as the "
        "socket's owner or a member of its group ([admin] socket_group)"
    )
    assert denied.out == ""
    assert run_ctl("--socket", str(sock), "ping").code == EXIT_OK  # root still may
    assert daemon.stop() == 0


def test_daemon_not_running(tmp_path: Path) -> None:
    missing = tmp_path / "admin.sock"
    result = run_ctl("--socket", str(missing), "whitelist", "list")
    assert result.code == EXIT_NOT_RUNNING
    assert f"policyd is not running: cannot connect to the admin socket {missing}" in result.err

    # A socket file left behind by a daemon that died: connections are refused.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(str(stale))
    refused = run_ctl("--socket", str(stale), "--json", "stats")
    assert refused.code == EXIT_NOT_RUNNING
    assert str(stale) in refused.err
    assert refused.json()["exit"] == EXIT_NOT_RUNNING


def test_socket_comes_from_the_config_file(daemon: DaemonProcess) -> None:
    result = run_ctl("--config", str(daemon.config_path), "ping", "--json")
    assert result.code == EXIT_OK
    assert daemon.process is not None
    assert result.json()["pid"] == daemon.process.pid


def test_bad_input_from_the_command_line(tmp_path: Path) -> None:
    """Rejected before any connection: no daemon needed, no traceback, exit 2."""
    sock = str(tmp_path / "absent.sock")
    bad_cidr = run_ctl("--socket", sock, "whitelist", "add", "ip", "192.0.2.0/33")
    assert (bad_cidr.code, bad_cidr.err.strip()) == (
        EXIT_USAGE,
        "policyctl: '192.0.2.0/33' is not an IP address or CIDR",
    )
    unknown = run_ctl("--socket", sock, "frobnicate")
    assert unknown.code == EXIT_USAGE
    assert "invalid choice: 'frobnicate'" in unknown.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["whitelist", "add", "ip", "10.0.0.300"], "'10.0.0.300' is not an IP address or CIDR"),
        (["whitelist", "add", "planet", "mars"], "unknown kind 'planet'"),
        (["whitelist", "add", "ip", "192.0.2.1", "--expires", "soon"], "not a duration"),
        (["whitelist", "add", "sender", "nobody"], "is not an address"),
        (["whitelist", "add", "host_re", "(unclosed"], "invalid regular expression"),
        (["whitelist"], "required: ACTION"),
        (["greylist", "show", "--client", "192.0.2.999"], "--client: '192.0.2.999'"),
        (["greylist", "flush"], "(or --all)"),
        (["ratelimit", "top", "--limit", "0"], "not a positive whole number"),
        (["explain", "--ip", "1.2.3.4.5", "--sender", "", "--recipient", "b@x"], "--ip:"),
        (["explain", "--ip", "192.0.2.1"], "required: --sender, --recipient"),
        (["import", "exim-acl", "/dev/null"], "invalid choice: 'exim-acl'"),
        (["import", "sqlgrey-ip", "/nonexistent/file"], "cannot read /nonexistent/file"),
        (["--timeout", "0", "stats"], "not a positive duration"),
    ],
)
def test_usage_errors_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["--socket", str(tmp_path / "absent.sock"), *argv])
    captured = capsys.readouterr()
    assert code == EXIT_USAGE, captured
    assert message in captured.err
    assert "Traceback" not in captured.err


def test_config_errors_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "absent.toml"), "stats"]) == EXIT_USAGE
    assert "invalid configuration: cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[admin]\nsocket_mode = "rw"\n')
    assert main(["--config", str(bad), "stats"]) == EXIT_USAGE
    assert "admin.socket_mode" in capsys.readouterr().err


def test_global_options_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "absent.sock")
    assert main(["--socket", sock, "--json", "stats"]) == EXIT_NOT_RUNNING
    before = json.loads(capsys.readouterr().out)
    assert main(["stats", "--socket", sock, "--json"]) == EXIT_NOT_RUNNING
    after = json.loads(capsys.readouterr().out)
    assert before == after
    assert sock in before["error"]
    assert main(["--help"]) == EXIT_OK
    assert "whitelist" in capsys.readouterr().out

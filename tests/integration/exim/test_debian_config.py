"""A real Debian Exim configuration with the fragments in place, rendered by Debian's tool.

For both Debian layouts (the split ``conf.d/`` config and the single-file template) this
copies the machine's ``/etc/exim4``, installs the fragments as exim-snippets/README.md says,
sets ``update-exim4.conf.conf`` up for an internet site with a relay network, runs
``update-exim4.conf -d COPY -o OUT``, and then checks that ``exim4 -C OUT -bV`` accepts the
result and that ``exim4 -C OUT -bh`` asks a real policyd: inbound mail to a local user is
greylisted (451 4.7.1, then 250 after the delay); the relay network is asked the outbound
question (its rate-limit rule applies, greylisting does not).

The machine's ``/etc/exim4`` is only read. Everything written lives in the lab: the copy,
the rendered config, the spool (Debian's ``SPOOLDIR`` macro). ``exim -bh`` never delivers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.policyd_process import wait_until

from .conftest import (
    EXIM,
    EXIM_USER,
    GREYLIST_DELAY,
    NO_ANSWER_LOG,
    SNIPPETS_DIR,
    BhResult,
    Exim,
    Lab,
    Policyd,
    retry_until,
    sleep_until,
)

pytestmark = pytest.mark.exim

DEBIAN_CONFDIR = Path("/etc/exim4")
UPDATE_EXIM4_CONF = Path("/usr/sbin/update-exim4.conf")
LAYOUTS = ("split", "single")

TEST_DOMAIN = "test.example"
RELAY_NET = "203.0.113.0/24"
#: One relay client per layout: the outbound rule counts per client, layouts stay apart.
RELAY_CLIENTS = {"split": "203.0.113.25", "single": "203.0.113.26"}
INBOUND_NET = "192.0.2.0/24"
INBOUND_CLIENT = "192.0.2.10"
#: Debian's routers verify local parts against system users; root exists everywhere.
LOCAL_RCPT = f"root@{TEST_DOMAIN}"
#: Recipients per hour the outbound rule admits for one relay client.
OUTBOUND_LIMIT = 3
OUTBOUND_RULE = "relay-recipients"
#: How long after the delay a retry may still be refused (clock granularity, slow CI).
SLACK = 3.0

#: update-exim4.conf.conf for an internet site that relays for RELAY_NET.
DEBCONF = {
    "dc_eximconfig_configtype": "internet",
    "dc_other_hostnames": TEST_DOMAIN,
    "dc_local_interfaces": "127.0.0.1",
    "dc_relay_nets": RELAY_NET,
    "dc_relay_domains": "",
    "dc_smarthost": "",
    "dc_minimaldns": "false",
}
#: exim-snippets file -> its name under conf.d/acl/ (the dot keeps update-exim4.conf off it).
FRAGMENTS = {
    "rcpt.acl": "policyd_rcpt.acl",
    "data.acl": "policyd_data.acl",
    "outbound.acl": "policyd_outbound.acl",
}
#: The hook lines of 00_policyd; their paths are moved into the copy.
HOOK_RE = re.compile(r"^(CHECK_(?:RCPT|DATA)_LOCAL_ACL_FILE\s*=\s*)/etc/exim4/conf\.d/acl/", re.M)
#: Where outbound.acl goes: just before Debian's "accept / hosts = +relay_from_hosts".
RELAY_ACCEPT_RE = re.compile(
    r"^(?=[ \t]*accept[ \t]*\n[ \t]*hosts[ \t]*=[ \t]*\+relay_from_hosts\b)", re.M
)

DAEMON_CONFIG = """\
[server]
socket = {socket}
socket_mode = "0666"
deadline = "1s"
fallback = "accept"
log_decisions = "all"

[store]
url = {store}

[greylist]
delay = "{delay}s"
auto_whitelist_after = 0
whitelist_clients = []

[[ratelimit.rule]]
name = "{rule}"
key = "client"
count = "recipients"
rate = "{limit}/1h"
exempt_clients = [{inbound}]

[metrics]
enabled = false

[admin]
socket = {admin}
"""


class DebianPolicyd(Policyd):
    """Greylisting for everyone, plus an outbound per-client recipient limit that spares the
    inbound test network."""

    def write_config(self) -> None:
        self.config.write_text(
            DAEMON_CONFIG.format(
                socket=json.dumps(str(self.socket)),
                admin=json.dumps(str(self.directory / "admin.sock")),
                store=json.dumps(f"sqlite://{self.directory / 'state.sqlite3'}"),
                delay=int(GREYLIST_DELAY),
                rule=OUTBOUND_RULE,
                limit=OUTBOUND_LIMIT,
                inbound=json.dumps(INBOUND_NET),
            )
        )


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[DebianPolicyd]:
    policyd = DebianPolicyd(lab.subdir("debian-policyd"))
    policyd.write_config()
    policyd.start()
    try:
        yield policyd
    finally:
        assert policyd.stop() == 0, policyd.log_text()


@dataclass(frozen=True)
class DebianExim(Exim):
    """``exim -bh`` on the rendered config. It names the socket itself (POLICYD_SOCKET in
    the local macros), so ``Exim.bh``'s ``-DPOLICYD_SOCKET`` (which would override it) is
    checked against it instead of passed."""

    rendered: Path
    socket: Path

    def command(self, *args: str, **macros: str) -> list[str]:
        assert macros == {"POLICYD_SOCKET": str(self.socket)}, macros
        return [str(EXIM), "-C", str(self.rendered), *args]


@dataclass(frozen=True)
class Rendered:
    layout: str
    confdir: Path  # the edited copy of /etc/exim4
    output: Path  # what update-exim4.conf wrote
    tool_log: str  # update-exim4.conf -v, stdout and stderr
    exim: DebianExim

    @property
    def relay_client(self) -> str:
        return RELAY_CLIENTS[self.layout]


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"{command} exited with {done.returncode}:\n{done.stderr}"
    return done


def set_debconf(path: Path, values: dict[str, str]) -> None:
    """Set ``key='value'`` lines of update-exim4.conf.conf (a shell fragment), keeping the
    rest."""
    kept = [line for line in path.read_text().splitlines() if line.partition("=")[0] not in values]
    path.write_text("\n".join([*kept, *(f"{k}='{v}'" for k, v in values.items())]) + "\n")


def substitute(pattern: re.Pattern[str], text: str, replacement: str, expected: int) -> str:
    new, count = pattern.subn(lambda m: m.group(0) + replacement, text)
    assert count == expected, f"{pattern.pattern!r} matched {count} times, expected {expected}"
    return new


def render(lab: Lab, layout: str, socket: Path) -> Rendered:
    if not (UPDATE_EXIM4_CONF.exists() and (DEBIAN_CONFDIR / "exim4.conf.template").exists()):
        pytest.fail(
            f"{UPDATE_EXIM4_CONF} or {DEBIAN_CONFDIR} is missing: install exim4-config "
            "(exim4-daemon-heavy pulls it in)",
            pytrace=False,
        )
    root = lab.subdir(f"debian-{layout}")
    confdir = root / "exim4"
    shutil.copytree(DEBIAN_CONFDIR, confdir, symlinks=True)
    spool = root / "spool"
    spool.mkdir()
    shutil.chown(spool, EXIM_USER, EXIM_USER)
    acl_dir = confdir / "conf.d" / "acl"
    for source, name in FRAGMENTS.items():
        shutil.copyfile(SNIPPETS_DIR / source, acl_dir / name)
    outbound = f"  .include {acl_dir / FRAGMENTS['outbound.acl']}\n"

    # 00_policyd as shipped, its hook paths pointing into the copy; the site's own settings
    # above it, where the README says overrides go.
    macros, hooks = HOOK_RE.subn(
        lambda m: f"{m.group(1)}{acl_dir}/", (SNIPPETS_DIR / "00_policyd").read_text()
    )
    assert hooks == 2, "00_policyd: expected the two CHECK_*_LOCAL_ACL_FILE hook lines"
    local = f"POLICYD_SOCKET = {socket}\nSPOOLDIR = {spool}\n"

    set_debconf(
        confdir / "update-exim4.conf.conf",
        {**DEBCONF, "dc_use_split_config": "true" if layout == "split" else "false"},
    )
    if layout == "split":
        with open(confdir / "conf.d" / "main" / "000_localmacros", "a") as file:
            file.write(local)
        (confdir / "conf.d" / "main" / "00_policyd").write_text(macros)
        check_rcpt = acl_dir / "30_exim4-config_check_rcpt"
        check_rcpt.write_text(substitute(RELAY_ACCEPT_RE, check_rcpt.read_text(), outbound, 1))
    else:
        template = confdir / "exim4.conf.template"
        text = substitute(RELAY_ACCEPT_RE, template.read_text(), outbound, 1)
        # update-exim4.conf reads COPY/exim4.conf.localmacros only when the machine's
        # /etc/exim4/exim4.conf.localmacros exists (it tests that fixed path), and then just
        # puts it in front of the template: do the same here when it would not.
        localmacros = confdir / "exim4.conf.localmacros"
        if localmacros.exists():
            with open(localmacros, "a") as file:
                file.write(local + macros)
        else:
            text = local + macros + text
        template.write_text(text)

    output = root / "exim4.conf"
    done = run([str(UPDATE_EXIM4_CONF), "-v", "-d", str(confdir), "-o", str(output)])
    exim = DebianExim(lab, output, socket)
    return Rendered(layout, confdir, output, done.stdout + done.stderr, exim)


@pytest.fixture(scope="module", params=LAYOUTS)
def rendered(request: pytest.FixtureRequest, lab: Lab, daemon: DebianPolicyd) -> Rendered:
    return render(lab, request.param, daemon.socket)


def answered(result: BhResult, daemon: Policyd) -> str:
    """``describe()`` plus the daemon's log, for assertion messages."""
    return result.describe() + "\npolicyd log:\n" + daemon.log_text()[-3000:]


def decisions(daemon: Policyd, marker: str, count: int) -> list[str]:
    """The daemon's decision lines containing ``marker``, once there are ``count`` of them
    (the daemon writes its log lines once per loop iteration, maybe after the answer)."""

    def lines() -> list[str]:
        return [line for line in daemon.log_text().splitlines() if marker in line]

    wait_until(lambda: len(lines()) >= count, f"{count} decision lines with {marker!r}", 5.0)
    return lines()


def test_update_exim4_conf_output_is_accepted_by_exim(rendered: Rendered) -> None:
    status = os.stat(rendered.output)
    assert status.st_uid == 0 and not status.st_mode & 0o022  # what exim -C insists on
    text = rendered.output.read_text()
    assert f".include {rendered.confdir}/conf.d/acl/policyd_outbound.acl" in text
    assert re.search(r"^CHECK_RCPT_LOCAL_ACL_FILE\s*=", text, re.M), "00_policyd not rendered"
    if rendered.layout == "split":
        # The dotted fragment names keep them out of the concatenation: Exim reads them
        # once, through the hooks.
        for name in FRAGMENTS.values():
            assert f"ignoring file: {rendered.confdir}/conf.d/acl/{name}" in rendered.tool_log
    assert "policyd_setup_error" not in text  # no fragment pasted into the config itself
    done = run([str(EXIM), "-C", str(rendered.output), "-bV"])
    assert f"Configuration file is {rendered.output}" in done.stdout, done.stdout


def test_inbound_mail_to_a_local_user_is_greylisted_then_accepted(
    rendered: Rendered, daemon: DebianPolicyd
) -> None:
    sender = f"{rendered.layout}@example.org"

    def session() -> BhResult:
        return rendered.exim.bh(INBOUND_CLIENT, sender, [LOCAL_RCPT], socket_path=daemon.socket)

    first_seen = time.monotonic()
    first = session()
    assert first.rcpt_codes == [451], answered(first, daemon)
    assert first.rcpt[0].startswith("451 4.7.1 Greylisted"), answered(first, daemon)
    assert not [line for line in first.log_lines if NO_ANSWER_LOG in line], answered(first, daemon)

    sleep_until(first_seen + GREYLIST_DELAY)
    later = retry_until(session, lambda r: r.rcpt_codes == [250], SLACK)
    assert later.rcpt_codes == [250], answered(later, daemon)
    triplet = f"client={INBOUND_CLIENT} sender='{sender}' rcpt='{LOCAL_RCPT}'"
    # retry_until may have made early retries (deferred) before the 250; the accepting
    # line is the last one, and may reach the log a flush interval after the answer.
    wait_until(
        lambda: "action=ok check=greylist" in decisions(daemon, triplet, 2)[-1],
        "the accepting decision line",
        5.0,
    )
    logged = decisions(daemon, triplet, 2)
    assert "action=defer check=greylist" in logged[0], logged
    assert "action=ok check=greylist" in logged[-1], logged


def test_relay_network_is_asked_the_outbound_question(
    rendered: Rendered, daemon: DebianPolicyd
) -> None:
    rcpts = [f"friend{n}@remote.example" for n in range(OUTBOUND_LIMIT + 2)]
    client = rendered.relay_client
    result = rendered.exim.bh(client, f"user@{TEST_DOMAIN}", rcpts, socket_path=daemon.socket)
    # Fresh triplets accepted at once (no greylisting), then the rule's exact limit.
    expected = [250] * OUTBOUND_LIMIT + [451] * 2
    assert result.rcpt_codes == expected, answered(result, daemon)
    for reply in result.rcpt[OUTBOUND_LIMIT:]:
        assert reply.startswith("451 4.7.1 ") and OUTBOUND_RULE in reply, reply
    # Asked by outbound.acl (Debian accepts relay hosts before the rcpt.acl hook).
    outbound_logs = [line for line in result.log_lines if "policyd outbound: defer 451" in line]
    assert len(outbound_logs) == 2, answered(result, daemon)
    logged = decisions(daemon, f"decision stage=rcpt client={client} ", len(rcpts))
    assert len(logged) == len(rcpts), logged
    for line in logged[:OUTBOUND_LIMIT]:
        assert "action=ok check=greylist reason=relay-client" in line, line
    for line in logged[OUTBOUND_LIMIT:]:
        assert f"action=defer check=ratelimit reason={OUTBOUND_RULE}" in line, line

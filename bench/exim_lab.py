"""The Exim side of bench/exim_msg.py: the lab directory, the Exim configurations, the
loopback Exim daemons, the policy servers they ask, and the sink they deliver to.

Loopback Exim daemons (``exim4 -C CONF -bdf -oX PORT``, as tests/integration/exim/
conftest.py runs them: a lab directory Debian-exim can reach, root-owned 0644 configs,
``RUN_AS``/``SINK_PORT`` macros, ``deliver_drop_privilege``) all deliver to one aiosmtpd
sink on another loopback port. Their configs are generated into the lab from
``exim-snippets/test.conf`` (``make_config``):

- ``policyd``: test.conf as shipped (``rcpt.acl``, ``data.acl``, ``outbound.acl`` included),
  asking a policyd started here (SQLite store, greylisting delay 1 s);
- ``floor``: the same file, our fragments unchanged, asking bench/floor.py (answers ``ok``
  at once): what Exim's side of our questions costs, with a server that costs nothing;
- ``nocheck``: the same file without any ``.include`` line: no policy question at all;
- ``greylistd``: no policyd fragments; instead greylistd's own Exim ACL statement (its
  Debian example: ``${readsocket}`` with ``--grey IP SENDER RCPT``) in ``acl_check_rcpt``,
  asking a private greylistd (bench/peers.py) with ``retryMin`` 1 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers
import servers

EXIM = Path("/usr/sbin/exim4")
EXIM_USER = "Debian-exim"
SNIPPETS_DIR = servers.REPO_DIR / "exim-snippets"
SNIPPET_FILES = ("00_policyd", "rcpt.acl", "data.acl", "outbound.acl")
#: The configurations, in the order of the first round.
CONFIGS = ("policyd", "floor", "nocheck", "greylistd")
#: The configurations that ask a policy server, and which one.
ASKS = {"policyd": "policyd", "floor": "floor", "greylistd": "greylistd"}
START_TIMEOUT_S = 20.0
GREYLIST_DELAY_S = 1

INCLUDE_RE = re.compile(r"^\.include SNIPPETS/(\S+)\n", re.MULTILINE)

# greylistd's Exim ACL statement (its Debian example, exim4-acl-example.txt), reduced to what
# applies here: no whitelist files, no callout; the socket is a macro.
GREYLISTD_ACL = """\
  defer
    message        = $sender_host_address is not yet authorized to deliver \\
                     mail from <$sender_address> to <$local_part@$domain>. \\
                     Please try later.
    log_message    = greylisted.
    !senders       = :
    !authenticated = *
    condition      = ${readsocket{GREYLISTD_SOCKET}\\
                                 {--grey \\
                                  $sender_host_address \\
                                  $sender_address \\
                                  $local_part@$domain}\\
                                 {5s}{}{false}}
"""

POLICYD_CONFIG = """\
[server]
socket = {socket}
socket_mode = "0666"
deadline = "1s"
fallback = "accept"

[store]
url = {store}

[greylist]
enabled = true
delay = "{delay}s"
retry_window = "2d"
auto_whitelist_after = 0
learn = false
add_header = true
# The senders are on loopback, which the default whitelists: greylist them like anyone.
whitelist_clients = []

[metrics]
enabled = false

[admin]
socket = {admin}
"""


# --------------------------------------------------------------------------------------------
# The lab


def make_config(template: str, kind: str) -> str:
    """test.conf for ``kind``: as shipped (policyd, floor), without the includes, or with
    greylistd's ACL."""
    if kind in ("policyd", "floor"):
        return template
    includes = INCLUDE_RE.findall(template)
    assert {"rcpt.acl", "data.acl", "00_policyd"} <= set(includes), includes
    if kind == "nocheck":
        return INCLUDE_RE.sub("", template)
    assert kind == "greylistd"
    text = template.replace(".include SNIPPETS/rcpt.acl\n", GREYLISTD_ACL, 1)
    return INCLUDE_RE.sub("", text)


def make_lab(configs: list[str]) -> Path:
    """Root-owned 0755 lab; per config spool/log/mail owned by Debian-exim."""
    lab = Path(tempfile.mkdtemp(prefix="policyd-eximbench-"))
    lab.chmod(0o755)
    snippets = lab / "snippets"
    snippets.mkdir(mode=0o755)
    for name in SNIPPET_FILES:
        target = snippets / name
        shutil.copyfile(SNIPPETS_DIR / name, target)
        os.chown(target, 0, 0)
        target.chmod(0o644)
    template = (SNIPPETS_DIR / "test.conf").read_text()
    for kind in configs:
        home = lab / kind
        home.mkdir(mode=0o755)
        for sub in ("spool", "log", "mail"):
            (home / sub).mkdir()
            shutil.chown(home / sub, EXIM_USER, EXIM_USER)
        conf = lab / f"{kind}.conf"
        conf.write_text(make_config(template, kind))
        os.chown(conf, 0, 0)
        conf.chmod(0o644)
    return lab


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# The sink


@dataclass
class Sink:
    """Arrival time (monotonic) of each delivered copy, keyed by its X-Bench-Id header."""

    arrivals: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    event: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        now = time.monotonic()
        m = re.search(rb"^X-Bench-Id: (\S+)", envelope.original_content, re.MULTILINE)
        if m:
            with self.event:
                self.arrivals[m.group(1).decode()] = now
                self.event.notify_all()
        return "250 2.0.0 stored"

    def wait_for(self, keys: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.event:
            while not all(k in self.arrivals for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.event.wait(left)


# --------------------------------------------------------------------------------------------
# Exim daemons


@dataclass
class Exim:
    kind: str
    port: int
    process: subprocess.Popen[bytes]
    stderr: Path


def start_exim(lab: Path, kind: str, macros: dict[str, str]) -> Exim:
    port = free_port()
    defines = {"LAB": str(lab / kind), "SNIPPETS": str(lab / "snippets"), **macros}
    argv = [str(EXIM), "-C", str(lab / f"{kind}.conf")]
    argv += [f"-D{k}={v}" for k, v in defines.items()]
    argv += ["-bdf", "-oX", str(port), "-oP", str(lab / kind / "exim-bd.pid")]
    stderr = lab / kind / "exim-bd.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    step = 0.05
    for _ in range(int(START_TIMEOUT_S / step)):
        if proc.poll() is not None:
            raise RuntimeError(f"exim {kind} exited {proc.returncode}: {stderr.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return Exim(kind, port, proc, stderr)
        time.sleep(step)
    stop_process(proc)
    raise RuntimeError(f"exim {kind} not listening after {START_TIMEOUT_S}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(10)


def exim_version() -> str:
    try:
        out = subprocess.run(
            [str(EXIM), "-bV"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "unknown"
    m = re.search(r"Exim version (\S+)", out.stdout)
    return m.group(1) if m else "unknown"


def start_policyd(lab: Path) -> servers.Server:
    """policyd for the ``policyd`` Exim: SQLite, greylisting delay ``GREYLIST_DELAY_S``,
    its socket open to Debian-exim."""
    pd_dir = lab / "policyd-d"
    pd_dir.mkdir(mode=0o755)
    pd_conf = pd_dir / "policyd.toml"
    pd_conf.write_text(
        POLICYD_CONFIG.format(
            socket=json.dumps(str(pd_dir / "policyd.sock")),
            store=json.dumps(f"sqlite://{pd_dir / 'state.sqlite3'}"),
            admin=json.dumps(str(pd_dir / "admin.sock")),
            delay=GREYLIST_DELAY_S,
        )
    )
    argv = [servers.SERVER_PYTHON, "-m", "policyd", "--config", str(pd_conf)]
    sock = str(pd_dir / "policyd.sock")
    return servers._spawn("policyd", argv, sock, pd_dir, env=servers.POLICYD_ENV)


def start_floor(lab: Path) -> servers.Server:
    """bench/floor.py for the ``floor`` Exim, its socket open to Debian-exim (floor.py
    leaves it to the umask; Exim's ACL runs as Debian-exim and needs write access)."""
    home = lab / "floor-d"
    home.mkdir(mode=0o755)
    floor = servers.start_floor(home)
    os.chmod(floor.socket, 0o666)
    return floor


def start_policy_servers(
    lab: Path, configs: list[str]
) -> tuple[dict[str, servers.Server], dict[str, str]]:
    """The policy server of every configuration that asks one; a greylistd that cannot
    start is left out with a note (its configuration is then skipped)."""
    started: dict[str, servers.Server] = {}
    notes: dict[str, str] = {}
    try:
        for kind in configs:
            if kind == "policyd":
                started[kind] = start_policyd(lab)
            elif kind == "floor":
                started[kind] = start_floor(lab)
            elif kind == "greylistd":
                started[kind] = peers.start_greylistd(
                    lab, delay_s=GREYLIST_DELAY_S, socket_mode="0666", name="greylistd-d"
                )
    except (RuntimeError, OSError) as exc:
        if kind != "greylistd":
            for server in started.values():
                servers.stop(server)
            raise
        notes[kind] = f"failed to start: {str(exc)[-300:]}: skipped"
    return started, notes


def macros_for(kind: str, sink_port: int, policy: dict[str, servers.Server]) -> dict[str, str]:
    """An Exim's macros: the sink, and the socket of the server its ACL asks."""
    macros = {"SINK_PORT": str(sink_port)}
    if kind in ("policyd", "floor"):
        # No host name: test.conf has host_lookup off and this machine no resolver, so
        # $sender_host_name would cost a reverse DNS timeout per connection (5-10 s stalls);
        # the other variants do no lookup either. Debian's host_lookup = * pays it anyway.
        macros.update(POLICYD_SOCKET=policy[kind].socket, POLICYD_HOST_NAME="no")
    elif kind == "greylistd":
        macros["GREYLISTD_SOCKET"] = policy[kind].socket
    return macros


def fail_open_lines(lab: Path, kind: str) -> int:
    """How many times an Exim logged that our fragments got no usable answer (and went
    on, fail-open): each is a question that did not measure the server."""
    try:
        text = (lab / kind / "log" / "mainlog").read_text(errors="replace")
    except OSError:
        return 0
    return text.count("policyd: no usable answer")

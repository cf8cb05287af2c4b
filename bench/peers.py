"""The peers: greylistd and postgrey, started privately and asked in their own protocols.

Both come from Debian packages (``greylistd``, ``postgrey``). They run as subprocesses of
the bench in a temporary directory with a private config and data directory, never as the
system services (``apt-get install`` under the bench keeps the services from starting).

- **greylistd** (Python, in-RAM dict, one select() loop): a unix socket; one line per
  connection, ``--grey IP SENDER RECIPIENT`` exactly as its Exim ACL example sends it with
  ``${readsocket}``; the answer is ``true`` (greylisted: defer) or ``false``. Exim asks it
  connection per question, like policyd, so the bench's Exim-like client drives it as is.
- **postgrey** (Perl, Net::Server::Multiplex, BerkeleyDB): the Postfix policy delegation
  protocol (``name=value`` lines, a blank line; answer ``action=…`` and a blank line), here on
  a unix socket. Postfix keeps the connection open; the bench measures it both ways,
  connection per question and persistent (labelled ``postgrey`` and ``postgrey-persistent``).

The questions are the bench workload's (bench/workload.py) translated: the same client
address (normalised as Exim would hand it over), sender and recipient in the same order.

    python3 bench/peers.py --check     # install if root and absent, start both, ask a few
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
from workload import WHITELIST_CIDRS, Packed

PEERS = ("greylistd", "postgrey")
PACKAGES = {"greylistd": "greylistd", "postgrey": "postgrey"}
EXECUTABLES = {"greylistd": "/usr/sbin/greylistd", "postgrey": "/usr/sbin/postgrey"}
POLICY_RC = Path("/usr/sbin/policy-rc.d")
APT_TIMEOUT_S = 600
#: Postfix policy delegation: an answer (and a request) ends with an empty line.
POSTFIX_TERMINATOR = b"\n\n"


# --------------------------------------------------------------------------------------------
# Installation


def installed(name: str) -> bool:
    return Path(EXECUTABLES[name]).exists()


def version(name: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGES[name]],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _apt(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        timeout=APT_TIMEOUT_S,
        env=env,
        check=False,
    )


def ensure_installed(names: Iterable[str]) -> dict[str, str]:
    """Install the missing peers with apt-get when root; returns {name: note} for the
    peers still missing afterwards (why they are skipped)."""
    missing = [n for n in names if not installed(n)]
    if not missing:
        return {}
    if os.geteuid() != 0:
        return {n: f"not installed ({PACKAGES[n]}) and not root: skipped" for n in missing}
    if shutil.which("apt-get") is None:
        return {n: "not installed and no apt-get: skipped" for n in missing}
    # Keep the packages' system services from starting (Debian's policy-rc.d mechanism):
    # the bench runs its own private instances. Only a file we created is removed.
    made_policy = False
    if not POLICY_RC.exists():
        POLICY_RC.write_text("#!/bin/sh\n# written by policyd bench/peers.py\nexit 101\n")
        POLICY_RC.chmod(0o755)
        made_policy = True
    try:
        pkgs = [PACKAGES[n] for n in missing]
        print(f"peers: apt-get install {' '.join(pkgs)}", file=sys.stderr)
        done = _apt(["install", "-y", "--no-install-recommends", *pkgs])
        if done.returncode != 0:
            _apt(["update"])
            done = _apt(["install", "-y", "--no-install-recommends", *pkgs])
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        tail = [str(exc)]
    finally:
        if made_policy:
            POLICY_RC.unlink(missing_ok=True)
    return {
        n: f"apt-get install {PACKAGES[n]} failed: {' / '.join(tail)}: skipped"
        for n in missing
        if not installed(n)
    }


# --------------------------------------------------------------------------------------------
# Start


def start_greylistd(
    workdir: Path,
    *,
    delay_s: int = 300,
    socket_mode: str = "0600",
    name: str = "greylistd",
) -> servers.Server:
    """greylistd with a private config, state files and socket in ``workdir/name``."""
    home = workdir / name
    home.mkdir(mode=0o755, exist_ok=True)
    home.chmod(0o755)
    sock = home / "socket"
    config = home / "config"
    owner = "root:root" if os.geteuid() == 0 else ""
    config.write_text(
        "# private greylistd config written by policyd bench/peers.py\n"
        "[timeouts]\n"
        f"retryMin = {delay_s}\n"
        "retryMax = 28800\n"
        "expire = 5184000\n"
        "[socket]\n"
        f"path = {sock}\n"
        f"mode = {socket_mode}\n" + (f"owner = {owner}\n" if owner else "") + "[data]\n"
        "update = 3600\n"
        f"statefile = {home / 'states'}\n"
        f"tripletfile = {home / 'triplets'}\n"
        "savetriplets = true\n"
        "singlecheck = false\n"
        "singleupdate = false\n"
    )
    argv = [EXECUTABLES["greylistd"], str(config)]
    server = servers._spawn(name, argv, str(sock), workdir)
    server.extra["version"] = version("greylistd")
    return server


def start_postgrey(
    workdir: Path,
    *,
    delay_s: int = 300,
    name: str = "postgrey",
) -> servers.Server:
    """postgrey on a unix socket with a private db dir and whitelist in ``workdir/name``.

    The whitelist is the bench's (``WHITELIST_CIDRS``, as policyd's bench config), not
    Debian's list of host-name patterns; auto-whitelisting stays at its default (5)."""
    home = workdir / name
    home.mkdir(mode=0o755, exist_ok=True)
    home.chmod(0o755)
    workdir.chmod(0o755)  # postgrey drops to its own user: it must reach its db dir
    dbdir = home / "db"
    dbdir.mkdir(exist_ok=True)
    user = "postgrey"
    try:
        pw = pwd.getpwnam(user)
        if os.geteuid() == 0:
            os.chown(dbdir, pw.pw_uid, pw.pw_gid)
    except KeyError:
        user = pwd.getpwuid(os.geteuid()).pw_name
    wl_clients = home / "whitelist_clients"
    wl_clients.write_text("".join(f"{c}\n" for c in WHITELIST_CIDRS))
    wl_rcpts = home / "whitelist_recipients"
    wl_rcpts.write_text("")
    sock = home / "socket"
    argv = [
        EXECUTABLES["postgrey"],
        f"--unix={sock}",
        "--socketmode=0666",
        f"--dbdir={dbdir}",
        f"--delay={delay_s}",
        f"--whitelist-clients={wl_clients}",
        f"--whitelist-recipients={wl_rcpts}",
        f"--user={user}",
        f"--group={user}",
        "--hostname=bench.example",
        "--listen-queue-size=256",
    ]
    server = servers._spawn(name, argv, str(sock), workdir)
    server.extra["version"] = version("postgrey")
    return server


# --------------------------------------------------------------------------------------------
# The workload, translated


def parse_request(request: bytes) -> dict[str, str]:
    """The fields of one policyd request (``key=value`` words; ``*_b64`` decoded)."""
    out: dict[str, str] = {}
    for word in request.decode("ascii").split()[1:]:
        key, _, value = word.partition("=")
        if key.endswith("_b64"):
            out[key[:-4]] = base64.b64decode(value).decode("utf-8", "replace")
        else:
            out[key] = value
    return out


def exim_ip(text: str) -> str:
    """The client address as Exim's $sender_host_address has it (compressed, no brackets,
    IPv4-mapped addresses as IPv4)."""
    addr = ipaddress.ip_address(text.strip("[]"))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def greylistd_line(f: dict[str, str]) -> bytes:
    # greylistd splits on white space: an empty (null) sender would drop a word. Its Exim
    # ACL does not ask for null senders (!senders = :); here they are asked as "<>".
    sender = f.get("from") or "<>"
    return f"--grey {exim_ip(f['ip'])} {sender} {f['rcpt']}".encode()


def postfix_request(f: dict[str, str]) -> bytes:
    return (
        "request=smtpd_access_policy\n"
        "protocol_state=RCPT\n"
        "protocol_name=ESMTP\n"
        f"client_address={exim_ip(f['ip'])}\n"
        "client_name=unknown\n"
        "reverse_client_name=unknown\n"
        f"helo_name={f.get('helo', '')}\n"
        f"sender={f.get('from', '')}\n"
        f"recipient={f['rcpt']}\n"
        "recipient_count=0\n"
        "queue_id=\n"
        f"instance={f.get('txn', '')}\n"
        "size=0\n"
        "\n"
    ).encode()


def translate(requests: Packed, peer: str) -> Packed:
    """The same questions in ``peer``'s own protocol, in the same order."""
    fn = greylistd_line if peer == "greylistd" else postfix_request
    return Packed([fn(parse_request(requests[i])) for i in range(len(requests))])


# --------------------------------------------------------------------------------------------


def _check() -> int:
    import loadgen
    from workload import generate

    notes = ensure_installed(PEERS)
    for name, note in notes.items():
        print(f"{name}: {note}")
    workdir = Path(tempfile.mkdtemp(prefix="policyd-peers-"))
    started: list[servers.Server] = []
    try:
        wl = generate(2000, 1).packed()
        for name in PEERS:
            if name in notes:
                continue
            start = start_greylistd if name == "greylistd" else start_postgrey
            srv = start(workdir)
            started.append(srv)
            reqs = translate(wl, name)
            term = None if name == "greylistd" else POSTFIX_TERMINATOR
            modes = [False] if name == "greylistd" else [False, True]
            for persistent in modes:
                res = loadgen.run_load(
                    srv.socket,
                    reqs,
                    concurrency=2,
                    duration=0.5,
                    warmup=0.1,
                    terminator=term,
                    persistent=persistent,
                    target=f"{name}{' persistent' if persistent else ''} {srv.extra['version']}",
                )
                print(loadgen.format_result(res))
    finally:
        for srv in started:
            servers.stop(srv)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="install, start, ask a few")
    args = parser.parse_args(argv)
    if args.check:
        return _check()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

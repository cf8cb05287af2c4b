"""``policyctl``: the operator's command line over the admin socket (docs/admin.md).

Each command becomes line-delimited JSON requests to a running daemon; the answer is printed
for humans or, with ``--json``, as JSON for scripts. Exit codes: 0 ok, 1 the daemon refused
or failed, 2 usage error, 3 daemon not running, 4 permission denied on the socket. Input is
validated here first, so a typo never needs the daemon and never shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, Final

from .. import __version__
from ..config import ConfigError, load, parse_duration
from ..config import files as configfile
from ..whitelist import KINDS, MAX_CLIENT_PREFIX
from . import exim as exim_hook
from .client import (
    DEFAULT_TIMEOUT,
    EXIT_DAEMON_ERROR,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_USAGE,
    CtlError,
    Session,
    usage_error,
)
from .commands import (
    Reply,
    cmd_explain,
    cmd_greylist_flush,
    cmd_greylist_pass,
    cmd_greylist_show,
    cmd_import,
    cmd_ping,
    cmd_ratelimit_reset,
    cmd_ratelimit_show,
    cmd_ratelimit_top,
    cmd_stats,
    cmd_whitelist_add,
    cmd_whitelist_list,
    cmd_whitelist_remove,
)
from .importers import FORMATS

__all__ = [
    "EXIT_DAEMON_ERROR",
    "EXIT_NOT_RUNNING",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_STATUS",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

#: policyctl's exit statuses, shown by --help and policyctl(8).
EXIT_STATUS: Final = (
    (EXIT_OK, "done"),
    (EXIT_DAEMON_ERROR, "the daemon refused or failed the request (its message is printed)"),
    (EXIT_USAGE, "usage error (checked before connecting) or an unreadable configuration"),
    (EXIT_NOT_RUNNING, "the daemon is not running: no socket, refused, or no answer"),
    (EXIT_PERMISSION, "permission denied on the admin socket"),
)
#: Friendly names accepted for whitelist kinds.
KIND_ALIASES: Final = {
    "ip": "client",
    "cidr": "client",
    "net": "client",
    "network": "client",
    "host": "client_host",
    "hostname": "client_host",
    "host_re": "client_host_re",
    "host-re": "client_host_re",
    "domain": "sender_domain",
    "sender-domain": "sender_domain",
    "from": "sender",
    "rcpt": "recipient",
    "client-host": "client_host",
    "client-host-re": "client_host_re",
}


# --- argument checks ------------------------------------------------------------------------


def kind_arg(text: str) -> str:
    kind = KIND_ALIASES.get(text.lower(), text.lower())
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(
            f"unknown kind {text!r}; use one of {', '.join(KINDS)} (or ip, cidr, host, domain)"
        )
    return kind


def duration_arg(text: str) -> float:
    if text.lower() in ("never", "0"):
        return 0.0
    try:
        return parse_duration(text, "duration")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 12h, 7d") from None


def timeout_arg(text: str) -> float:
    try:
        seconds = parse_duration(text, "timeout")
    except ConfigError:
        seconds = 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration like 5 or 30s")
    return seconds


def positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return number


# --- the command line -----------------------------------------------------------------------

Command = Callable[[argparse.Namespace, Session], Reply]


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=default(None),
        help="the admin socket (default: [admin] socket of the daemon's config file)",
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=default(None),
        help=f"the daemon's config file, for its [admin] socket (default: ${configfile.ENV_VAR}, "
        f"else {configfile.SYSTEM_CONFIG} when it exists, else the built-in defaults), "
        "as policyd finds it",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    parser.add_argument(
        "--timeout",
        type=timeout_arg,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the command. After it, their default is
    # SUPPRESS, so a sub-parser does not overwrite a value given before the command.
    parser = argparse.ArgumentParser(
        prog="policyctl",
        description="Administer a running policyd over its admin socket: whitelists, greylist "
        "and rate-limit state, explanations, figures. Changes apply at once and are kept in "
        "the store.",
        epilog="exit status: " + "; ".join(f"{code} {text}" for code, text in EXIT_STATUS),
    )
    add_global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, suppress=True)
    parser.add_argument(
        "--version", action="version", version=f"policyctl {__version__}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, parents=[common], help=help_text)
        sub.set_defaults(func=func)
        return sub

    leaf(commands, "ping", cmd_ping, "check that the daemon answers")

    whitelist = commands.add_parser("whitelist", help="runtime whitelists").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = leaf(whitelist, "add", cmd_whitelist_add, "add an entry (applies at once)")
    add.add_argument("kind", type=kind_arg, metavar="KIND", help=", ".join(KINDS))
    add.add_argument("value", metavar="VALUE", help="what the entry matches (see KIND)")
    add.add_argument(
        "--expires",
        type=duration_arg,
        default=0.0,
        metavar="DURATION",
        help="the entry stops matching after this long, e.g. 12h or 7d (default: never)",
    )
    add.add_argument("--comment", default=None, metavar="TEXT", help="a note kept with the entry")
    add.add_argument(
        "--force",
        action="store_true",
        help=f"accept a client network wider than IPv4 /{MAX_CLIENT_PREFIX[4]} or IPv6 "
        f"/{MAX_CLIENT_PREFIX[6]}, or a recipient domain without a dot",
    )
    remove = leaf(whitelist, "remove", cmd_whitelist_remove, "remove an entry")
    remove.add_argument("kind", type=kind_arg, metavar="KIND", help=", ".join(KINDS))
    remove.add_argument("value", metavar="VALUE", help="the value as added or as listed")
    listing = leaf(whitelist, "list", cmd_whitelist_list, "list live entries")
    listing.add_argument(
        "--kind", type=kind_arg, default=None, metavar="KIND", help="only entries of this kind"
    )

    greylist = commands.add_parser("greylist", help="greylist triplets").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    for name, func, help_text in (
        ("show", cmd_greylist_show, "list triplets"),
        ("pass", cmd_greylist_pass, "let triplets pass now"),
        ("flush", cmd_greylist_flush, "forget triplets"),
    ):
        sub = leaf(greylist, name, func, help_text)
        sub.add_argument(
            "--client",
            metavar="IP|CIDR",
            help="the client's network: an address, or the network as stored",
        )
        sub.add_argument(
            "--sender", metavar="ADDR", help="the envelope sender, as sent or as keyed"
        )
        sub.add_argument("--recipient", metavar="ADDR", help="the recipient")
        sub.add_argument(
            "--all", action="store_true", help="every triplet (needed by pass and flush)"
        )
        sub.add_argument(
            "--limit",
            type=positive_int,
            default=None,
            metavar="N",
            help="at most N triplets (default 100)",
        )

    ratelimit = commands.add_parser("ratelimit", help="rate-limit state").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    for name, func, help_text in (
        ("show", cmd_ratelimit_show, "list keys"),
        ("top", cmd_ratelimit_top, "keys closest to their limit"),
        ("reset", cmd_ratelimit_reset, "forget keys of a rule"),
    ):
        sub = leaf(ratelimit, name, func, help_text)
        sub.add_argument("--rule", metavar="NAME", help="the rule (required by reset)")
        sub.add_argument("--key", metavar="K", help="key after the rule name, e.g. 192.0.2.7/32")
        sub.add_argument(
            "--limit",
            type=positive_int,
            default=None,
            metavar="N",
            help="at most N keys (default 100; top: 10)",
        )

    explain = leaf(commands, "explain", cmd_explain, "what each check would decide now")
    explain.add_argument("--ip", required=True, help="client IP address")
    explain.add_argument("--sender", required=True, help="envelope sender ('' for <>)")
    explain.add_argument("--recipient", required=True, help="recipient address")
    explain.add_argument("--helo", default="", help="HELO name")
    explain.add_argument("--host", default="", help="client host name (forward-confirmed)")
    explain.add_argument("--auth", default="", help="authenticated user")

    leaf(commands, "stats", cmd_stats, "daemon figures")

    imp = leaf(commands, "import", cmd_import, "import a postgrey or sqlgrey whitelist file")
    imp.add_argument("format", choices=list(FORMATS), metavar="FORMAT", help=", ".join(FORMATS))
    imp.add_argument("file", metavar="FILE", help="the whitelist file to read")
    imp.add_argument("--comment", default=None, help="comment for every entry")
    imp.add_argument("--dry-run", action="store_true", help="parse and show, add nothing")
    exim_hook.add_parser(commands)  # needs no daemon: run() takes it before the session
    return parser


def socket_path(args: argparse.Namespace) -> tuple[str, str]:
    """``--socket``, else the ``[admin] socket`` of the config file policyd would read; and
    where it came from, for the message when nothing answers there."""
    if args.socket:
        return str(args.socket), "--socket"
    choice = configfile.find(args.config)
    try:
        path = load(choice.path).admin.socket
    except ConfigError as exc:
        where = "" if args.config else f" [{choice.describe()}]"
        usage_error(f"invalid configuration: {exc}{where}; or name the socket with --socket")
    if not path:
        usage_error(f"the admin socket is off in {choice.describe()} ([admin] socket is empty)")
    return path, f"[admin] socket of {choice.describe()}"


def emit(reply: Reply, as_json: bool) -> None:
    if as_json:
        print(json.dumps(reply.data, indent=2, sort_keys=True, default=str))
    else:
        for line in reply.lines:
            print(line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "exim":
        return exim_hook.run(args)
    session: Session | None = None
    origin = ""
    try:
        path, origin = socket_path(args)
        session = Session(path, args.timeout)
        emit(args.func(args, session), args.json)
    except CtlError as exc:
        if exc.code == EXIT_NOT_RUNNING and origin != "--socket":
            exc = CtlError(f"{exc}; the path is the {origin}", exc.code)
        print(f"policyctl: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "exit": exc.code}))
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head(1) and friends
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  # silences the flush at exit
    finally:
        if session is not None:
            session.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

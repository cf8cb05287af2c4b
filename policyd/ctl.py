"""``policyctl``: the operator's command line over the admin socket (docs/admin.md).

Each command becomes one line-delimited JSON request to a running daemon; the answer is
printed for humans or, with ``--json``, as JSON for scripts. Exit codes: 0 ok, 1 the daemon
refused or failed, 2 usage error, 3 daemon not running, 4 permission denied on the socket.
Input is validated here first, so a typo never needs the daemon and never shows a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

from . import __version__
from .config import AdminConfig, ConfigError, load, parse_duration
from .importers import FORMATS, parse
from .lists import KINDS, ListError, normalise_entry
from .protocol import ProtocolError, normalise_ip

EXIT_OK: Final = 0
EXIT_DAEMON_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_RUNNING: Final = 3
EXIT_PERMISSION: Final = 4
#: Seconds to wait for the daemon's answer to one request.
DEFAULT_TIMEOUT: Final = 10.0
#: Entries per ``whitelist.add`` request during an import (well under admin.MAX_LINE).
IMPORT_BATCH: Final = 500
#: The longest answer line read (a listing of the whole whitelist fits with room to spare).
MAX_ANSWER: Final = 64 << 20
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


class CtlError(Exception):
    """Ends the command with ``code`` after printing the message."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def usage_error(message: str) -> NoReturn:
    raise CtlError(message, EXIT_USAGE)


class Session:
    """One connection to the admin socket, opened at the first request."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise CtlError(
                f"policyd is not running: cannot connect to the admin socket {self.path} "
                f"({exc.strerror})",
                EXIT_NOT_RUNNING,
            ) from None
        except PermissionError:
            sock.close()
            raise CtlError(
                f"permission denied on the admin socket {self.path}: run policyctl as the "
                "socket's owner or a member of its group ([admin] socket_group)",
                EXIT_PERMISSION,
            ) from None
        except TimeoutError:
            sock.close()
            raise CtlError(
                f"policyd is not answering on {self.path} (timeout {self.timeout:g}s)",
                EXIT_NOT_RUNNING,
            ) from None
        except OSError as exc:
            sock.close()
            raise CtlError(
                f"cannot connect to the admin socket {self.path}: {exc.strerror or exc}",
                EXIT_NOT_RUNNING,
            ) from None
        self._sock = sock
        self._reader = sock.makefile("rb")

    def call(self, command: str, **fields: Any) -> Any:
        """Send one request; the result, or CtlError with the daemon's message."""
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        request = {"cmd": command, **{k: v for k, v in fields.items() if v is not None}}
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            line = self._reader.readline(MAX_ANSWER)
        except TimeoutError:
            raise CtlError(
                f"policyd did not answer within {self.timeout:g}s", EXIT_DAEMON_ERROR
            ) from None
        except OSError as exc:
            raise CtlError(f"admin connection failed: {exc}", EXIT_DAEMON_ERROR) from None
        try:
            answer = json.loads(line)
        except ValueError:
            raise CtlError(
                "policyd closed the connection without a valid answer", EXIT_DAEMON_ERROR
            ) from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise CtlError(f"policyd: {error or 'request refused'}", EXIT_DAEMON_ERROR)
        return answer.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None


@dataclass(frozen=True, slots=True)
class Reply:
    """What a command prints: ``data`` with --json, else ``lines``."""

    data: Any
    lines: list[str]


# --- formatting -----------------------------------------------------------------------------


def when(stamp: float | None, never: str = "never") -> str:
    if not stamp:
        return never
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Columns aligned for a terminal; an empty listing says so."""
    if not rows:
        return ["(none)"]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


def flatten(data: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield f"{prefix.rstrip('.')}: {data}"


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


def positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return number


def entry_value(kind: str, value: str) -> str:
    try:
        return normalise_entry(kind, value)
    except ListError as exc:
        usage_error(str(exc))


def client_filter(text: str | None) -> str | None:
    if not text:
        return None
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text.strip(), strict=False))
        return str(normalise_ip(text))
    except (ValueError, ProtocolError):
        usage_error(f"--client: {text!r} is not an IP address or CIDR")


# --- commands -------------------------------------------------------------------------------


def cmd_ping(args: argparse.Namespace, session: Session) -> Reply:
    result = session.call("ping")
    return Reply(result, [f"policyd {result.get('version')} running (pid {result.get('pid')})"])


def cmd_whitelist_add(args: argparse.Namespace, session: Session) -> Reply:
    value = entry_value(args.kind, args.value)
    result = session.call(
        "whitelist.add",
        kind=args.kind,
        value=value,
        expires_in=args.expires or None,
        comment=args.comment,
    )
    lines = [
        f"added {e['kind']} {e['value']} (expires {when(e['expires'])})"
        for e in result.get("added", [])
    ]
    return Reply(result, lines)


def cmd_whitelist_remove(args: argparse.Namespace, session: Session) -> Reply:
    result = session.call(
        "whitelist.remove", kind=args.kind, value=entry_value(args.kind, args.value)
    )
    removed = result["removed"]
    return Reply(result, [f"removed {removed['kind']} {removed['value']}"])


def cmd_whitelist_list(args: argparse.Namespace, session: Session) -> Reply:
    result = session.call("whitelist.list", kind=args.kind)
    rows = [
        [e["kind"], e["value"], when(e["expires"]), e.get("comment", "")]
        for e in sorted(result, key=lambda e: (e["kind"], e["value"]))
    ]
    return Reply(result, table(["KIND", "VALUE", "EXPIRES", "COMMENT"], rows))


def _triplet_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "client": client_filter(args.client),
        "sender": args.sender,
        "recipient": args.recipient,
    }


def cmd_greylist_show(args: argparse.Namespace, session: Session) -> Reply:
    result = session.call("greylist.show", limit=args.limit, **_triplet_fields(args))
    rows = [
        [
            t["key"],
            "passed" if t["passed"] else "waiting",
            str(t["attempts"]),
            when(t["first_seen"]),
            when(t["last_seen"]),
        ]
        for t in result
    ]
    return Reply(result, table(["TRIPLET", "STATE", "ATTEMPTS", "FIRST SEEN", "LAST SEEN"], rows))


def cmd_greylist_pass(args: argparse.Namespace, session: Session) -> Reply:
    fields = _triplet_fields(args)
    if not any(fields.values()) and not args.all:
        usage_error("greylist pass: name --client, --sender or --recipient (or --all)")
    result = session.call("greylist.pass", **fields)
    return Reply(result, [f"passed {result['passed']} triplet(s)", *result.get("keys", [])])


def cmd_greylist_flush(args: argparse.Namespace, session: Session) -> Reply:
    fields = _triplet_fields(args)
    if not any(fields.values()) and not args.all:
        usage_error("greylist flush: name --client, --sender or --recipient (or --all)")
    result = session.call("greylist.flush", all=args.all or None, **fields)
    return Reply(result, [f"flushed {result['flushed']} triplet(s)"])


def _rate_table(result: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            r["rule"],
            r["key"].split("|", 1)[-1],
            "-" if r["fill"] is None else f"{100 * r['fill']:.0f}%",
            when(r["tat"]),
        ]
        for r in result
    ]
    return table(["RULE", "KEY", "FILL", "EMPTY AT"], rows)


def cmd_ratelimit_show(args: argparse.Namespace, session: Session) -> Reply:
    result = session.call("ratelimit.show", rule=args.rule, key=args.key, limit=args.limit)
    return Reply(result, _rate_table(result))


def cmd_ratelimit_top(args: argparse.Namespace, session: Session) -> Reply:
    result = session.call("ratelimit.top", rule=args.rule, key=args.key, limit=args.limit)
    return Reply(result, _rate_table(result))


def cmd_ratelimit_reset(args: argparse.Namespace, session: Session) -> Reply:
    if not args.rule:
        usage_error("ratelimit reset: --rule is required (the rule whose keys to reset)")
    result = session.call("ratelimit.reset", rule=args.rule, key=args.key)
    return Reply(result, [f"reset {result['reset']} key(s) of rule {args.rule}"])


def describe_check(check: dict[str, Any]) -> str:
    """One line per check finding of ``explain``."""
    if check.get("check") == "ratelimit":
        state = "allowed" if check["allowed"] else "would limit" if check["dry_run"] else "limited"
        line = f"ratelimit {check['rule']}: {state}, fill {100 * check['fill']:.0f}%"
        if not check["allowed"]:
            line += f", retry after {check['retry_after']:.0f}s"
        return f"{line} (key {check['key']}, cost {check['cost']})"
    line = f"{check.get('check')}: {check.get('action')} ({check.get('reason') or '-'})"
    if "status" in check:
        line += f" triplet {check['status']}"
        if check.get("retry_in"):
            line += f", retry in {check['retry_in']:.0f}s"
        line += f" (key {check['key']})"
    if "entry" in check:
        entry = check["entry"]
        line += f" entry {entry['kind']} {entry['value']}"
        if entry.get("comment"):
            line += f" ({entry['comment']})"
    return line


def cmd_explain(args: argparse.Namespace, session: Session) -> Reply:
    try:
        normalise_ip(args.ip)
    except ProtocolError:
        usage_error(f"--ip: {args.ip!r} is not an IP address")
    result = session.call(
        "explain",
        ip=args.ip,
        sender=args.sender,
        recipient=args.recipient,
        helo=args.helo,
        host=args.host,
        auth=args.auth,
    )
    answer = result["decision"]["answer"].split("\n", 1)[0]
    lines = [f"decision: {answer}", *(f"  {describe_check(c)}" for c in result["checks"])]
    return Reply(result, lines)


def cmd_stats(args: argparse.Namespace, session: Session) -> Reply:
    result = session.call("stats")
    return Reply(result, list(flatten(result)))


def cmd_import(args: argparse.Namespace, session: Session) -> Reply:
    try:
        text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        usage_error(f"cannot read {args.file}: {exc.strerror}")
    parsed = parse(args.format, text)
    name = Path(args.file).name
    entries = [
        {
            "kind": item.kind,
            "value": item.value,
            "comment": args.comment or f"{name}:{item.line}{' ' + item.note if item.note else ''}",
        }
        for item in parsed.items
    ]
    if not args.dry_run:
        for start in range(0, len(entries), IMPORT_BATCH):
            session.call("whitelist.add", entries=entries[start : start + IMPORT_BATCH])
    skipped = [{"line": s.line, "text": s.text, "reason": s.reason} for s in parsed.skipped]
    data = {
        "format": args.format,
        "file": args.file,
        "dry_run": args.dry_run,
        "added": len(entries),
        "entries": entries,
        "skipped": skipped,
    }
    verb = "would add" if args.dry_run else "added"
    lines = [f"{args.file}:{s['line']}: skipped {s['text']!r}: {s['reason']}" for s in skipped]
    lines += [f"{verb} {e['kind']} {e['value']}" for e in entries] if args.dry_run else []
    lines.append(
        f"{verb} {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, skipped "
        f"{len(skipped)} line(s) of {FORMATS[args.format][0]} {args.file}"
    )
    return Reply(data, lines)


# --- the command line -----------------------------------------------------------------------

Command = Callable[[argparse.Namespace, Session], Reply]


def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the command (SUPPRESS keeps a sub-parser
    # from overwriting a value given before the command with its default).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS, help="admin socket path"
    )
    common.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="daemon config; its [admin] socket is used",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--timeout",
        type=duration_arg,
        default=argparse.SUPPRESS,
        help=f"seconds to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
    )
    parser = argparse.ArgumentParser(
        prog="policyctl", description="Administer a running policyd.", parents=[common]
    )
    parser.set_defaults(socket=None, config=None, json=False, timeout=DEFAULT_TIMEOUT)
    parser.add_argument("--version", action="version", version=f"policyctl {__version__}")
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
    add.add_argument("value", metavar="VALUE")
    add.add_argument("--expires", type=duration_arg, default=0.0, metavar="DURATION")
    add.add_argument("--comment", default=None, metavar="TEXT")
    remove = leaf(whitelist, "remove", cmd_whitelist_remove, "remove an entry")
    remove.add_argument("kind", type=kind_arg, metavar="KIND", help=", ".join(KINDS))
    remove.add_argument("value", metavar="VALUE")
    listing = leaf(whitelist, "list", cmd_whitelist_list, "list live entries")
    listing.add_argument("--kind", type=kind_arg, default=None)

    greylist = commands.add_parser("greylist", help="greylist triplets").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    for name, func, help_text in (
        ("show", cmd_greylist_show, "list triplets"),
        ("pass", cmd_greylist_pass, "let triplets pass now"),
        ("flush", cmd_greylist_flush, "forget triplets"),
    ):
        sub = leaf(greylist, name, func, help_text)
        sub.add_argument("--client", metavar="IP|CIDR")
        sub.add_argument("--sender", metavar="ADDR")
        sub.add_argument("--recipient", metavar="ADDR")
        sub.add_argument("--all", action="store_true", help="every triplet (pass, flush)")
        sub.add_argument("--limit", type=positive_int, default=None, metavar="N")

    ratelimit = commands.add_parser("ratelimit", help="rate-limit state").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    for name, func, help_text in (
        ("show", cmd_ratelimit_show, "list keys"),
        ("top", cmd_ratelimit_top, "keys closest to their limit"),
        ("reset", cmd_ratelimit_reset, "forget keys of a rule"),
    ):
        sub = leaf(ratelimit, name, func, help_text)
        sub.add_argument("--rule", metavar="NAME")
        sub.add_argument("--key", metavar="K", help="key after the rule name, e.g. 192.0.2.7/32")
        sub.add_argument("--limit", type=positive_int, default=None, metavar="N")

    explain = leaf(commands, "explain", cmd_explain, "what each check would decide now")
    explain.add_argument("--ip", required=True)
    explain.add_argument("--sender", required=True, help="envelope sender ('' for <>)")
    explain.add_argument("--recipient", required=True)
    explain.add_argument("--helo", default="")
    explain.add_argument("--host", default="", help="client host name (forward-confirmed)")
    explain.add_argument("--auth", default="", help="authenticated user")

    leaf(commands, "stats", cmd_stats, "daemon figures")

    imp = leaf(commands, "import", cmd_import, "import a postgrey or sqlgrey whitelist file")
    imp.add_argument("format", choices=list(FORMATS), metavar="FORMAT", help=", ".join(FORMATS))
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--comment", default=None, help="comment for every entry")
    imp.add_argument("--dry-run", action="store_true", help="parse and show, add nothing")
    return parser


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if args.config:
        try:
            return load(args.config).admin.socket
        except ConfigError as exc:
            usage_error(f"invalid configuration: {exc}")
    return AdminConfig().socket


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
    session: Session | None = None
    try:
        session = Session(socket_path(args), args.timeout)
        emit(args.func(args, session), args.json)
    except CtlError as exc:
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

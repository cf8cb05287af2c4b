"""The ``policyctl`` commands: each validates its input, makes its admin requests, and says
what to print for humans (``Reply.lines``) and for scripts (``Reply.data``).
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..addresses import normalise_sender
from ..checks.greylist import KEY_SEPARATOR
from ..protocol import ProtocolError, normalise_ip
from ..stores.keys import HASH_MARK
from ..whitelist import ListError, normalise_entry
from .client import Session, usage_error
from .importers import FORMATS, parse

#: Entries per ``whitelist.add`` request during an import (well under admin.MAX_LINE).
IMPORT_BATCH: Final = 500


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


# --- input checks -------------------------------------------------------------------------


def entry_value(kind: str, value: str, *, force: bool = False) -> str:
    try:
        return normalise_entry(kind, value, force=force)
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
    value = entry_value(args.kind, args.value, force=args.force)
    result = session.call(
        "whitelist.add",
        kind=args.kind,
        value=value,
        expires_in=args.expires or None,
        comment=args.comment,
        force=args.force or None,
    )
    lines = [
        f"added {e['kind']} {e['value']} (expires {when(e['expires'])})"
        for e in result.get("added", [])
    ]
    return Reply(result, lines)


def cmd_whitelist_remove(args: argparse.Namespace, session: Session) -> Reply:
    result = session.call(
        "whitelist.remove", kind=args.kind, value=entry_value(args.kind, args.value, force=True)
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
    lines = table(["TRIPLET", "STATE", "ATTEMPTS", "FIRST SEEN", "LAST SEEN"], rows)
    return Reply(result, lines + key_notes(args.sender, [t["key"] for t in result]))


#: Printed under a listing whose keys hold a sender that normalisation changed visibly.
SENDER_NOTE: Final = (
    "note: the sender in a key is normalised so that a sender's retries match: lower case, "
    "BATV and SRS unwrapped, +tag dropped, digit runs and hex runs of 8+ as # (VERP); "
    "the address as sent is not stored (docs/greylisting.md)"
)
HASHED_NOTE: Final = (
    "note: keys are hashed ([store] hash_secret); filter with --client, --sender, --recipient "
    "to find a triplet"
)


def key_notes(sender: str | None, keys: list[str]) -> list[str]:
    """What a reader needs to connect the stored keys with the addresses they know."""
    notes = []
    if sender and (keyed := normalise_sender(sender)) != sender:
        notes.append(f"sender {sender} is keyed as {keyed}")
    senders = [key.split(KEY_SEPARATOR)[1] for key in keys if key.count(KEY_SEPARATOR) == 2]
    if any("#" in s for s in senders) or (sender and "#" in normalise_sender(sender)):
        notes.append(SENDER_NOTE)
    if any(s.startswith(HASH_MARK) for s in senders):
        notes.append(HASHED_NOTE)
    return notes


def cmd_greylist_pass(args: argparse.Namespace, session: Session) -> Reply:
    fields = _triplet_fields(args)
    if not any(fields.values()) and not args.all:
        usage_error("greylist pass: name --client, --sender or --recipient (or --all)")
    result = session.call("greylist.pass", **fields, all=bool(args.all))
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

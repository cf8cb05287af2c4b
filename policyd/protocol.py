"""The wire codec of docs/protocol.md: request bytes in, Query out; Verdict in, answer bytes out.

No sockets, no clock, no logging: every caller (server, tests, bench) shares this one codec.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
import socket
from typing import Final

from .memo import IdentityMemo
from .model import Action, IPAddress, Query, Stage, Verdict

#: Protocol version carried in ``v=``; another value is refused rather than misread.
PROTOCOL_VERSION: Final = "1"
#: Default bound on a request. A request carries at most a few base64 addresses; Exim's
#: local part + domain is limited to 64 + 255 octets (RFC 5321 §4.5.3.1), so 4 KiB is generous.
DEFAULT_MAX_REQUEST_BYTES: Final = 4096
#: RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including the code and CRLF.
MAX_REPLY_TEXT: Final = 400

_B64_FIELDS: Final = {
    "helo_b64": "helo",
    "from_b64": "sender",
    "rcpt_b64": "recipient",
    "rcpts_b64": "recipients",
    "auth_b64": "auth",
    "host_b64": "host",
}
_INT_FIELDS: Final = {
    "nrcpt": "nrcpt",
    "size": "size",
    "bodysize": "body_size",
    "lines": "lines",
    "port": "port",
    "relay": "relay",
}
_TOKEN_FIELDS: Final = {"txn": "txn", "conn": "conn", "msgid": "msgid"}
_B64, _INT, _TOKEN = 0, 1, 2
#: Stage by its word: a dict look-up, where ``Stage(word)`` runs the enum's Python code.
_STAGES: Final = {stage.value: stage for stage in Stage}
#: key → (Query attribute, kind): one look-up per word of the request.
_FIELDS: Final = {
    **{key: (attr, _B64) for key, attr in _B64_FIELDS.items()},
    **{key: (attr, _INT) for key, attr in _INT_FIELDS.items()},
    **{key: (attr, _TOKEN) for key, attr in _TOKEN_FIELDS.items()},
}
_TOKEN_RE: Final = re.compile(r"[!-~]{0,128}")
_INT_RE: Final = re.compile(r"[0-9]{1,18}")
_TEXT_UNSAFE: Final = re.compile(r"[^\x20-\x7e]")
_SMTP_CODE_DIGIT: Final = {Action.DEFER: "4", Action.REJECT: "5"}


class ProtocolError(ValueError):
    """The request cannot be understood; the message says why, for the error answer and log."""


def parse_request(data: bytes) -> Query:
    """Decode one request (with or without its trailing newline) into a normalised Query."""
    try:
        line = data.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("request is not ASCII (client values must be base64)") from None
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    if "\n" in line or "\r" in line:
        raise ProtocolError("request holds more than one line")
    words = line.split()
    if not words:
        raise ProtocolError("empty request")
    stage = _STAGES.get(words[0].lower())
    if stage is None:
        raise ProtocolError(f"unknown stage {words[0][:20]!r} (want rcpt or data)")
    fields: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ProtocolError(f"word {word[:40]!r} is not key=value")
        if key in fields:
            raise ProtocolError(f"key {key[:20]!r} given twice")
        fields[key] = value
    return _build_query(stage, fields)


def _build_query(stage: Stage, fields: dict[str, str]) -> Query:
    version = fields.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version[:10]!r}")
    if "ip" not in fields:
        raise ProtocolError("missing ip=")
    values: dict[str, object] = {"stage": stage, "client": normalise_ip(fields["ip"])}
    known = _FIELDS
    for key, value in fields.items():
        field = known.get(key)
        if field is None:  # v=, ip= (done above) and keys of later versions
            continue
        attr, kind = field
        if kind == _B64:
            values[attr] = _b64(key, value)
        elif kind == _INT:
            if not _INT_RE.fullmatch(value):
                raise ProtocolError(f"{key}= is not a number: {value[:20]!r}")
            values[attr] = int(value)
        else:
            if not _TOKEN_RE.fullmatch(value):
                raise ProtocolError(f"{key}= is not a printable token")
            values[attr] = value
    if "relay" in values:
        values["relay"] = values["relay"] != 0
    recipients = values.pop("recipients", None)
    if isinstance(recipients, str):
        values["recipients"] = tuple(r.strip() for r in recipients.split(",") if r.strip())
    if stage is Stage.RCPT and not values.get("recipient"):
        raise ProtocolError("rcpt request without a recipient (rcpt_b64=)")
    return Query(**values)  # type: ignore[arg-type]  # keys and types checked above


def _b64(key: str, value: str) -> str:
    # What base64.b64decode(value, validate=True) does, without its wrappers (they cost more
    # than the decoding); the value is ASCII already (the request was decoded as ASCII).
    try:
        raw = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{key}= is not valid base64: {value[:40]!r}") from None
    return raw.decode("utf-8", errors="replace")


def normalise_ip(text: str) -> IPAddress:
    """Canonical address from any textual form Exim produces (expanded v6, brackets, mapped v4)."""
    candidate = text.strip()
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    if candidate[:5].lower() == "ipv6:":
        candidate = candidate[5:]
    candidate = candidate.split("%", 1)[0]
    # inet_pton is strict (no leading zeros in IPv4, no stray characters) and much faster
    # than ipaddress's parser; the packed form builds the address object directly.
    try:
        if ":" in candidate:
            address: IPAddress = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, candidate))
        else:
            address = ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, candidate))
    except (OSError, ValueError):
        raise ProtocolError(f"ip= is not an IP address: {text[:60]!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def safe_text(text: str) -> str:
    """SMTP reply text: printable ASCII only, bounded, so it can never break the answer line."""
    return _TEXT_UNSAFE.sub("?", text)[:MAX_REPLY_TEXT].strip()


#: Answers of recent verdicts, by identity: most answers come from verdict objects that are
#: built once and shared (greylisting's, the whitelists'), so their bytes are too.
ANSWER_CACHE_ENTRIES: Final = 256


def format_answer(verdict: Verdict) -> bytes:
    """Answer bytes for Exim: verdict line, then header lines; never a trailing newline."""
    return _answers(verdict)


def _format_answer(verdict: Verdict) -> bytes:
    action = verdict.action
    if action is Action.ACCEPT:
        note = safe_text(verdict.reason)
        first = f"ok {note}" if note else "ok"
    elif action is Action.ERROR:
        first = f"error {safe_text(verdict.text) or 'error'}"
    else:
        digit = _SMTP_CODE_DIGIT[action]
        code = str(verdict.code)
        if len(code) != 3 or not code.startswith(digit):
            # Exim panics on a code whose first digit differs from the ACL verb (design §2).
            code = f"{digit}51" if action is Action.DEFER else "550"
        ecode = verdict.ecode if _is_ecode(verdict.ecode, digit) else f"{digit}.7.1"
        first = f"{action.value} {code} {ecode} {safe_text(verdict.text) or 'policy'}"
    lines = [first]
    lines.extend(header_lines(verdict.headers))
    return "\n".join(lines).encode("ascii")


_answers: Final = IdentityMemo(_format_answer, ANSWER_CACHE_ENTRIES)


def header_lines(headers: tuple[str, ...]) -> list[str]:
    """Header lines made safe for the answer: ASCII, folded lines keep their leading tab."""
    out: list[str] = []
    for header in headers:
        first = True
        for part in header.replace("\r", "").split("\n"):
            clean = _TEXT_UNSAFE.sub("?", part.replace("\t", " ")).strip()
            if not clean:
                continue
            # Only the first line of a header starts at column 0; the rest are folded.
            out.append(clean if first else "\t" + clean)
            first = False
    return out


def _is_ecode(ecode: str, digit: str) -> bool:
    parts = ecode.split(".")
    return (
        len(parts) == 3
        and parts[0] == digit
        and all(p.isascii() and p.isdigit() and 1 <= len(p) <= 3 for p in parts[1:])
    )


def error_answer(message: str) -> bytes:
    """The answer to a request that could not be parsed or answered."""
    return format_answer(Verdict(Action.ERROR, text=message))

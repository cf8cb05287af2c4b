"""The wire codec of docs/protocol.md: request bytes in, Query out; Verdict in, answer bytes out.

No sockets, no clock, no logging: every caller (server, tests, bench) shares this one codec.
"""

from __future__ import annotations

import binascii
import dataclasses
import ipaddress
import re
import socket
from collections.abc import Callable
from typing import Any, Final

from .identity_memo import IdentityMemo
from .model import Action, IPAddress, Query, Stage, Verdict

#: Protocol version carried in ``v=``; another value is refused rather than misread.
PROTOCOL_VERSION: Final = "1"
#: Default bound on a request. A request carries at most a few base64 addresses; Exim's
#: local part + domain is limited to 64 + 255 octets (RFC 5321 §4.5.3.1), so 4 KiB is generous.
DEFAULT_MAX_REQUEST_BYTES: Final = 4096
#: RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including the code and CRLF.
MAX_REPLY_TEXT: Final = 400
#: The RCPT answer's line after the verdict that tells a fragment which sent ``skipdata=1``
#: not to ask at DATA for this recipient (the header lines after it are for DATA to add).
SKIP_DATA_LINE: Final = "skipdata"

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
    "skipdata": "skip_data",
    "t": "asked",
}
_TOKEN_FIELDS: Final = {"txn": "txn", "conn": "conn", "msgid": "msgid"}
#: Stage by its word: a dict look-up, where ``Stage(word)`` runs the enum's Python code.
_STAGES: Final = {stage.value: stage for stage in Stage}
#: Query's fields in constructor order, and their defaults: a request fills a copy of the
#: defaults by position, and Query is built from it positionally (cheaper than keywords).
_QUERY_FIELDS: Final = [f.name for f in dataclasses.fields(Query)]
_QUERY_DEFAULTS: Final[list[Any]] = [f.default for f in dataclasses.fields(Query)]
_STAGE, _CLIENT, _RELAY, _RECIPIENT, _RECIPIENTS, _SKIP_DATA = (
    _QUERY_FIELDS.index(name)
    for name in ("stage", "client", "relay", "recipient", "recipients", "skip_data")
)
_MAX_INT_DIGITS: Final = 18
_MAX_TOKEN: Final = 128
_TEXT_UNSAFE: Final = re.compile(r"[^\x20-\x7e]")
_SMTP_CODE_DIGIT: Final = {Action.DEFER: "4", Action.REJECT: "5"}


class ProtocolError(ValueError):
    """The request cannot be understood; the message says why, for the error answer and log."""


def parse_request(data: bytes) -> Query:
    """Decode one request (with or without its trailing newline) into a normalised Query.

    One pass over the words. What is wrong is reported in a fixed order, whatever the order
    of the words: the line's shape (stage, ``key=value`` words, repeated keys), then the
    version (so a later version's values are never judged by this one's rules), ``ip=``,
    the first bad value, a missing recipient."""
    stage, words = _split(data)
    values = _QUERY_DEFAULTS.copy()
    seen, version, ip, bad_value = _read_words(words, values)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version[:10]!r}")
    if ip is None:
        raise ProtocolError("missing ip=")
    values[_CLIENT] = normalise_ip(ip)
    if bad_value:
        raise ProtocolError(bad_value)
    values[_STAGE] = stage
    if "relay" in seen:
        values[_RELAY] = values[_RELAY] != 0
    if "skipdata" in seen:
        values[_SKIP_DATA] = values[_SKIP_DATA] != 0
    recipients = values[_RECIPIENTS]
    if isinstance(recipients, str):
        values[_RECIPIENTS] = tuple(r.strip() for r in recipients.split(",") if r.strip())
    if stage is Stage.RCPT and not values[_RECIPIENT]:
        raise ProtocolError("rcpt request without a recipient (rcpt_b64=)")
    return Query(*values)


def _split(data: bytes) -> tuple[Stage, list[str]]:
    """The stage and the words after it."""
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
    del words[0]
    return stage, words


def _read_words(words: list[str], values: list[Any]) -> tuple[set[str], str, str | None, str]:
    """Fill ``values`` (Query's fields by position) from the words. Shape errors raise at
    once; the first bad value is returned (keys seen, v=, ip=, bad value) for the caller to
    report after the version and the address."""
    seen: set[str] = set()
    version = PROTOCOL_VERSION
    ip: str | None = None
    bad_value = ""
    fields = _FIELDS
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ProtocolError(f"word {word[:40]!r} is not key=value")
        if key in seen:
            raise ProtocolError(f"key {key[:20]!r} given twice")
        seen.add(key)
        field = fields.get(key)
        if field is None:  # v=, ip= and keys of later versions
            if key == "v":
                version = value
            elif key == "ip":
                ip = value
        elif not bad_value:
            index, convert = field
            try:
                values[index] = convert(value)
            except ValueError as exc:
                bad_value = f"{key}= {exc}"
    return seen, version, ip, bad_value


def _b64(value: str) -> str:
    # What base64.b64decode(value, validate=True) does, without its wrappers (they cost more
    # than the decoding); the value is ASCII already (the request was decoded as ASCII).
    try:
        decoded = binascii.a2b_base64(value, strict_mode=True)
    except binascii.Error:  # a ValueError
        raise ValueError(f"is not valid base64: {value[:40]!r}") from None
    return decoded.decode("utf-8", errors="replace")


def _number(value: str) -> int:
    # The line is ASCII: isdigit() is [0-9] here.
    if value.isdigit() and len(value) <= _MAX_INT_DIGITS:
        return int(value)
    raise ValueError(f"is not a number: {value[:20]!r}")


def _token(value: str) -> str:
    # A word holds no whitespace: printable is [!-~] here.
    if value.isprintable() and len(value) <= _MAX_TOKEN:
        return value
    raise ValueError("is not a printable token")


#: key → (position in Query, converter): one look-up per word of the request.
_FIELDS: Final[dict[str, tuple[int, Callable[[str], Any]]]] = {
    **{key: (_QUERY_FIELDS.index(attr), _b64) for key, attr in _B64_FIELDS.items()},
    **{key: (_QUERY_FIELDS.index(attr), _number) for key, attr in _INT_FIELDS.items()},
    **{key: (_QUERY_FIELDS.index(attr), _token) for key, attr in _TOKEN_FIELDS.items()},
}


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
    lines = [first, SKIP_DATA_LINE] if verdict.skip_data else [first]
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

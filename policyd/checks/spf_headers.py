"""SPF result values and the header text recording them: ``Received-SPF:`` (RFC 7208 §9.1)
and ``Authentication-Results:`` (RFC 8601). Pure functions; no I/O."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

#: Client-controlled values in headers are cut to this (RFC 5321 §4.5.3.1: path ≤ 256).
MAX_HEADER_VALUE: Final = 255
#: RFC 5322 §2.1.1: a line SHOULD be at most 78 characters without its CRLF; a folded line's
#: leading tab counts. Only an item that cannot be folded (a long quoted value) goes past it.
FOLD_AT: Final = 78
#: How lines are folded: newline and one tab (the wire protocol's continuation line).
FOLD: Final = "\n\t"


class Result(enum.Enum):
    """RFC 7208 §2.6 results."""

    PASS = "pass"  # noqa: S105 - an SPF result, not a password
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class Identity(enum.Enum):
    """RFC 7208 §2.3/§2.4: which identity was checked."""

    MAILFROM = "mailfrom"
    HELO = "helo"


@dataclass(slots=True)  # not frozen: built per check (see model.Query); treated as immutable
class Checked:
    """One identity's SPF result and what the headers say about it."""

    identity: Identity
    result: Result
    domain: str
    client_ip: str
    sender: str
    helo: str
    explanation: str = ""
    mechanism: str = ""
    problem: str = ""


_NOT_PRINTABLE: Final = re.compile(r"[^\x20-\x7e]")
#: RFC 5322 §3.2.3 dot-atom-text: what RFC 7208 §9.1 allows unquoted in a key-value-pair.
_DOT_ATOM: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)
#: RFC 2045 §5.1 token (printable ASCII but SPACE and tspecials ()<>@,;:\"/[]?=): what
#: RFC 8601 §2.2 allows unquoted as the authserv-id and a property value.
_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")


def _printable(text: str) -> str:
    return _NOT_PRINTABLE.sub("?", text)[:MAX_HEADER_VALUE]


def _quoted(text: str) -> str:
    """RFC 5322 §3.2.4 quoted-string (also RFC 2045's, which is RFC 822's)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_value(text: str) -> str:
    """A dot-atom as is, anything else as a quoted-string (RFC 7208 §9.1 ``key-value-pair``):
    an IPv6 ``client-ip`` is quoted (``:`` is not atext)."""
    text = _printable(text)
    return text if _DOT_ATOM.fullmatch(text) else _quoted(text)


def quote_token(text: str) -> str:
    """An RFC 2045 token as is, anything else as a quoted-string (RFC 8601 §2.2 ``value``):
    ``foo=bar/baz.example`` is a dot-atom but not a token."""
    text = _printable(text)
    return text if _TOKEN.fullmatch(text) else _quoted(text)


def _comment(text: str) -> list[str]:
    """A comment (RFC 5322 §3.2.2) with its specials escaped, as words: the places between
    them are where it may be folded (runs of spaces become one)."""
    escaped = _printable(text).replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f"({escaped})".split()


def comment_text(checked: Checked) -> str:
    """The human sentence of RFC 7208 §9.1's examples."""
    who = checked.sender if checked.identity is Identity.MAILFROM else checked.helo
    ip = checked.client_ip
    return {
        Result.PASS: f"domain of {who} designates {ip} as permitted sender",
        Result.FAIL: f"domain of {who} does not designate {ip} as permitted sender",
        Result.SOFTFAIL: f"domain of transitioning {who} does not designate {ip} as "
        "permitted sender",
        Result.NEUTRAL: f"{ip} is neither permitted nor denied by domain of {who}",
        Result.NONE: f"domain of {who} does not designate permitted sender hosts",
        Result.TEMPERROR: f"error in processing during lookup of {who}",
        Result.PERMERROR: f"permanent error in processing domain of {who}",
    }[checked.result]


def _fold(name: str, head: str, items: list[str]) -> str:
    """``Name: head item item …`` folded with ``FOLD`` so that no line passes FOLD_AT
    characters, the tab counted, unless one item alone is longer.

    Items are never split, so a fold never falls inside a quoted-string (where unfolding
    would turn the space into a tab); comments come as one item per word."""
    lines = [f"{name}: {head}"]
    if len(lines[0]) > FOLD_AT:  # a long authserv-id: fold before it (RFC 5322 §2.2.3)
        lines = [f"{name}:", head]
    width = len(lines[-1]) + (len(lines) - 1)  # the tab of a continuation line counts
    for item in items:
        if width + 1 + len(item) > FOLD_AT:
            lines.append(item)
            width = 1 + len(item)  # the tab
        else:
            lines[-1] += " " + item
            width += 1 + len(item)
    return FOLD.join(lines)


def received_spf(checked: Checked, receiver: str) -> str:
    """The ``Received-SPF:`` header line (RFC 7208 §9.1), folded."""
    pairs = [
        f"client-ip={quote_value(checked.client_ip)};",
        *(
            [f"envelope-from={quote_value(checked.sender)};"]
            if checked.identity is Identity.MAILFROM
            else []
        ),
        f"helo={quote_value(checked.helo)};",
        f"receiver={quote_value(receiver)};",
    ]
    if checked.mechanism:
        pairs.append(f"mechanism={quote_value(checked.mechanism)};")
    if checked.problem and checked.result in (Result.PERMERROR, Result.TEMPERROR):
        pairs.append(f"problem={quote_value(checked.problem)};")
    pairs.append(f"identity={checked.identity.value}")
    comment = _comment(f"{receiver}: {comment_text(checked)}")
    return _fold("Received-SPF", checked.result.value, [*comment, *pairs])


def authentication_results(checked: tuple[Checked, ...], authserv_id: str) -> str:
    """One ``Authentication-Results:`` header (RFC 8601) with a resinfo per identity:
    ``spf=<result> (<comment>) smtp.mailfrom=<domain>`` or ``smtp.helo=<name>``, the values
    RFC 2045 tokens or quoted-strings (§2.2, §2.7.2)."""
    items = []
    for i, one in enumerate(checked):
        prop = "smtp.mailfrom" if one.identity is Identity.MAILFROM else "smtp.helo"
        value = one.domain if one.identity is Identity.MAILFROM else one.helo
        last = i == len(checked) - 1
        items += [f"spf={one.result.value}", *_comment(comment_text(one))]
        items.append(f"{prop}={quote_token(value)}{'' if last else ';'}")
    return _fold("Authentication-Results", f"{quote_token(authserv_id)};", items)

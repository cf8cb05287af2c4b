"""Strict parsers for the two SPF trace header fields, written from their ABNF, for tests.

- ``Received-SPF:`` — RFC 7208 §9.1 over RFC 5322 §3.2 (FWS, comment, CFWS, quoted-string,
  dot-atom), without the obsolete syntax of RFC 5322 §4.
- ``Authentication-Results:`` — RFC 8601 §2.2, its ``value`` being RFC 2045 §5.1's
  (token / quoted-string) and ``Keyword`` RFC 5321's ``Ldh-str``.

A folded line is ``\\n`` (or CRLF) followed by at least one space or tab; anything the
grammar does not allow raises ``GrammarError`` with the position. The parsers return the
values with quoting and folding undone (RFC 5322 §3.2.2: the CRLF of a fold is removed, the
whitespace kept), so a test can compare them with what went in.

The ``authres`` package (PyPI) parses ``Authentication-Results`` too, but leniently (any
``*ptext`` as a property value, a dot-atom as authserv-id, bad propspecs skipped): the tests
use it as a second reader, this module as the judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_WSP = " \t"
#: RFC 5322 §3.2.3 atext.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
#: RFC 2045 §5.1 token: printable ASCII but SPACE and tspecials.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
#: RFC 5321 §4.1.2 Ldh-str (with its Let-dig start): RFC 8601's Keyword.
_KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
#: RFC 7208 §4.6.1 name, the open end of RFC 7208 §9.1's ``key``.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
RECEIVED_SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


class GrammarError(ValueError):
    pass


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text.replace("\r\n", "\n")
        self.pos = 0

    def fail(self, what: str) -> GrammarError:
        return GrammarError(f"{what} at {self.pos}: {self.text[self.pos : self.pos + 40]!r}")

    def peek(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def literal(self, literal: str, *, fold_case: bool = False) -> bool:
        chunk = self.text[self.pos : self.pos + len(literal)]
        if chunk == literal or (fold_case and chunk.lower() == literal.lower()):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str, *, fold_case: bool = False) -> None:
        if not self.literal(literal, fold_case=fold_case):
            raise self.fail(f"expected {literal!r}")

    def pattern(self, regex: re.Pattern[str]) -> str | None:
        match = regex.match(self.text, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        return match.group()

    # -- RFC 5322 §3.2 ----------------------------------------------------------------------

    def fws(self) -> str | None:
        """FWS = ([*WSP CRLF] 1*WSP); returns the whitespace with the fold removed."""
        start = self.pos
        end = start
        while end < len(self.text) and self.text[end] in _WSP:
            end += 1
        before = self.text[start:end]
        if end < len(self.text) and self.text[end] == "\n":
            after = end + 1
            while after < len(self.text) and self.text[after] in _WSP:
                after += 1
            if after > end + 1:
                self.pos = after
                return before + self.text[end + 1 : after]
        if before:
            self.pos = end
            return before
        self.pos = start
        return None

    def quoted_pair(self) -> str | None:
        if self.peek("\\") and self.pos + 1 < len(self.text):
            char = self.text[self.pos + 1]
            if "\x21" <= char <= "\x7e" or char in _WSP:
                self.pos += 2
                return char
        return None

    def comment(self) -> str | None:
        """comment = "(" *([FWS] ccontent) [FWS] ")"; returns its unquoted content."""
        if not self.literal("("):
            return None
        out: list[str] = []
        while True:
            out.append(self.fws() or "")
            if self.literal(")"):
                return "".join(out)
            pair = self.quoted_pair()
            if pair is not None:
                out.append(pair)
                continue
            nested = self.comment()
            if nested is not None:
                out.append(f"({nested})")
                continue
            if self.pos < len(self.text) and _is_ctext(self.text[self.pos]):
                out.append(self.text[self.pos])
                self.pos += 1
                continue
            raise self.fail("bad comment content")

    def cfws(self, comments: list[str] | None = None) -> bool:
        """CFWS = (1*([FWS] comment) [FWS]) / FWS."""
        seen = False
        while True:
            if self.fws() is not None:
                seen = True
            text = self.comment()
            if text is None:
                return seen
            seen = True
            if comments is not None:
                comments.append(text)

    def quoted_string(self) -> str | None:
        """quoted-string without its surrounding [CFWS]: DQUOTE *([FWS] qcontent) [FWS] DQUOTE."""
        if not self.literal('"'):
            return None
        out: list[str] = []
        while True:
            out.append(self.fws() or "")
            if self.literal('"'):
                return "".join(out)
            pair = self.quoted_pair()
            if pair is not None:
                out.append(pair)
                continue
            if self.pos < len(self.text) and _is_qtext(self.text[self.pos]):
                out.append(self.text[self.pos])
                self.pos += 1
                continue
            raise self.fail("bad quoted-string content")

    def dot_atom_text(self) -> str | None:
        start = self.pos
        if self.pattern(_ATEXT) is None:
            return None
        while self.peek("."):
            self.pos += 1
            if self.pattern(_ATEXT) is None:
                raise self.fail("empty dot-atom label")
        return self.text[start : self.pos]

    def end(self) -> None:
        if self.pos != len(self.text):
            raise self.fail("expected the end of the field")


def _is_ctext(char: str) -> bool:
    return "\x21" <= char <= "\x7e" and char not in "()\\"


def _is_qtext(char: str) -> bool:
    return "\x21" <= char <= "\x7e" and char not in '"\\'


@dataclass
class ReceivedSpf:
    result: str
    comment: str | None
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        return next((value for name, value in self.pairs if name == key), None)


def parse_received_spf(header: str) -> ReceivedSpf:
    """RFC 7208 §9.1::

    header-field   = "Received-SPF:" [CFWS] result FWS [comment FWS] [ key-value-list ] CRLF
    key-value-list = key-value-pair *( ";" [CFWS] key-value-pair ) [";"]
    key-value-pair = key [CFWS] "=" ( dot-atom / quoted-string )
    """
    r = _Reader(header)
    r.expect("Received-SPF:", fold_case=True)
    r.cfws()
    result = next((word for word in RECEIVED_SPF_RESULTS if r.literal(word)), None)
    if result is None:
        raise r.fail("expected a result")
    if r.pos == len(r.text):
        return ReceivedSpf(result, None)
    if r.fws() is None:
        raise r.fail("expected FWS after the result")
    comment = r.comment()
    if comment is not None and r.pos < len(r.text) and r.fws() is None:
        raise r.fail("expected FWS after the comment")
    parsed = ReceivedSpf(result, comment)
    if r.pos == len(r.text):
        return parsed
    while True:
        key = r.pattern(_NAME)  # the named keys are all names too
        if key is None:
            raise r.fail("expected a key")
        r.cfws()
        r.expect("=")
        r.cfws()
        value = r.quoted_string()
        if value is None:
            value = r.dot_atom_text()
        if value is None:
            raise r.fail(f"expected a dot-atom or quoted-string for {key}")
        r.cfws()
        parsed.pairs.append((key, value))
        if not r.literal(";"):
            break
        r.cfws()
        if r.pos == len(r.text):
            break
    r.end()
    return parsed


@dataclass
class ResInfo:
    method: str
    result: str
    comments: list[str] = field(default_factory=list)
    properties: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class AuthenticationResults:
    authserv_id: str
    results: list[ResInfo] = field(default_factory=list)


def _value(r: _Reader) -> str | None:
    """RFC 2045 value = token / quoted-string (the quoted-string's own [CFWS] is the caller's)."""
    quoted = r.quoted_string()
    return quoted if quoted is not None else r.pattern(_TOKEN)


def parse_authentication_results(header: str) -> AuthenticationResults:
    """RFC 8601 §2.2::

    authres-payload = [CFWS] authserv-id [ CFWS authres-version ]
                      ( no-result / 1*resinfo ) [CFWS] CRLF
    resinfo         = [CFWS] ";" methodspec [ CFWS reasonspec ] [ CFWS 1*propspec ]
    methodspec      = [CFWS] method [CFWS] "=" [CFWS] result
    propspec        = ptype [CFWS] "." [CFWS] property [CFWS] "=" pvalue
    pvalue          = [CFWS] ( value / [ [ local-part ] "@" ] domain-name ) [CFWS]

    (``authres-version``, ``reasonspec`` and the local-part@domain form are not produced by
    policyd and not accepted here.)"""
    r = _Reader(header)
    r.expect("Authentication-Results:", fold_case=True)
    r.cfws()
    authserv_id = _value(r)
    if authserv_id is None:
        raise r.fail("expected an authserv-id (token or quoted-string)")
    parsed = AuthenticationResults(authserv_id)
    while True:
        r.cfws()
        if not r.literal(";"):
            break
        r.cfws()
        method = r.pattern(_KEYWORD)
        if method is None:
            raise r.fail("expected a method")
        r.cfws()
        r.expect("=")
        r.cfws()
        result = r.pattern(_KEYWORD)
        if result is None:
            raise r.fail("expected a result")
        info = ResInfo(method, result)
        parsed.results.append(info)
        while True:
            spaced = r.cfws(info.comments)
            if r.peek(";") or r.pos == len(r.text):
                break
            if not spaced:
                raise r.fail("expected CFWS before a propspec")
            ptype = r.pattern(_KEYWORD)
            if ptype is None:
                raise r.fail("expected a propspec")
            r.cfws()
            r.expect(".")
            r.cfws()
            prop = r.pattern(_KEYWORD)
            if prop is None:
                raise r.fail("expected a property")
            r.cfws()
            r.expect("=")
            r.cfws()
            value = _value(r)
            if value is None:
                raise r.fail(f"expected a value (token or quoted-string) for {ptype}.{prop}")
            info.properties.append((f"{ptype}.{prop}", value))
    if not parsed.results:
        raise r.fail("expected a resinfo")
    r.cfws()
    r.end()
    return parsed


def physical_lines(header: str) -> list[str]:
    return header.replace("\r\n", "\n").split("\n")

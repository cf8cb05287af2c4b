"""The wire codec (parse_request, normalise_ip, format_answer, header_lines) and the
dispatcher's answer boundary: examples, the golden table, and fuzzing.

Whatever bytes arrive, parsing yields a Query or a ProtocolError, and the dispatcher yields
a well-formed answer (``error ...`` plus a WARNING quoting the request for malformed input).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from policyd.config import from_mapping
from policyd.dispatch import LOGGED_REQUEST_BYTES, Dispatcher
from policyd.lograte import LogLimiter
from policyd.model import Action, IPAddress, Query, Stage, Verdict
from policyd.protocol import (
    MAX_REPLY_TEXT,
    PROTOCOL_VERSION,
    SKIP_DATA_LINE,
    ProtocolError,
    format_answer,
    header_lines,
    normalise_ip,
    parse_request,
)
from policyd.stores.sqlite import SQLiteStore

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden.tsv"
FUZZ = settings(max_examples=200, deadline=None)
#: The first line as docs/protocol.md defines it; the SMTP code's digit matches the verb.
FIRST_LINE = re.compile(
    r"ok( [\x21-\x7e][\x20-\x7e]*)?"
    r"|defer 4\d\d 4\.\d{1,3}\.\d{1,3} [\x21-\x7e][\x20-\x7e]*"
    r"|reject 5\d\d 5\.\d{1,3}\.\d{1,3} [\x21-\x7e][\x20-\x7e]*"
    r"|error [\x21-\x7e][\x20-\x7e]*"
)
#: A header line, or a continuation line (leading tab); printable ASCII otherwise.
HEADER_LINE = re.compile(r"\t?[\x21-\x7e][\x20-\x7e]*")


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def assert_well_formed(answer: bytes) -> list[str]:
    """The answer's lines, after checking everything docs/protocol.md promises."""
    assert answer.isascii(), answer
    assert not answer.endswith(b"\n"), answer
    assert b"\r" not in answer, answer
    first, *headers = answer.decode("ascii").split("\n")
    assert FIRST_LINE.fullmatch(first), first
    for line in headers:
        assert HEADER_LINE.fullmatch(line), (line, answer)
    return [first, *headers]


# --- parse_request --------------------------------------------------------------------------

RCPT = (
    "rcpt v=1 ip=192.0.2.10 port=25 helo_b64=bXguZXhhbXBsZS5uZXQ= from_b64=YUBleGFtcGxlLm5ldA== "
    "rcpt_b64=YkB0ZXN0LmV4YW1wbGU= auth_b64= txn=12345-1732560000123456 nrcpt=1 "
    "t=1732560000123789"
)


def test_parses_the_documented_rcpt_request() -> None:
    query = parse_request(RCPT.encode() + b"\n")
    assert query == Query(
        stage=Stage.RCPT,
        client=ipaddress.IPv4Address("192.0.2.10"),
        helo="mx.example.net",
        sender="a@example.net",
        recipient="b@test.example",
        txn="12345-1732560000123456",
        nrcpt=1,
        port=25,
        asked=1732560000123789,
    )


def test_parses_the_documented_data_request() -> None:
    request = (
        f"DATA v=1 ip=2001:DB8::0:1 from_b64= nrcpt=2 size=1234 bodysize=1000 lines=20 "
        f"auth_b64={b64('Jörg')} t=1732560000123789 msgid=1tFq9Z-000abc-Xy"
    )
    query = parse_request(request.encode() + b"\r\n")
    assert query.stage is Stage.DATA
    assert query.client == ipaddress.IPv6Address("2001:db8::1")
    assert query.sender == ""
    assert query.recipients == ()
    assert (query.nrcpt, query.size, query.body_size, query.lines) == (2, 1234, 1000, 20)
    assert query.auth == "Jörg"
    assert query.msgid == "1tFq9Z-000abc-Xy"
    assert query.asked == 1732560000123789


@pytest.mark.parametrize(
    ("word", "skip"), [("", False), (" skipdata=1", True), (" skipdata=0", False)]
)
def test_skipdata_is_parsed(word: str, skip: bool) -> None:
    assert parse_request(f"{RCPT}{word}".encode()).skip_data is skip


def test_skipdata_must_be_a_number() -> None:
    with pytest.raises(ProtocolError, match="skipdata= is not a number"):
        parse_request(f"{RCPT} skipdata=yes".encode())


def test_the_skipdata_line_is_not_a_header_line() -> None:
    # The fragments tell it from the header lines after it: it has no colon.
    assert ":" not in SKIP_DATA_LINE and SKIP_DATA_LINE.isascii()


def test_the_deprecated_recipient_list_is_still_parsed() -> None:
    # data.acl of policyd 0.1.0 sent the list (docs/protocol.md): v1 keys keep their meaning.
    request = f"data v=1 ip=192.0.2.1 rcpts_b64={b64('a@x.example, b@y.example,')} nrcpt=2"
    query = parse_request(request.encode())
    assert query.recipients == ("a@x.example", "b@y.example")
    assert query.nrcpt == 2


@pytest.mark.parametrize("value", ["", "soon", "-1", "1.5", "1" * 19])
def test_a_time_that_is_not_a_number_is_a_bad_request(value: str) -> None:
    with pytest.raises(ProtocolError, match="t= is not a number"):
        parse_request(f"data v=1 ip=192.0.2.1 t={value}".encode())


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n"])
@pytest.mark.parametrize("stage", [b"rcpt", b"RCPT", b"rCpT"])
def test_stage_any_case_and_optional_newline(stage: bytes, ending: bytes) -> None:
    query = parse_request(stage + b" ip=192.0.2.1 rcpt_b64=" + b64("x@y").encode() + ending)
    assert query.stage is Stage.RCPT
    assert query.recipient == "x@y"


def test_values_are_utf8_and_may_hold_spaces_and_line_breaks() -> None:
    sender, recipient, helo = (
        b64("Jörg M <j@b.example>"),
        b64("a b\r\nrcpt ip=1"),
        b64(b"\xff\xfeok"),
    )
    query = parse_request(
        f"rcpt ip=192.0.2.1 from_b64={sender} rcpt_b64={recipient} helo_b64={helo}".encode()
    )
    assert query.sender == "Jörg M <j@b.example>"
    assert query.recipient == "a b\r\nrcpt ip=1"
    assert query.helo == "\ufffd\ufffdok"  # invalid UTF-8 is replaced, never fatal


def test_unknown_keys_are_ignored() -> None:
    plain = parse_request(b"data ip=192.0.2.1")
    assert parse_request(b"data ip=192.0.2.1 future=1 spf_b64=!!! x=") == plain


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"rcpt v=1 rcpt_b64=YQ==", "missing ip="),
        (b"rcpt ip=192.0.2.256 rcpt_b64=YQ==", "ip="),
        (b"rcpt ip=192.0.2.1 rcpt_b64=YQ", "rcpt_b64="),
        (b"rcpt ip=192.0.2.1 rcpt_b64=YQ== ip=192.0.2.1", "given twice"),
        (b"rcpt ip=192.0.2.1 rcpt_b64=YQ== word", "not key=value"),
        (b"rcpt ip=192.0.2.1 rcpt_b64=YQ== x=\xc3\xa4", "not ASCII"),
        (b"", "empty request"),
        (b" \r\n", "empty request"),
        (b"helo ip=192.0.2.1", "unknown stage"),
        (b"rcpt v=2 ip=192.0.2.1 rcpt_b64=YQ==", "version"),
        (b"data ip=192.0.2.1 size=12k", "size="),
        (b"rcpt ip=192.0.2.1", "without a recipient (rcpt_b64=)"),
        (b"data ip=192.0.2.1\ndata ip=192.0.2.1", "more than one line"),
        (b"data ip=192.0.2.1\n\n", "more than one line"),
    ],
)
def test_malformed_requests_say_why(request_bytes: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        parse_request(request_bytes)


# --- normalise_ip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("IPv6:2001:db8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("0:0:0:0:0:FFFF:C000:0201", "192.0.2.1"),
        ("[::ffff:192.0.2.1]", "192.0.2.1"),
        ("::1", "::1"),
    ],
)
def test_normalise_ip_forms(text: str, canonical: str) -> None:
    assert normalise_ip(text) == ipaddress.ip_address(canonical)


@pytest.mark.parametrize(
    "text", ["", "[]", "192.0.2", "192.0.2.01", "192.0.2.1/32", "2001:db8::1::1", "x", "1.2.3.4\0"]
)
def test_normalise_ip_refuses(text: str) -> None:
    with pytest.raises(ProtocolError):
        normalise_ip(text)


def textual_forms(address: IPAddress) -> list[str]:
    forms = [str(address), address.exploded, f"[{address}]", str(address).upper()]
    if address.version == 6:
        forms += [f"IPv6:{address.exploded}", f"[{address.exploded.upper()}]"]
    else:
        forms += [f"::ffff:{address}", f"[::FFFF:{address}]", f"0:0:0:0:0:ffff:{address}"]
    return forms


@FUZZ
@given(st.ip_addresses())
def test_every_textual_form_normalises_to_one_address(address: IPAddress) -> None:
    expected = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        expected = address.ipv4_mapped
    for text in textual_forms(address):
        assert normalise_ip(text) == expected, text


@FUZZ
@given(st.text(max_size=50))
def test_normalise_ip_raises_only_protocol_error(text: str) -> None:
    try:
        address = normalise_ip(text)
    except ProtocolError:
        return
    assert not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped)


# --- format_answer and header_lines ---------------------------------------------------------


@pytest.mark.parametrize(
    ("verdict", "answer"),
    [
        (Verdict(Action.ACCEPT), b"ok"),
        (Verdict(Action.ACCEPT, reason="whitelisted-client"), b"ok whitelisted-client"),
        (Verdict(Action.ERROR, text="bad request: x"), b"error bad request: x"),
        (Verdict(Action.ERROR), b"error error"),
        (Verdict(Action.DEFER, 451, "4.7.1", "Greylisted"), b"defer 451 4.7.1 Greylisted"),
        (Verdict(Action.DEFER, 421, "4.3.2", "busy"), b"defer 421 4.3.2 busy"),
        (Verdict(Action.REJECT, 554, "5.7.1", "No"), b"reject 554 5.7.1 No"),
        (Verdict(Action.DEFER, 451, "4.7.1", ""), b"defer 451 4.7.1 policy"),
        (Verdict(Action.ACCEPT, skip_data=True), b"ok\nskipdata"),
        (
            Verdict(
                Action.ACCEPT, reason="passed", headers=("X-Greylist: delayed",), skip_data=True
            ),
            b"ok passed\nskipdata\nX-Greylist: delayed",
        ),
    ],
)
def test_format_answer_examples(verdict: Verdict, answer: bytes) -> None:
    assert format_answer(verdict) == answer


@pytest.mark.parametrize(
    ("action", "code", "want"),
    [
        (Action.DEFER, 550, "451"),
        (Action.DEFER, 0, "451"),
        (Action.DEFER, 4510, "451"),
        (Action.DEFER, 45, "451"),
        (Action.REJECT, 451, "550"),
        (Action.REJECT, 250, "550"),
        (Action.REJECT, -550, "550"),
    ],
)
def test_smtp_code_digit_matches_the_verb(action: Action, code: int, want: str) -> None:
    first = format_answer(Verdict(action, code, "4.7.1", "text")).decode()
    assert first.split(" ")[1] == want


@pytest.mark.parametrize(
    "ecode", ["", "5.7.1", "4.7", "4.7.1.1", "x.y.z", "4.1000.1", "4..1", "4.7.1 ", "4.\u0663.1"]
)
def test_bad_enhanced_code_is_replaced(ecode: str) -> None:
    assert format_answer(Verdict(Action.DEFER, 451, ecode, "t")) == b"defer 451 4.7.1 t"
    wrong_class = "4" + ecode[1:] if ecode.startswith("5") else ecode
    assert format_answer(Verdict(Action.REJECT, 550, wrong_class, "t")) == b"reject 550 5.7.1 t"


def test_text_cannot_break_the_answer_line() -> None:
    text = "Greylisted\r\nreject 550 5.7.1 injected\tJörg"
    answer = format_answer(Verdict(Action.DEFER, 451, "4.7.1", text, reason="a\nb"))
    assert answer == b"defer 451 4.7.1 Greylisted??reject 550 5.7.1 injected?J?rg"
    assert format_answer(Verdict(Action.ACCEPT, reason="new\nline")) == b"ok new?line"
    long = format_answer(Verdict(Action.ERROR, text="x" * 10_000))
    assert len(long) == len("error ") + MAX_REPLY_TEXT


def test_header_lines_are_folded_safely() -> None:
    headers = (
        "X-Greylist: delayed 300 seconds by policyd\r\n at mx; Mon, 1 Jan 2024",
        "Received-SPF: pass (Jörg)\n\tclient-ip=192.0.2.1;\n",
        "",
    )
    assert header_lines(headers) == [
        "X-Greylist: delayed 300 seconds by policyd",
        "\tat mx; Mon, 1 Jan 2024",
        "Received-SPF: pass (J?rg)",
        "\tclient-ip=192.0.2.1;",
    ]
    answer = format_answer(Verdict(Action.ACCEPT, headers=headers))
    assert answer.startswith(b"ok\nX-Greylist: ")
    assert_well_formed(answer)


HEADER_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True)
HEADERS = st.builds(
    lambda name, parts: f"{name}: " + "\n\t".join(parts),
    HEADER_NAMES,
    st.lists(st.text(max_size=30), min_size=1, max_size=3),
)
VERDICTS = st.builds(
    Verdict,
    action=st.sampled_from(Action),
    code=st.integers(-1000, 10_000),
    ecode=st.one_of(st.from_regex(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True), st.text()),
    text=st.text(),
    reason=st.text(),
    headers=st.lists(HEADERS, max_size=3).map(tuple),
)


@FUZZ
@given(VERDICTS)
@example(Verdict(Action.DEFER, 451, "4.\u0663.1", "Arabic-Indic digit"))
@example(Verdict(Action.REJECT, 550, "5.\u00b2.1", "superscript two"))
def test_any_verdict_gives_a_well_formed_answer(verdict: Verdict) -> None:
    answer = format_answer(verdict)
    first, *headers = assert_well_formed(answer)
    assert first.split(" ")[0] == verdict.action.value
    if verdict.action in (Action.DEFER, Action.REJECT):
        digit = "4" if verdict.action is Action.DEFER else "5"
        _, code, ecode, _ = first.split(" ", 3)
        assert code[0] == ecode[0] == digit
        if len(str(verdict.code)) == 3 and str(verdict.code)[0] == digit:
            assert code == str(verdict.code)
    assert len(headers) >= len(verdict.headers)


# --- fuzzing parse_request ------------------------------------------------------------------

#: The request keys as docs/protocol.md names them, by kind, and the Query field each fills:
#: the fuzzing below draws its keys from them, and reference_parse (the grammar in two plain
#: passes, the oracle for the daemon's one-pass parser) uses them.
REFERENCE_B64 = {
    "helo_b64": "helo",
    "host_b64": "host",
    "from_b64": "sender",
    "rcpt_b64": "recipient",
    "rcpts_b64": "recipients",
    "auth_b64": "auth",
}
REFERENCE_COUNTS = {
    "nrcpt": "nrcpt",
    "size": "size",
    "bodysize": "body_size",
    "lines": "lines",
    "port": "port",
    "relay": "relay",
    "t": "asked",
}
REFERENCE_TOKENS = {"txn": "txn", "conn": "conn", "msgid": "msgid"}


PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=24)
TOKENS = st.from_regex(r"[!-~]{0,40}", fullmatch=True)
COUNTS = st.integers(0, 10**18 - 1)
B64_KEYS = tuple(REFERENCE_B64)
COUNT_KEYS = tuple(k for k in REFERENCE_COUNTS if k != "relay")  # relay: a flag, not fuzzed
TOKEN_KEYS = tuple(REFERENCE_TOKENS)
#: Per key: (a good value, a bad one) as text.
VALUES: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = {
    "v": (st.just(PROTOCOL_VERSION), st.sampled_from(["2", "", "1.0", "01"])),
    "ip": (
        st.ip_addresses().flatmap(lambda a: st.sampled_from(textual_forms(a))),
        st.one_of(PRINTABLE, st.ip_addresses().map(lambda a: f"{a}/8")),
    ),
    **dict.fromkeys(B64_KEYS, (st.binary(max_size=40).map(b64), PRINTABLE)),
    **dict.fromkeys(
        COUNT_KEYS, (COUNTS.map(str), st.one_of(PRINTABLE, st.integers(max_value=-1).map(str)))
    ),
    **dict.fromkeys(TOKEN_KEYS, (TOKENS, st.from_regex(r"[!-~]{129,140}", fullmatch=True))),
}


@st.composite
def near_valid_requests(draw: st.DrawFn) -> bytes:
    """Requests that are mostly well-formed: each part is occasionally wrong (a bad value, a
    repeated key, a bare word, an odd stage or ending, one byte changed)."""

    def now_and_then() -> bool:
        return draw(st.integers(0, 19)) == 7  # not a bound: Hypothesis favours those

    def usually() -> bool:
        return draw(st.integers(0, 9)) != 7

    stage = draw(st.sampled_from(["rcpt", "data", "RCPT", "Data"]))
    if now_and_then():
        stage = draw(st.sampled_from(["mail", "", "rcpt=", "rcpt\x00"]))
    keys = draw(st.lists(st.sampled_from(sorted(VALUES)), unique=True, max_size=12))
    if usually():
        keys = ["ip", *(k for k in keys if k != "ip")]
    if stage.lower() == "rcpt" and "rcpt_b64" not in keys and usually():
        keys.append("rcpt_b64")
    if keys and now_and_then():
        keys.append(draw(st.sampled_from(keys)))
    words = [f"{key}={draw(VALUES[key][now_and_then()])}" for key in keys]
    if draw(st.booleans()):
        words.append(
            draw(st.tuples(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), PRINTABLE).map("=".join))
        )
    if now_and_then():
        words.append(draw(PRINTABLE))
    words = draw(st.permutations(words))
    separator = draw(st.sampled_from([" ", " ", "\t", "  ", " \t"]))
    ending = draw(st.sampled_from(["", "\n", "\r\n", "\n", " \n"]))
    if now_and_then():
        ending = draw(st.sampled_from(["\n\n", "\r", "\n\r", "\x00"]))
    data = bytearray(separator.join([stage, *words]).encode() + ending.encode())
    if data and now_and_then():
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


REQUESTS = st.one_of(st.binary(max_size=300), near_valid_requests())


def check_query(query: Query) -> None:
    assert isinstance(query.stage, Stage)
    assert isinstance(query.client, ipaddress.IPv4Address | ipaddress.IPv6Address)
    assert not (isinstance(query.client, ipaddress.IPv6Address) and query.client.ipv4_mapped)
    if query.stage is Stage.RCPT:
        assert isinstance(query.recipient, str)


@FUZZ
@given(REQUESTS)
def test_parse_request_returns_a_query_or_raises_protocol_error(data: bytes) -> None:
    try:
        query = parse_request(data)
    except ProtocolError as exc:
        assert str(exc)
    else:
        check_query(query)


def reference_parse(data: bytes) -> Query:
    """Shape first (every word), then version, address, each value in word order."""
    try:
        line = data.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("request is not ASCII (client values must be base64)") from None
    line = line.removesuffix("\n").removesuffix("\r")
    if "\n" in line or "\r" in line:
        raise ProtocolError("request holds more than one line")
    words = line.split()
    if not words:
        raise ProtocolError("empty request")
    if words[0].lower() not in ("rcpt", "data"):
        raise ProtocolError(f"unknown stage {words[0][:20]!r} (want rcpt or data)")
    stage = Stage(words[0].lower())
    fields: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ProtocolError(f"word {word[:40]!r} is not key=value")
        if key in fields:
            raise ProtocolError(f"key {key[:20]!r} given twice")
        fields[key] = value
    version = fields.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version[:10]!r}")
    if "ip" not in fields:
        raise ProtocolError("missing ip=")
    values: dict[str, Any] = {"stage": stage, "client": normalise_ip(fields["ip"])}
    for key, value in fields.items():
        if key in REFERENCE_B64:
            try:
                raw = base64.b64decode(value, validate=True)
            except ValueError:
                raise ProtocolError(f"{key}= is not valid base64: {value[:40]!r}") from None
            values[REFERENCE_B64[key]] = raw.decode("utf-8", errors="replace")
        elif key in REFERENCE_COUNTS:
            if not re.fullmatch(r"[0-9]{1,18}", value):
                raise ProtocolError(f"{key}= is not a number: {value[:20]!r}")
            values[REFERENCE_COUNTS[key]] = int(value)
        elif key in REFERENCE_TOKENS:
            if not re.fullmatch(r"[!-~]{0,128}", value):
                raise ProtocolError(f"{key}= is not a printable token")
            values[REFERENCE_TOKENS[key]] = value
    if "relay" in values:
        values["relay"] = values["relay"] != 0
    if "recipients" in values:
        listed = values["recipients"].split(",")
        values["recipients"] = tuple(r.strip() for r in listed if r.strip())
    if stage is Stage.RCPT and not values.get("recipient"):
        raise ProtocolError("rcpt request without a recipient (rcpt_b64=)")
    return Query(**values)


def outcome(parse: Any, data: bytes) -> Query | str:
    try:
        return parse(data)  # type: ignore[no-any-return]
    except ProtocolError as exc:
        return f"ProtocolError: {exc}"


@settings(max_examples=600, deadline=None)
@given(REQUESTS)
@example(b"rcpt size=x v=2 ip=192.0.2.1 rcpt_b64=YQ==")  # version before values
@example(b"rcpt ip=nowhere size=x rcpt_b64=YQ==")  # address before values
@example(b"rcpt size=x ip=192.0.2.1 conn=\x01 rcpt_b64=YQ==")  # the first bad value
@example(b"rcpt size=x ip=192.0.2.1 rcpt_b64=YQ== word")  # shape before values
@example(b"data ip=192.0.2.1 relay=0 rcpts_b64=YSwgYiAsLGM=")
@example(b"data ip=192.0.2.1 size=999999999999999999 lines=1000000000000000000")  # 18, 19 digits
@example(b"data ip=192.0.2.1 txn=" + b"x" * 128 + b" conn=" + b"y" * 129)
def test_the_parser_agrees_with_the_reference_grammar(data: bytes) -> None:
    """Same Query, or the same error, for any bytes: the one-pass parser reports what is
    wrong in the order the grammar does, whatever the order of the words."""
    assert outcome(parse_request, data) == outcome(reference_parse, data)


TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
RECIPIENT_LISTS = st.lists(
    TEXT.map(lambda t: t.replace(",", "").strip()).filter(bool), max_size=4
).map(tuple)


@st.composite
def queries(draw: st.DrawFn) -> Query:
    stage = draw(st.sampled_from(Stage))
    return Query(
        stage=stage,
        client=draw(st.ip_addresses().filter(lambda a: a.version == 4 or not a.ipv4_mapped)),
        helo=draw(TEXT),
        host=draw(TEXT),
        sender=draw(TEXT),
        recipient=draw(TEXT.filter(bool)) if stage is Stage.RCPT else "",
        recipients=draw(RECIPIENT_LISTS) if stage is Stage.DATA else (),
        auth=draw(TEXT),
        txn=draw(TOKENS),
        conn=draw(TOKENS),
        nrcpt=draw(COUNTS),
        size=draw(COUNTS),
        body_size=draw(COUNTS),
        lines=draw(COUNTS),
        msgid=draw(TOKENS),
        port=draw(st.integers(0, 65535)),
        asked=draw(COUNTS),
    )


def encode(query: Query) -> bytes:
    """A request as the Exim snippets write it (docs/protocol.md), from a Query."""
    words = [query.stage.value, f"v={PROTOCOL_VERSION}", f"ip={query.client.exploded}"]
    texts = {"helo_b64": query.helo, "host_b64": query.host, "from_b64": query.sender}
    if query.stage is Stage.RCPT:
        texts["rcpt_b64"] = query.recipient
    else:
        texts["rcpts_b64"] = ", ".join(query.recipients)
    texts["auth_b64"] = query.auth
    words += [f"{key}={b64(value)}" for key, value in texts.items()]
    words += [f"txn={query.txn}", f"conn={query.conn}", f"msgid={query.msgid}"]
    counts = {"nrcpt": query.nrcpt, "size": query.size, "bodysize": query.body_size}
    counts |= {"lines": query.lines, "port": query.port, "t": query.asked}
    words += [f"{key}={value}" for key, value in counts.items()]
    return " ".join(words).encode() + b"\n"


@FUZZ
@given(queries())
def test_every_query_survives_the_wire(query: Query) -> None:
    assert parse_request(encode(query)) == query


# --- the dispatcher boundary ----------------------------------------------------------------


def load_golden() -> tuple[dict[str, Any], list[tuple[int, bytes, bytes]]]:
    """The table's ``# config:`` line and its rows (format: tests/data/golden.tsv header)."""

    def unescape(text: str) -> bytes:
        return text.encode("ascii").decode("unicode_escape").encode("latin-1")

    config: dict[str, Any] = {}
    rows = []
    for number, line in enumerate(GOLDEN.read_text("ascii").splitlines(), 1):
        if line.startswith("# config:"):
            config = json.loads(line.removeprefix("# config:"))
        elif line and not line.startswith("#"):
            request, answer = line.split("\t")
            rows.append((number, unescape(request), unescape(answer)))
    return config, rows


GOLDEN_CONFIG, GOLDEN_ROWS = load_golden()


@pytest.fixture
async def dispatcher(tmp_path: Path) -> AsyncIterator[Dispatcher]:
    """The golden table's policy over a real SQLite store, on a fixed clock."""
    store = SQLiteStore(tmp_path / "state.sqlite3")
    await store.start()
    try:
        config = from_mapping(GOLDEN_CONFIG)
        yield Dispatcher(config, store, clock=lambda: 1_700_000_000.0, hostname="mx.test")
    finally:
        await store.aclose()


def test_golden_table_is_complete() -> None:
    answers = [answer for _, _, answer in GOLDEN_ROWS]
    assert len(GOLDEN_ROWS) >= 60
    for verdict in (b"ok", b"ok whitelisted-client", b"defer 451 4.7.1 ", b"error bad request"):
        assert any(a.startswith(verdict) for a in answers), verdict
    for _, request, answer in GOLDEN_ROWS:
        assert_well_formed(answer)
        assert answer.startswith(b"error ") == _malformed(request)


async def test_golden_table_through_the_dispatcher(dispatcher: Dispatcher) -> None:
    wrong = [
        f"golden.tsv:{line} {request!r}: got {got!r}, want {answer!r}"
        for line, request, answer in GOLDEN_ROWS
        if (got := await dispatcher.answer(request)) != answer
    ]
    assert wrong == []


def _malformed(request: bytes) -> bool:
    try:
        parse_request(request)
    except ProtocolError:
        return True
    return False


@settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(REQUESTS)
@example(GOLDEN_ROWS[0][1])
@example(b"rcpt ip=192.0.2.1 rcpt_b64=" + b"A" * 1000)
async def test_dispatcher_always_answers(
    dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    caplog.clear()
    dispatcher.warnings = LogLimiter()  # one dispatcher for all examples: a fresh window each
    with caplog.at_level(logging.WARNING, logger="policyd.dispatch"):
        answer = await dispatcher.answer(data)
    first = assert_well_formed(answer)[0]
    assert first.split(" ")[0] in ("ok", "defer", "reject", "error")
    if _malformed(data):
        assert first.startswith("error bad request: ")
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(repr(data[:LOGGED_REQUEST_BYTES]) in m for m in logged), logged
    else:
        assert not first.startswith("error")

"""The shipped ACL fragments against a scripted stand-in for policyd.

Pins what the fragments send (docs/protocol.md) and how they act on every kind of answer,
including ones the real daemon should never give: a code with the wrong digit, `error`,
nothing at all, no daemon, a daemon that hangs.
"""

from __future__ import annotations

import base64
import mailbox
import re
import socket
import subprocess
import time
import uuid

import pytest
from support.policyd_process import wait_until

from .conftest import (
    NO_ANSWER,
    NO_ANSWER_LOG,
    REPO,
    TEMP_LOCAL_PROBLEM,
    Exim,
    Lab,
    StubPolicy,
    smtp_dialogue,
)

pytestmark = pytest.mark.exim

CLIENT = "192.0.2.10"
SENDER = "alice@example.net"
RCPTS = ["bob@test.example", "carol@test.example"]
PROTOCOL_DOC = REPO / "docs" / "protocol.md"


def documented_keys(stage: str) -> set[str]:
    """The request keys docs/protocol.md lists for ``stage``: the fragments send them all."""
    keys: set[str] = set()
    for line in PROTOCOL_DOC.read_text().splitlines():
        row = re.match(r"\|([^|]*`[^|]*)\|\s*(both|rcpt|data)\s*\|", line)
        if row and row.group(2) in ("both", stage):
            keys |= set(re.findall(r"`([a-z0-9_]+)`", row.group(1)))
    assert keys, f"no request keys found in {PROTOCOL_DOC}"
    return keys


def parse(request: bytes) -> tuple[str, dict[str, str]]:
    """A request as the daemon sees it: one ASCII line, stage word, unique key=value words."""
    assert request.endswith(b"\n") and request.count(b"\n") == 1, request
    words = request.decode("ascii").split()
    fields: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        assert sep, f"word without '=': {word!r}"
        assert key not in fields, f"key given twice: {key!r}"
        fields[key] = value
    return words[0], fields


def decoded(fields: dict[str, str], key: str) -> bytes:
    return base64.b64decode(fields[key], validate=True)


def test_requests_follow_the_protocol(exim: Exim, stub: StubPolicy) -> None:
    asked_at = time.time()
    result = exim.bh(
        CLIENT,
        SENDER,
        RCPTS,
        helo="mx.example.net",
        body="Subject: hello\n\nbody\n",
        socket_path=stub.socket,
    )
    assert result.rcpt_codes == [250, 250], result.describe()
    assert result.data.startswith("250 "), result.describe()
    assert len(stub.requests) == 3, stub.requests

    (s1, r1), (s2, r2), (s3, d) = (parse(r) for r in stub.requests)
    assert (s1, s2, s3) == ("rcpt", "rcpt", "data")
    assert set(r1) == set(r2) == documented_keys("rcpt"), r1
    assert set(d) == documented_keys("data"), d
    for fields in (r1, r2, d):
        assert fields["v"] == "1"
        assert fields["ip"] == CLIENT
        assert decoded(fields, "host_b64") == b""  # no host name (test.conf: no DNS)
        assert decoded(fields, "helo_b64") == b"mx.example.net"
        assert decoded(fields, "from_b64") == SENDER.encode()
        assert decoded(fields, "auth_b64") == b""
    assert decoded(r1, "rcpt_b64") == RCPTS[0].encode()
    assert decoded(r2, "rcpt_b64") == RCPTS[1].encode()
    assert (r1["nrcpt"], r2["nrcpt"], d["nrcpt"]) == ("1", "2", "2")
    # The count, never the list: the DATA question's size does not grow with recipients.
    assert "rcpts_b64" not in d and RCPTS[0].encode() not in stub.requests[2]
    # t= is when Exim asked, in microseconds ($tod_epoch_l), in asking order.
    times = [int(fields["t"]) for fields in (r1, r2, d)]
    assert times == sorted(times) and abs(times[2] / 1e6 - asked_at) < 10, times
    # One transaction id for the whole message, at RCPT and at DATA; one connection id.
    assert r1["txn"] and r1["txn"] == r2["txn"] == d["txn"]
    assert r1["conn"] and r1["conn"] == r2["conn"] == d["conn"]
    assert int(d["size"]) > int(d["bodysize"]) > 0 and d["lines"] == "1"
    assert d["msgid"]


def test_data_has_a_transaction_even_when_no_recipient_was_asked(
    exim: Exim, stub: StubPolicy
) -> None:
    # test.conf, like Debian, accepts postmaster@ before the RCPT hook.
    result = exim.bh(
        CLIENT, SENDER, ["postmaster@test.example"], body="Subject: x\n\n", socket_path=stub.socket
    )
    assert result.data.startswith("250 OK id="), result.describe()
    ((stage, fields),) = (parse(r) for r in stub.requests)
    assert stage == "data" and fields["txn"], fields


def test_each_message_of_a_session_gets_its_own_transaction(exim: Exim, stub: StubPolicy) -> None:
    # A message, a second one after it, an abandoned one, RSET, and a last one.
    dialogue, _ = smtp_dialogue(
        SENDER,
        [RCPTS[0]],
        body="Subject: one\n\n",
        extra=[
            f"MAIL FROM:<{SENDER}>",
            f"RCPT TO:<{RCPTS[1]}>",
            "DATA",
            "Subject: two\r\n\r\n.",
            f"MAIL FROM:<{SENDER}>",
            f"RCPT TO:<{RCPTS[0]}>",
            "RSET",
            f"MAIL FROM:<{SENDER}>",
            f"RCPT TO:<{RCPTS[1]}>",
        ],
    )
    done = subprocess.run(
        exim.command("-bh", CLIENT, POLICYD_SOCKET=str(stub.socket)),
        input=dialogue,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.count(b"250 Accepted") == 4, done.stdout
    asked = [(stage, fields["txn"]) for stage, fields in map(parse, stub.requests)]
    assert [stage for stage, _ in asked] == ["rcpt", "data", "rcpt", "data", "rcpt", "rcpt"]
    txns = [txn for _, txn in asked]
    assert txns[0] == txns[1] and txns[2] == txns[3], asked
    assert len({txns[0], txns[2], txns[4], txns[5]}) == 4, asked
    conns = {parse(r)[1]["conn"] for r in stub.requests}
    assert len(conns) == 1 and conns != {""}, conns


def test_host_name_is_sent_when_exim_knows_it(exim: Exim, stub: StubPolicy) -> None:
    # -oMs gives Exim the client's host name, as a successful reverse lookup would.
    result = exim.bh(
        CLIENT,
        SENDER,
        [RCPTS[0]],
        body="Subject: x\n\n",
        socket_path=stub.socket,
        options=["-oMs", "mail.example.net"],
    )
    assert result.rcpt_codes == [250], result.describe()
    assert [decoded(parse(r)[1], "host_b64") for r in stub.requests] == [b"mail.example.net"] * 2


HOSTILE = [
    # (helo, sender, recipient): what a client may send and Exim lets through to the ACL.
    (b'evil "helo" \xc3\xa9 rcpt_b64=eA==', b"a@example.net", b"b@test.example"),
    (b"c.example", b'"a b rcpt=x"@example.net', b'"x y"@test.example'),
    (b"c.example", b'"it\'s \\"q\\""@example.net', b"b@test.example"),
    (b"c.example", "jörg@exämple.net".encode(), "müller@test.example".encode()),
    (b"c.example", b'"a\rb"@example.net', b'"cr\rhere"@test.example'),
    (b"c.example", b"a@example.net", b'"tab\there"@test.example'),
    (b"c.example", b"", b'"txn=1 nrcpt=9"@test.example'),
]


@pytest.mark.parametrize(("helo", "sender", "rcpt"), HOSTILE)
def test_hostile_values_arrive_intact_and_cannot_add_words(
    exim: Exim, stub: StubPolicy, helo: bytes, sender: bytes, rcpt: bytes
) -> None:
    result = exim.bh(CLIENT, sender, [rcpt], helo=helo, socket_path=stub.socket)
    assert result.rcpt_codes == [250], result.describe()
    assert len(stub.requests) == 1
    stage, fields = parse(stub.requests[0])  # one line, unique keys: nothing was injected
    assert stage == "rcpt"
    assert set(fields) == documented_keys("rcpt")
    assert decoded(fields, "helo_b64") == helo
    assert decoded(fields, "from_b64") == sender
    # $local_part is unquoted: the daemon gets the address as Exim understood it.
    local, _, domain = rcpt.rpartition(b"@")
    assert decoded(fields, "rcpt_b64") == local.strip(b'"') + b"@" + domain


ANSWERS = [
    # (answer, RCPT reply, logged)
    ("defer 451 4.7.1 Greylisted, come back later", "451 4.7.1 Greylisted, come back later", ""),
    ("defer 451 4.7.1 Greylisted\n", "451 4.7.1 Greylisted", ""),
    ("defer 450 4.2.0 Mailbox busy\nX-Ignored: yes", "450 4.2.0 Mailbox busy", ""),
    # A code with the wrong digit is never passed through (Exim would panic-log).
    ("defer 550 5.7.1 wrong digit", "451 4.7.1 Please try again later", ""),
    ("defer", "451 4.7.1 Please try again later", ""),
    ("reject 550 5.7.1 Go away", "550 5.7.1 Go away", ""),
    ("reject 450 4.7.1 wrong digit", "550 5.7.1 Rejected by policy", ""),
    ("ok", "250 Accepted", ""),
    ("ok\n", "250 Accepted", ""),
    ("ok greylist passed\nX-Greylist: delayed 2 seconds", "250 Accepted", ""),
    # No usable answer: fail open by default, and say so in the log.
    ("error unparsable request", "250 Accepted", "error unparsable request"),
    ("okay", "250 Accepted", "okay"),
    (NO_ANSWER, "250 Accepted", '""'),
]


@pytest.mark.parametrize(("answer", "reply", "logged"), ANSWERS)
def test_rcpt_acts_on_the_answer(
    exim: Exim, stub: StubPolicy, answer: str | None, reply: str, logged: str
) -> None:
    stub.script(answer)
    result = exim.bh(CLIENT, SENDER, [RCPTS[0]], socket_path=stub.socket)
    assert result.rcpt == [reply], result.describe()
    failures = [line for line in result.log_lines if NO_ANSWER_LOG in line]
    if logged:
        assert failures and logged in failures[0], result.describe()
        assert "accepting (fail-open)" in failures[0]
    else:
        assert not failures, result.describe()


@pytest.mark.parametrize("answer", ["error store down", NO_ANSWER, "okay"])
def test_fail_closed_defers_without_a_usable_answer(
    exim: Exim, stub: StubPolicy, answer: str | None
) -> None:
    stub.script(answer)
    result = exim.bh(CLIENT, SENDER, [RCPTS[0]], socket_path=stub.socket, POLICYD_FAIL="closed")
    assert result.rcpt == ["451 4.3.0 Policy service unavailable, please try again later"]
    assert any(NO_ANSWER_LOG in line and "fail-closed" in line for line in result.log_lines)


def test_a_verdict_never_leaks_to_the_next_recipient(exim: Exim, stub: StubPolicy) -> None:
    stub.script("defer 451 4.7.1 first one", NO_ANSWER, "ok")
    result = exim.bh(CLIENT, SENDER, [*RCPTS, "dave@test.example"], socket_path=stub.socket)
    assert result.rcpt == ["451 4.7.1 first one", "250 Accepted", "250 Accepted"]


def test_no_daemon_fails_open_and_logs(exim: Exim, lab: Lab) -> None:
    missing = lab.subdir("nodaemon") / "policyd.sock"
    result = exim.bh(CLIENT, SENDER, [RCPTS[0]], socket_path=missing, body="Subject: x\n\n")
    assert result.rcpt_codes == [250] and result.data.startswith("250 "), result.describe()
    assert any('no usable answer "unreachable"' in line for line in result.log_lines)
    assert TEMP_LOCAL_PROBLEM not in result.describe()


def test_a_hanging_daemon_costs_one_timeout_then_fails_open(exim: Exim, lab: Lab) -> None:
    path = lab.subdir("hang") / "hang.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        path.chmod(0o666)
        listener.listen(8)  # never accepts: connect and write succeed, the read waits
        started = time.monotonic()
        result = exim.bh(CLIENT, SENDER, [RCPTS[0]], socket_path=path, POLICYD_TIMEOUT="1s")
        elapsed = time.monotonic() - started
    assert result.rcpt_codes == [250], result.describe()
    assert 0.9 < elapsed < 5, elapsed
    assert any('no usable answer "unreachable"' in line for line in result.log_lines)


def test_local_submissions_are_not_asked(exim: Exim, stub: StubPolicy) -> None:
    dialogue, _ = smtp_dialogue(SENDER, [RCPTS[0]], body="Subject: local\n\n")
    done = subprocess.run(
        exim.command("-bs", "-odi", POLICYD_SOCKET=str(stub.socket)),
        input=dialogue,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert b"250 Accepted" in done.stdout and b"250 OK id=" in done.stdout, done.stdout
    assert stub.requests == []


def test_data_answer_headers_are_added(exim: Exim, lab: Lab, stub: StubPolicy) -> None:
    tag = uuid.uuid4().hex
    stub.script(
        "ok",  # RCPT
        "ok greylist\nX-Greylist: delayed 2 seconds by policyd\n\tsecond line"
        "\nAuthentication-Results: mx.test.example; none",
    )
    dialogue, _ = smtp_dialogue(SENDER, [RCPTS[0]], body=f"Subject: {tag}\n\n")
    # -bs with -oMa: a real SMTP reception (the message is kept and delivered to
    # LAB/mail/inbox) as if from CLIENT; -odi delivers before answering.
    done = subprocess.run(
        exim.command("-bs", "-oMa", CLIENT, "-odi", POLICYD_SOCKET=str(stub.socket)),
        input=dialogue,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert b"250 OK id=" in done.stdout, done.stdout + done.stderr
    data = parse(stub.requests[1])
    assert data[0] == "data" and data[1]["bodysize"] == "0"

    def delivered() -> list[mailbox.mboxMessage]:
        if not lab.inbox.exists():
            return []
        return [m for m in mailbox.mbox(lab.inbox) if m["Subject"] == tag]

    wait_until(lambda: bool(delivered()), "delivery to LAB/mail/inbox", 10)
    (message,) = delivered()
    assert message["X-Greylist"] == "delayed 2 seconds by policyd\n\tsecond line"
    assert message["Authentication-Results"] == "mx.test.example; none"
    assert "X-ACL-Warn" not in message


def test_data_defer_and_empty_body(exim: Exim, stub: StubPolicy) -> None:
    stub.script("ok", "defer 451 4.7.1 Not now")
    result = exim.bh(CLIENT, SENDER, [RCPTS[0]], socket_path=stub.socket, body="Subject: x\n\n")
    assert result.data == "451 4.7.1 Not now", result.describe()

    stub.script("ok")
    result = exim.bh(CLIENT, SENDER, [RCPTS[0]], socket_path=stub.socket, body="Subject: x\n\n")
    assert result.data.startswith("250 OK id="), result.describe()
    assert parse(stub.requests[-1])[1]["bodysize"] == "0"


# --- Fewer questions: skipdata (docs/protocol.md) -----------------------------------------

#: An RCPT answer of policyd when DATA decides nothing, with the message's headers.
SKIP_WITH_HEADERS = (
    "ok passed\nskipdata\nX-Greylist: delayed 2 seconds by policyd\n\tsecond line"
    "\nAuthentication-Results: mx.test.example; none"
)


def stages(stub: StubPolicy) -> list[str]:
    return [parse(r)[0] for r in stub.requests]


def test_skipdata_answers_spare_the_data_question_and_carry_the_headers(
    exim: Exim, lab: Lab, stub: StubPolicy
) -> None:
    tag = uuid.uuid4().hex
    # The first recipient's answer has no headers yet, the last one has them all.
    stub.script("ok\nskipdata", SKIP_WITH_HEADERS)
    dialogue, _ = smtp_dialogue(SENDER, RCPTS, body=f"Subject: {tag}\n\n")
    done = subprocess.run(
        exim.command("-bs", "-oMa", CLIENT, "-odi", POLICYD_SOCKET=str(stub.socket)),
        input=dialogue,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert b"250 OK id=" in done.stdout, done.stdout + done.stderr
    assert stages(stub) == ["rcpt", "rcpt"], stub.requests
    assert all(parse(r)[1]["skipdata"] == "1" for r in stub.requests)

    def delivered() -> list[mailbox.mboxMessage]:
        if not lab.inbox.exists():
            return []
        return [m for m in mailbox.mbox(lab.inbox) if m["Subject"] == tag]

    wait_until(lambda: len(delivered()) == len(RCPTS), "delivery to LAB/mail/inbox", 10)
    message = delivered()[0]  # one copy per recipient (test.conf's appendfile)
    assert message["X-Greylist"] == "delayed 2 seconds by policyd\n\tsecond line"
    # A trace field: on top, above this host's Received: line.
    names = message.keys()
    assert names.index("Authentication-Results") < names.index("Received"), names
    assert "X-ACL-Warn" not in message and "skipdata" not in message.as_string()


@pytest.mark.parametrize(
    "second",
    [
        "ok",  # an older daemon: never says skipdata
        "ok fallback busy",  # a limit was hit: the daemon did not decide
        "error store down",  # no usable answer (fail-open)
        NO_ANSWER,
        "ok\nX-Header: skipdata",  # not the line after the verdict
        "okskipdata\nskipdata",  # not an ok answer
    ],
)
def test_one_recipient_without_skipdata_keeps_the_data_question(
    exim: Exim, stub: StubPolicy, second: str | None
) -> None:
    stub.script("ok\nskipdata", second, "ok\nskipdata", "ok")
    result = exim.bh(
        CLIENT,
        SENDER,
        [*RCPTS, "dave@test.example"],
        socket_path=stub.socket,
        body="Subject: x\n\n",
    )
    assert result.rcpt_codes == [250, 250, 250] and result.data.startswith("250 OK id=")
    assert stages(stub) == ["rcpt", "rcpt", "rcpt", "data"], result.describe()


def test_a_deferred_recipient_does_not_cancel_skipdata(exim: Exim, stub: StubPolicy) -> None:
    stub.script("ok\nskipdata", "defer 451 4.7.1 Greylisted", "ok\nskipdata")
    result = exim.bh(
        CLIENT,
        SENDER,
        [*RCPTS, "dave@test.example"],
        socket_path=stub.socket,
        body="Subject: x\n\n",
    )
    assert result.rcpt_codes == [250, 451, 250] and result.data.startswith("250 OK id=")
    assert stages(stub) == ["rcpt", "rcpt", "rcpt"], result.describe()


def test_skipdata_holds_for_one_message_only(exim: Exim, stub: StubPolicy) -> None:
    # A second message in the session starts again (acl_m_ variables are per message): its
    # recipient's plain "ok" makes its DATA question asked.
    stub.script("ok\nskipdata", "ok")
    dialogue, _ = smtp_dialogue(
        SENDER,
        [RCPTS[0]],
        body="Subject: one\n\n",
        extra=[f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPTS[1]}>", "DATA", "Subject: two\r\n\r\n."],
    )
    done = subprocess.run(
        exim.command("-bh", CLIENT, POLICYD_SOCKET=str(stub.socket)),
        input=dialogue,
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.count(b"250 OK id=") == 2, done.stdout
    assert stages(stub) == ["rcpt", "rcpt", "data"], stub.requests

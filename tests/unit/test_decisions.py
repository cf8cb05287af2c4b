"""The decision log: which decisions reach INFO, and with hash_secret, no one in clear."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging

import pytest

from policyd.addresses import normalise_recipient, normalise_sender
from policyd.decision_log import LOG_ALL, LOG_CHANGES, LOG_NONE, DecisionLog, HashedFields
from policyd.model import Action, Query, Stage, Verdict
from policyd.stores.keys import KeyHasher

QUERY = Query(
    Stage.RCPT,
    ipaddress.ip_address("198.51.100.7"),
    helo="MX.example.net",
    sender="prvs=1234abcd=Alice+news@Example.net",
    recipient="Bob@example.org",
    txn="4711-1",
)
DEFER_NEW = Verdict(Action.DEFER, 451, "4.7.1", "Greylisted", check="greylist", reason="new")
EARLY = Verdict(Action.DEFER, 451, "4.7.1", "Greylisted", check="greylist", reason="early-retry")
PASSED = Verdict(Action.ACCEPT, check="greylist", reason="passed")
KNOWN = Verdict(Action.ACCEPT, check="greylist", reason="known")
WHITELISTED = Verdict(Action.ACCEPT, check="greylist", reason="whitelisted-client")
REJECT = Verdict(Action.REJECT, 550, "5.7.23", "SPF fail", check="spf", reason="fail")
VERDICTS = [DEFER_NEW, EARLY, PASSED, KNOWN, WHITELISTED, REJECT]


def levels(mode: str, caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    caplog.set_level(logging.DEBUG, "policyd.decision")
    log = DecisionLog()
    log.configure(mode)
    for verdict in VERDICTS:
        log.record(QUERY, verdict)
    return {r.getMessage().rsplit("reason=", 1)[1]: r.levelname for r in caplog.records}


def test_by_default_only_decisions_that_change_something_are_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert levels(LOG_CHANGES, caplog) == {
        "new": "INFO",
        "early-retry": "DEBUG",
        "passed": "INFO",
        "known": "DEBUG",
        "whitelisted-client": "DEBUG",
        "fail": "INFO",
    }


@pytest.mark.parametrize(("mode", "level"), [(LOG_ALL, "INFO"), (LOG_NONE, "DEBUG")])
def test_all_or_none(caplog: pytest.LogCaptureFixture, mode: str, level: str) -> None:
    assert set(levels(mode, caplog).values()) == {level}


def test_the_batched_stream_writes_the_level_of_each_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "policyd.decision")
    stream = io.StringIO()

    async def scenario() -> None:
        log = DecisionLog(stream)
        log.configure(LOG_CHANGES)
        log.record(QUERY, KNOWN)
        log.record(QUERY, DEFER_NEW)
        log.flush()

    asyncio.run(scenario())
    known, new = stream.getvalue().splitlines()
    assert " DEBUG policyd.decision: decision stage=rcpt " in known
    assert known.endswith("reason=known")
    assert " INFO policyd.decision: decision stage=rcpt " in new
    assert new.endswith("reason=new")


def test_with_hash_secret_the_fields_are_the_store_hashes() -> None:
    hasher = KeyHasher(b"a site secret of some length")
    line = HashedFields(hasher, 24, 64).line(QUERY, DEFER_NEW)
    assert line == (
        f"decision stage=rcpt client={hasher.segment('198.51.100.0/24')} "
        f"sender={hasher.segment(normalise_sender(QUERY.sender))} "
        f"rcpt={hasher.segment(normalise_recipient(QUERY.recipient))} "
        f"helo={hasher.segment('mx.example.net')} txn=4711-1 action=defer check=greylist "
        "reason=new"
    )
    for clear in ("198.51.100", "alice", "example", "bob", "mx."):
        assert clear not in line.lower()
    data = Query(Stage.DATA, QUERY.client, sender="", recipients=("a@example.org", "b@example.org"))
    hashed_data = HashedFields(hasher, 24, 64).line(data, KNOWN)
    assert "sender=- " in hashed_data and "helo=- " in hashed_data
    assert f"rcpt={hasher.segment('a@example.org')},{hasher.segment('b@example.org')} " in (
        hashed_data
    )

"""End to end over real SMTP: clients → Exim (-bdf, loopback) → delivery to an aiosmtpd sink.

Greylisted messages are retried after the delay like a real MTA would; in the end every
message must have arrived exactly once, and the delayed ones carry the X-Greylist header the
daemon returned at DATA.
"""

from __future__ import annotations

import time
from collections import Counter
from email.message import EmailMessage

import pytest
from support.policyd_process import wait_until

from .conftest import GREYLIST_DELAY, Mta, sleep_until

pytestmark = pytest.mark.exim

#: (source address, sender, recipients): loopback clients in three /24 networks.
MESSAGES = [
    ("127.0.10.1", "alice@example.org", ["one@sink.example"]),
    ("127.0.10.1", "bob@example.org", ["one@sink.example", "two@sink.example"]),
    ("127.0.11.1", "carol@example.com", ["two@sink.example"]),
    ("127.0.12.1", "dave@example.net", ["three@sink.example"]),
    ("127.0.12.2", "erin@example.net", ["one@sink.example"]),
]
#: Retries after the delay before giving up (an MTA would keep trying for days).
RETRY_SLACK = 5.0


def make_message(number: int, sender: str, rcpts: list[str]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(rcpts)
    message["Subject"] = f"message {number}"
    message["Message-ID"] = f"<m{number}.policyd-test@example.org>"
    message["X-Test-Id"] = f"m{number}"
    message.set_content(f"body of message {number}\n")
    return message


def test_every_message_arrives_exactly_once(mta: Mta) -> None:
    pending = {
        f"m{n}": (client, sender, rcpts, make_message(n, sender, rcpts))
        for n, (client, sender, rcpts) in enumerate(MESSAGES, 1)
    }
    first_seen = time.monotonic()
    delayed = set()
    for test_id, (client, sender, rcpts, message) in list(pending.items()):
        refused = mta.send(client, message, sender, rcpts)
        # A new triplet: the whole message is deferred, never a part of it.
        assert refused == dict.fromkeys(rcpts, 451), (test_id, refused)
        delayed.add(test_id)

    sleep_until(first_seen + GREYLIST_DELAY)
    deadline = time.monotonic() + RETRY_SLACK
    while pending:
        for test_id, (client, sender, rcpts, message) in list(pending.items()):
            refused = mta.send(client, message, sender, rcpts)
            assert not refused or set(refused.values()) == {451}, (test_id, refused)
            if not refused:
                del pending[test_id]
        if pending:  # a round that delivered the last one passes, however long it took
            assert time.monotonic() < deadline, f"still refused after the delay: {sorted(pending)}"
            time.sleep(0.2)

    wait_until(lambda: len(mta.sink.messages) >= len(MESSAGES), "delivery to the sink", 20)
    wait_until(lambda: mta.queue_count() == 0, "Exim's queue to empty", 20)
    received = mta.sink.received()
    counts = Counter(message["X-Test-Id"] for _, _, message in received)
    assert counts == Counter({f"m{n}": 1 for n in range(1, len(MESSAGES) + 1)}), counts

    for sender, rcpts, message in received:
        number = int(message["X-Test-Id"][1:])
        _client, want_sender, want_rcpts = MESSAGES[number - 1]
        assert (sender, sorted(rcpts)) == (want_sender, sorted(want_rcpts))
        assert message["X-Test-Id"] in delayed
        assert message["X-Greylist"], f"no X-Greylist header on a delayed message:\n{message}"

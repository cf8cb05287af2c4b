"""Helpers shared by the SPF integration tests (imported relatively: this folder is a package)."""

from __future__ import annotations

from typing import Any

from policyd.model import Query, Stage
from policyd.protocol import normalise_ip

#: Per-query timeout in these tests: a dropped query costs this much, so keep it short.
QUERY_TIMEOUT = 0.3
#: The per-check budget (the [spf] timeout default).
BUDGET = 0.8
AUTHSERV_ID = "mx.test.example"


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def query(client: str, sender: str, helo: str = "mail.example.net", **fields: Any) -> Query:
    """An RCPT question as the protocol layer would decode it."""
    return Query(
        Stage.RCPT,
        normalise_ip(client),
        helo=helo,
        sender=sender,
        recipient="rcpt@local.example",
        **fields,
    )

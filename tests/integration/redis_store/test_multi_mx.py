"""Several MX hosts, one Redis: two daemons (``python -m policyd``, two sockets) share their
greylisting state and runtime whitelists."""

from __future__ import annotations

import time
from typing import Any

import pytest

from .conftest import DELAY, GREYLISTED, RedisLab, admin, ask_blocking, daemon_policy, rcpt

pytestmark = pytest.mark.redis


def test_a_triplet_first_seen_via_a_passes_via_b(redis_lab: RedisLab, daemon_factory: Any) -> None:
    redis = redis_lab.server()
    mx1 = daemon_factory("mx1", **daemon_policy(redis.url))
    mx2 = daemon_factory("mx2", **daemon_policy(redis.url))
    mx1.start()
    mx2.start()
    question = rcpt("198.51.100.7", "bob@test.example")
    first_seen = time.monotonic()
    assert ask_blocking(mx1.socket, question).startswith(GREYLISTED)
    early = ask_blocking(mx2.socket, question)
    assert early.startswith(GREYLISTED), "mx2 must know the triplet mx1 saw"
    time.sleep(max(0.0, first_seen + DELAY + 0.05 - time.monotonic()))
    assert ask_blocking(mx2.socket, question) == b"ok passed"
    assert ask_blocking(mx1.socket, question) == b"ok known"
    # A second passed triplet from that network auto-whitelists it, on both hosts.
    other = rcpt("198.51.100.8", "carol@test.example")
    assert ask_blocking(mx2.socket, other).startswith(GREYLISTED)
    time.sleep(DELAY + 0.05)
    assert ask_blocking(mx1.socket, other) == b"ok passed"
    fresh = rcpt("198.51.100.9", "dave@test.example")
    assert ask_blocking(mx2.socket, fresh) == b"ok auto-whitelisted"


def test_a_whitelist_entry_added_via_a_is_in_b_s_store(
    redis_lab: RedisLab, daemon_factory: Any
) -> None:
    redis = redis_lab.server()
    mx1 = daemon_factory("mx1", **daemon_policy(redis.url))
    mx2 = daemon_factory("mx2", **daemon_policy(redis.url))
    mx1.start()
    mx2.start()
    entry = {"cmd": "whitelist.add", "kind": "client", "value": "203.0.113.0/24"}
    admin(str(mx1.directory / "admin.sock"), entry)
    # mx2 re-reads the store on its next housekeeping round, or at once when asked to list.
    listed = admin(str(mx2.directory / "admin.sock"), {"cmd": "whitelist.list"})
    assert [e["value"] for e in listed] == ["203.0.113.0/24"]
    assert ask_blocking(mx2.socket, rcpt("203.0.113.5", "x@test.example")) == (
        b"ok whitelist-client"
    )

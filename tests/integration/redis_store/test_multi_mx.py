"""Several MX hosts, one Redis: two daemons (``python -m policyd``, two sockets) share their
greylisting state and runtime whitelists."""

from __future__ import annotations

import time
from typing import Any

import pytest
from support.exim_client import ask_blocking
from support.policyd_process import admin

from .conftest import DELAY, GREYLISTED, RedisLab, daemon_policy, rcpt

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


def test_a_whitelist_entry_added_via_a_applies_on_b(
    redis_lab: RedisLab, daemon_factory: Any
) -> None:
    redis = redis_lab.server()
    mx1 = daemon_factory("mx1", **daemon_policy(redis.url))
    mx2 = daemon_factory("mx2", **daemon_policy(redis.url))
    mx1.start()
    mx2.start()
    question = rcpt("203.0.113.5", "x@test.example")
    assert ask_blocking(mx2.socket, question).startswith(GREYLISTED)
    entry = {"cmd": "whitelist.add", "kind": "client", "value": "203.0.113.0/24"}
    admin(str(mx1.directory / "admin.sock"), entry)
    added = time.monotonic()
    # mx2 polls the shared whitelist version (every 0.25 s) and reloads on a change; nobody
    # asks mx2's admin socket, so only that propagation can make the next answer pass.
    while (answer := ask_blocking(mx2.socket, question)) != b"ok whitelist-client":
        assert answer.startswith(GREYLISTED), answer
        assert time.monotonic() - added < 2.0, "mx2 did not pick up the entry within 2 s"
        time.sleep(0.05)
    remove = {"cmd": "whitelist.remove", "kind": "client", "value": "203.0.113.0/24"}
    admin(str(mx1.directory / "admin.sock"), remove)
    removed = time.monotonic()
    while (answer := ask_blocking(mx2.socket, question)) == b"ok whitelist-client":
        assert time.monotonic() - removed < 2.0, "mx2 kept a removed entry for 2 s"
        time.sleep(0.05)
    listed = admin(str(mx2.directory / "admin.sock"), {"cmd": "whitelist.list"})
    assert listed == []

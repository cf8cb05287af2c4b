"""Redis trouble never blocks mail: the daemon on a Redis store, under load, while its Redis
is SIGKILLed and restarted, paused (all commands, or writes only), asleep, slow, or
restarted from its AOF. The circuit breaker opens (one WARNING), the fallback is answered
fast, and real answers come back by themselves (one INFO)."""

from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path

import pytest
from support.policyd_process import DaemonFactory, DaemonProcess, admin
from support.redis_server import RedisServer

from .conftest import DELAY, LoadFactory, log_lines, metric_total, policy
from .load import (
    GREYLISTED,
    PASSED,
    WHITELISTED,
    Sample,
    ask,
    assert_bounded,
    assert_every_question_answered,
    assert_no_traceback,
    new_triplet,
    running,
)

pytestmark = pytest.mark.redis

#: While the circuit is open, the median question is answered this fast: the breaker answers
#: at once, a round trip that times out would take the store's 250 ms (the slowest questions
#: show the 2-core machine's scheduling as much as the daemon, and are held to the deadline).
FALLBACK_MEDIAN = 0.050
#: Normal answers again this soon after Redis is back (the breaker probes every 1 s).
RECOVERY_BUDGET = 5.0
FALLBACK = b"ok fallback store-unavailable"
#: How long the pauses and sleeps last: several breaker probes (every 1 s) fail meanwhile.
OUTAGE = 2.0


def from_store(sample: Sample) -> bool:
    """An answer the store decided (the whitelisted third of the load needs no store)."""
    return sample.answer.startswith(GREYLISTED) or sample.answer == PASSED


def redis_daemon(
    daemon_factory: DaemonFactory, redis: RedisServer, **extra: dict[str, str]
) -> DaemonProcess:
    daemon = daemon_factory(**policy(store={"url": redis.url}, **extra))
    daemon.start()
    return daemon


def assert_answered_fast(samples: list[Sample]) -> None:
    median = statistics.median(s.seconds for s in samples)
    assert median < FALLBACK_MEDIAN, f"median {median * 1000:.0f} ms while the circuit was open"


def assert_breaker_logged_once_per_change(log: str) -> None:
    lines = log_lines(log, "policyd.stores.breaker")
    assert len(lines) == 2, lines
    assert "WARNING" in lines[0] and "circuit open" in lines[0]
    assert "INFO" in lines[1] and "circuit closed" in lines[1]


def test_killed_and_restarted(
    daemon_factory: DaemonFactory, redis: RedisServer, load_on: LoadFactory
) -> None:
    daemon = redis_daemon(daemon_factory, redis)
    with running(load_on(daemon)) as load:
        load.wait_for(from_store, "by the store", RECOVERY_BUDGET)
        killed = time.monotonic()
        redis.kill(signal.SIGKILL)
        time.sleep(OUTAGE)
        restarted = time.monotonic()
        redis.start()
        load.wait_for(from_store, "by the store after the restart", RECOVERY_BUDGET)

    assert_every_question_answered(load.samples)
    assert_bounded(load)
    # From the moment the circuit is open (3 failures, each a refused connect) to the restart.
    outage = [s for s in load.between(killed + 0.3, restarted) if s.answer != WHITELISTED]
    assert len(outage) > 100, "the load kept asking during the outage"
    assert {s.answer for s in outage} == {FALLBACK}
    assert_answered_fast(outage)
    log = daemon.log_since_start()
    assert_no_traceback(log)
    assert_breaker_logged_once_per_change(log)
    assert metric_total(daemon, "policyd_fallbacks_total", cause="store-unavailable") > 0


@pytest.mark.parametrize("mode", ["ALL", "WRITE"])
def test_paused(
    daemon_factory: DaemonFactory, redis: RedisServer, load_on: LoadFactory, mode: str
) -> None:
    """``CLIENT PAUSE … WRITE`` lets reads through but holds every script that writes (all
    of ours): the round trips time out, the breaker must open as for ``ALL``."""
    daemon = redis_daemon(daemon_factory, redis)
    with running(load_on(daemon)) as load, redis.client() as client:
        load.wait_for(from_store, "by the store", RECOVERY_BUDGET)
        paused = time.monotonic()
        client.execute_command("CLIENT", "PAUSE", int(OUTAGE * 1000), mode)
        time.sleep(OUTAGE)
        resumed = time.monotonic()
        load.wait_for(from_store, "by the store after the pause", RECOVERY_BUDGET)

    assert_every_question_answered(load.samples)
    assert_bounded(load)
    log = daemon.log_since_start()
    assert_no_traceback(log)
    assert_breaker_logged_once_per_change(log)
    # Once the circuit is open (the first round trips time out after 250 ms), the fallback
    # at once, not after a timeout.
    open_circuit = [s for s in load.between(paused + 0.6, resumed) if s.answer != WHITELISTED]
    assert open_circuit, "no question while the circuit was open"
    assert {s.answer for s in open_circuit} == {FALLBACK}
    assert_answered_fast(open_circuit)


def test_asleep(daemon_factory: DaemonFactory, redis: RedisServer, load_on: LoadFactory) -> None:
    """``DEBUG SLEEP``: Redis accepts connections and commands but answers nothing."""
    daemon = redis_daemon(daemon_factory, redis)
    with running(load_on(daemon)) as load, redis.client() as client:
        load.wait_for(from_store, "by the store", RECOVERY_BUDGET)
        client.execute_command("DEBUG", "SLEEP", OUTAGE)  # returns when Redis wakes
        load.wait_for(from_store, "by the store after the sleep", RECOVERY_BUDGET)

    assert_every_question_answered(load.samples)
    assert_bounded(load)
    assert FALLBACK in {s.answer for s in load.samples}
    assert_no_traceback(daemon.log_since_start())


def test_slow(daemon_factory: DaemonFactory, redis: RedisServer, load_on: LoadFactory) -> None:
    """Redis slow rather than stopped: it stalls 200 ms out of every ~210 for three seconds
    (round trips near the store's 250 ms budget, some over it)."""
    daemon = redis_daemon(daemon_factory, redis)
    with running(load_on(daemon)) as load, redis.client() as client:
        load.wait_for(from_store, "by the store", RECOVERY_BUDGET)
        slow_until = time.monotonic() + 3.0
        while time.monotonic() < slow_until:
            client.execute_command("DEBUG", "SLEEP", 0.2)
            time.sleep(0.01)
        load.wait_for(from_store, "by the store after the slow spell", RECOVERY_BUDGET)

    assert_every_question_answered(load.samples)
    assert_bounded(load)
    assert_no_traceback(daemon.log_since_start())


def test_aof_restart_keeps_passed_triplets_and_whitelists(
    daemon_factory: DaemonFactory, tmp_path: Path, load_on: LoadFactory
) -> None:
    redis = RedisServer(
        tmp_path / "aof", options=("--appendonly", "yes", "--appendfsync", "always")
    ).start()
    try:
        daemon = redis_daemon(daemon_factory, redis)
        with running(load_on(daemon)) as load:
            assert ask(daemon.socket, new_triplet(7, "aof", "a1")).answer.startswith(GREYLISTED)
            time.sleep(DELAY + 0.05)
            assert ask(daemon.socket, new_triplet(7, "aof", "a2")).answer == PASSED
            admin_socket = str(daemon.directory / "admin.sock")
            admin(
                admin_socket, {"cmd": "whitelist.add", "kind": "client", "value": "203.0.113.0/24"}
            )
            redis.kill(signal.SIGKILL)  # no shutdown save: only the AOF can bring it back
            redis.start()
            load.wait_for(from_store, "by the store after the restart", RECOVERY_BUDGET)

        assert_every_question_answered(load.samples)
        assert ask(daemon.socket, new_triplet(7, "aof", "a3")).answer == b"ok known"
        whitelisted = new_triplet(8, "aof").replace(b"ip=10.0.8.9", b"ip=203.0.113.9")
        assert ask(daemon.socket, whitelisted).answer == b"ok whitelist-client"
        listed = admin(admin_socket, {"cmd": "whitelist.list"})
        assert [e["value"] for e in listed] == ["203.0.113.0/24"]
        assert_no_traceback(daemon.log_since_start())
    finally:
        redis.kill()

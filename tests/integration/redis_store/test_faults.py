"""Redis trouble never blocks mail: a daemon (``python -m policyd``) under load while its
Redis is SIGKILLed, put to sleep, or restarted from its AOF."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from .conftest import (
    DELAY,
    FALLBACK,
    GREYLISTED,
    RedisLab,
    admin,
    ask,
    ask_blocking,
    daemon_policy,
    rcpt,
    rss_kib,
)

pytestmark = pytest.mark.redis

#: Every question answered this fast while Redis is down (the breaker, not a timeout).
FALLBACK_BUDGET = 0.100
#: Normal answers again this soon after Redis is back.
RECOVERY_BUDGET = 5.0
#: Concurrent askers of the load.
ASKERS = 16
#: RSS the daemon may gain during an outage (logs and allocator noise, not queues).
RSS_GROWTH_KIB = 8 * 1024


@dataclass
class Load:
    """ASKERS clients asking back to back; every answer and its latency is recorded."""

    path: str
    answers: list[tuple[float, float, bytes]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def asker(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            question = rcpt(f"198.51.{n}.{i % 250 + 1}", f"u{i}@test.example")
            started = time.monotonic()
            answer = await ask(self.path, question)
            self.answers.append((started, time.monotonic() - started, answer))

    def since(self, moment: float) -> list[tuple[float, float, bytes]]:
        return [a for a in self.answers if a[0] >= moment]


async def _run_load(path: str, scenario: Any) -> Load:
    """Run the load around ``scenario``. The askers measure latency in this process, so
    this process must not pause them: its collector is off while they ask (a full
    collection over the growing ``answers`` took 30-40 ms, every asker's "latency"), and a
    scenario runs blocking steps (starting or reaping redis-server) in a thread."""
    load = Load(path)
    gc.collect()
    gc.disable()
    tasks = [asyncio.create_task(load.asker(n)) for n in range(ASKERS)]
    try:
        await scenario(load)
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)
        gc.enable()
    return load


def test_sigkill_under_load_answers_the_fallback_fast_and_recovers(
    redis_lab: RedisLab, daemon_factory: Any
) -> None:
    redis = redis_lab.server()
    daemon = daemon_factory(**daemon_policy(redis.url))
    daemon.start()
    assert daemon.process is not None
    marks: dict[str, float] = {}

    async def scenario(load: Load) -> None:
        await asyncio.sleep(0.5)
        marks["rss_before"] = rss_kib(daemon.process.pid)
        marks["killed"] = time.monotonic()
        await asyncio.to_thread(redis.kill, signal.SIGKILL)
        await asyncio.sleep(1.5)
        marks["rss_during"] = rss_kib(daemon.process.pid)
        await asyncio.to_thread(redis.start)
        marks["restarted"] = time.monotonic()
        deadline = marks["restarted"] + RECOVERY_BUDGET
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            recent = load.since(time.monotonic() - 0.05)
            if any(a.startswith(GREYLISTED) for _, _, a in recent):
                marks["recovered"] = time.monotonic()
                return

    load = asyncio.run(_run_load(daemon.socket, scenario))

    outage = [a for a in load.answers if marks["killed"] + 0.05 < a[0] < marks["restarted"]]
    assert len(outage) > 100, "the load kept asking during the outage"
    assert {answer for _, _, answer in outage} == {FALLBACK}
    slowest = max(seconds for _, seconds, _ in outage)
    assert slowest < FALLBACK_BUDGET, f"a question took {slowest * 1000:.1f} ms during the outage"
    every = {a[:16] for _, _, a in load.answers}
    assert every <= {FALLBACK[:16], GREYLISTED}, every
    assert "recovered" in marks, f"no normal answer within {RECOVERY_BUDGET}s of the restart"
    assert marks["rss_during"] - marks["rss_before"] < RSS_GROWTH_KIB
    log = daemon.log_since_start()
    assert "Traceback" not in log and "check failed" not in log
    breaker_lines = [line for line in log.splitlines() if "policyd.stores.breaker" in line]
    assert len(breaker_lines) == 2, breaker_lines  # logged once per state change
    assert "WARNING" in breaker_lines[0] and "circuit open" in breaker_lines[0]
    assert "INFO" in breaker_lines[1] and "circuit closed" in breaker_lines[1]


def test_debug_sleep_questions_answered_within_the_deadline(
    redis_lab: RedisLab, daemon_factory: Any
) -> None:
    redis = redis_lab.server()
    daemon = daemon_factory(**daemon_policy(redis.url))
    daemon.start()

    async def scenario(load: Load) -> None:
        await asyncio.sleep(0.3)
        sleeper = await asyncio.create_subprocess_exec(
            "redis-cli",
            "-s",
            str(redis.unix_socket),
            "DEBUG",
            "SLEEP",
            "2",
            stdout=subprocess.DEVNULL,
        )
        load.answers.clear()
        assert await sleeper.wait() == 0  # Redis is awake again
        awake = time.monotonic()
        while time.monotonic() < awake + RECOVERY_BUDGET:
            await asyncio.sleep(0.05)
            if load.answers[-1][2].startswith(GREYLISTED):
                return

    load = asyncio.run(_run_load(daemon.socket, scenario))
    slowest = max(seconds for _, seconds, _ in load.answers)
    # The acceptance: within the daemon's deadline ([server] deadline, 1 s), i.e. Exim always
    # gets an answer before its own 2 s timeout. The store's budget is 250 ms, queueing
    # included; the rest is room for a loaded 2-core CI machine (510 ms seen once).
    assert slowest < 1.0, f"a question took {slowest * 1000:.0f} ms while Redis slept"
    answers = [a for _, _, a in load.answers]
    assert FALLBACK in answers and answers[-1].startswith(GREYLISTED)


def test_aof_restart_keeps_passed_triplets_whitelists_and_auto_whitelisting(
    redis_lab: RedisLab, daemon_factory: Any
) -> None:
    redis = redis_lab.server(options=("--appendonly", "yes", "--appendfsync", "always"))
    daemon = daemon_factory(**daemon_policy(redis.url))
    daemon.start()
    first = rcpt("198.51.100.7", "bob@test.example")
    second = rcpt("198.51.100.8", "carol@test.example")
    for question in (first, second):
        assert ask_blocking(daemon.socket, question).startswith(GREYLISTED)
    time.sleep(DELAY + 0.05)
    for question in (first, second):
        assert ask_blocking(daemon.socket, question) == b"ok passed"
    admin_socket = str(daemon.directory / "admin.sock")
    admin(admin_socket, {"cmd": "whitelist.add", "kind": "client", "value": "203.0.113.0/24"})

    redis.kill(signal.SIGKILL)  # no shutdown save: only the AOF can bring it back
    redis.start()

    deadline = time.monotonic() + RECOVERY_BUDGET
    while (answer := ask_blocking(daemon.socket, first)) == FALLBACK:
        assert time.monotonic() < deadline, "no normal answer after the restart"
        time.sleep(0.05)
    # The network passed two triplets: auto-whitelisted, which answers before the triplet.
    assert answer == b"ok auto-whitelisted"
    assert ask_blocking(daemon.socket, rcpt("198.51.100.9", "dave@test.example")) == (
        b"ok auto-whitelisted"
    )
    rows = admin(admin_socket, {"cmd": "greylist.show", "client": "198.51.100.0/24"})
    assert sorted((row["key"].split("|")[2], row["passed"]) for row in rows) == [
        ("bob@test.example", True),
        ("carol@test.example", True),
    ]
    listed = admin(admin_socket, {"cmd": "whitelist.list"})
    assert [e["value"] for e in listed] == ["203.0.113.0/24"]

"""``/metrics`` of a running ``python -m policyd``, scraped over real HTTP and read with
prometheus-client's own parser: every counter moves by exactly what the test caused."""

from __future__ import annotations

import base64
import re
import socket
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest
from support.exim_client import ask_blocking
from support.policyd_process import DaemonFactory, DaemonProcess, wait_until

from policyd.checks.greylist import DEFER_CODE, DEFER_ECODE

#: Metrics are an optional extra; without prometheus-client there is nothing to scrape.
prom_parser = pytest.importorskip("prometheus_client.parser")

GREYLISTED = f"defer {DEFER_CODE} {DEFER_ECODE} ".encode()
DELAY = 1.0
POLICY: dict[str, Any] = {
    "server": {"deadline": "3s"},
    "greylist": {"delay": f"{DELAY}s", "whitelist_clients": ["192.0.2.0/24"]},
}
#: At most 2 recipients per sender per hour: the third question of a sender is limited.
RULE = """
[[ratelimit.rule]]
name = "per-sender"
key = "sender"
count = "recipients"
rate = "2/1h"
"""
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def rcpt(ip: str, recipient: str, sender: str) -> bytes:
    return (
        f"rcpt v=1 ip={ip} helo_b64={b64('mx.example.net')} from_b64={b64(sender)} "
        f"rcpt_b64={b64(recipient)} auth_b64= nrcpt=1"
    ).encode()


def data(ip: str, recipients: list[str], sender: str) -> bytes:
    return (
        f"data v=1 ip={ip} from_b64={b64(sender)} rcpts_b64={b64(', '.join(recipients))} "
        f"nrcpt={len(recipients)} size=2000 bodysize=1500 lines=30 auth_b64="
    ).encode()


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in prom_parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def metrics_port(daemon: DaemonProcess) -> int:
    log = daemon.wait_for_log("metrics on http://")
    found = re.search(r"metrics on http://127\.0\.0\.1:([0-9]+)/metrics", log)
    assert found, log
    return int(found.group(1))


def test_counters_move_with_the_decisions_caused(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(**POLICY)
    daemon.config_path.write_text(daemon.config_path.read_text() + RULE)
    daemon.start()
    port = metrics_port(daemon)
    before = scrape(port)
    answers: Counter[str] = Counter()

    def question(request: bytes) -> bytes:
        answer = ask_blocking(daemon.socket, request)
        answers[answer.split(b" ", 1)[0].decode()] += 1
        return answer

    # Greylisting: new, early retry, then a pass after the delay.
    grey = rcpt("198.51.100.7", "bob@test.example", "alice@example.net")
    first_seen = time.monotonic()
    assert question(grey).startswith(GREYLISTED)
    assert question(grey).startswith(GREYLISTED)
    time.sleep(max(0.0, first_seen + DELAY + 0.05 - time.monotonic()))
    assert question(grey) == b"ok passed"
    # A whitelisted client, three times with one sender: the third is over the rate limit.
    for n in range(3):
        answer = question(rcpt("192.0.2.9", f"r{n}@test.example", "flood@example.net"))
    assert answer.startswith(b"defer 451 4.7.1 Too much mail (per-sender)")
    # DATA of the passed message, and a request that cannot be parsed.
    assert question(data("198.51.100.7", ["bob@test.example"], "alice@example.net")) == b"ok"
    assert question(b"rcpt v=1 ip=not-an-address").startswith(b"error bad request")

    after = scrape(port)

    assert moved(before, after, "policyd_questions_total", stage="rcpt") == 6
    assert moved(before, after, "policyd_questions_total", stage="data") == 1
    assert moved(before, after, "policyd_question_seconds_count", stage="rcpt") == 6
    assert moved(before, after, "policyd_question_seconds_count", stage="data") == 1
    assert moved(before, after, "policyd_bad_requests_total") == 1

    def decisions(check: str, reason: str, action: str) -> float:
        return moved(
            before, after, "policyd_decisions_total", check=check, reason=reason, action=action
        )

    assert decisions("greylist", "new", "defer") == 1
    assert decisions("greylist", "early-retry", "defer") == 1
    assert decisions("greylist", "passed", "ok") == 1
    assert decisions("greylist", "whitelisted-client", "ok") == 2
    assert decisions("ratelimit", "per-sender", "defer") == 1
    assert decisions("data", "-", "ok") == 1
    total = sum(
        v - value(before, name, **dict(labels))
        for (name, labels), v in after.items()
        if name == "policyd_decisions_total"
    )
    assert total == 7  # every parsed question, once; the bad request is not a decision

    # Rate limit: alice's passed question and flood's first two allowed, flood's third limited.
    def rate(result: str) -> float:
        name = "policyd_ratelimit_decisions_total"
        return moved(before, after, name, rule="per-sender", result=result)

    assert (rate("allowed"), rate("limited"), rate("would_limit")) == (3, 1, 0)
    peak = value(after, "policyd_ratelimit_peak_fill", rule="per-sender")
    assert peak == pytest.approx(1.0, abs=0.01)

    assert moved(before, after, "policyd_greylist_delay_seconds_count") == 1
    delay = moved(before, after, "policyd_greylist_delay_seconds_sum")
    assert DELAY <= delay < DELAY + 1.0
    assert moved(before, after, "policyd_greylist_delay_seconds_bucket", le="60.0") == 1
    # One store step per greylisted question, one per question charged by the rate limit.
    assert moved(before, after, "policyd_store_seconds_count", operation="greylist") == 3
    assert moved(before, after, "policyd_store_seconds_count", operation="ratelimit") == 4
    assert moved(before, after, "policyd_store_errors_total", operation="greylist") == 0
    assert moved(before, after, "policyd_fallbacks_total", cause="store-unavailable") == 0

    assert value(after, "policyd_open_connections") == 0
    assert value(after, "policyd_process_rss_bytes") > 1 << 20
    assert answers == {"defer": 3, "ok": 4, "error": 1}

    # The peak fill is "since the last scrape": with no new question it reads 0.
    again = scrape(port)
    assert value(again, "policyd_ratelimit_peak_fill", rule="per-sender") == 0.0
    assert moved(after, again, "policyd_questions_total", stage="rcpt") == 0

    # A connection held open counts in the gauge until the daemon sees it end.
    def open_now() -> float:
        return value(scrape(port), "policyd_open_connections")

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.connect(daemon.socket)
        held.sendall(b"rcpt v=1 ")
        wait_until(lambda: open_now() == 1, "one connection open")
    wait_until(lambda: open_now() == 0, "the connection closed")
    assert daemon.stop() == 0

"""Metrics of a daemon on the Redis store: a figure the store cannot count cheaply is
exported as NaN (unknown), never as a misleading 0."""

from __future__ import annotations

import math
import re
import urllib.request
from typing import Any

import pytest
from support.exim_client import ask_blocking
from support.policyd_process import wait_until

from .conftest import RedisLab, daemon_policy, rcpt

pytestmark = pytest.mark.redis
prom_parser = pytest.importorskip("prometheus_client.parser")


def gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in prom_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


def test_auto_whitelisted_gauge_is_unknown_on_redis(
    redis_lab: RedisLab, daemon_factory: Any
) -> None:
    redis = redis_lab.server()
    daemon = daemon_factory("mx1", **daemon_policy(redis.url))
    daemon.start()
    found = re.search(
        r"metrics on http://127\.0\.0\.1:([0-9]+)/", daemon.wait_for_log("metrics on")
    )
    assert found
    port = int(found.group(1))
    assert ask_blocking(daemon.socket, rcpt("198.51.100.7", "bob@test.example")).startswith(
        b"defer 451 4.7.1"
    )
    # The first housekeeping round runs at start; until then the gauge holds its initial 0.
    wait_until(
        lambda: math.isnan(gauge(port, "policyd_greylist_auto_whitelisted")),
        "NaN gauge",
        timeout=10.0,
    )
    assert daemon.stop() == 0

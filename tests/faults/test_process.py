"""The daemon's own process under load: ``kill -9`` and a restart on the embedded store, and a
broken config file on SIGHUP.

Durability contract (issue #16): admin changes are committed before policyctl returns;
greylist state may be answered before it is committed, and a crash loses at most the last
second of it (those senders are greylisted once more)."""

from __future__ import annotations

import re
import signal
import time

import pytest
from support.policyd_process import DaemonFactory, admin

from .conftest import DELAY, LoadFactory, log_lines, policy
from .load import (
    GREYLISTED,
    PASSED,
    Sample,
    ask,
    assert_bounded,
    assert_every_question_answered,
    assert_no_traceback,
    new_triplet,
    running,
)

#: State answered this long before a crash must have survived it (the contract's second).
DURABLE_AFTER = 1.0


def again(sample: Sample, txn: str) -> bytes:
    """The same triplet asked in a new SMTP transaction."""
    return re.sub(rb"txn=\S*", b"txn=" + txn.encode(), sample.request)


def test_kill_9_under_load_loses_at_most_the_last_second(
    daemon_factory: DaemonFactory, load_on: LoadFactory
) -> None:
    daemon = daemon_factory(**policy())
    daemon.start()
    admin_socket = str(daemon.directory / "admin.sock")
    with running(load_on(daemon)) as load:
        time.sleep(DELAY + 1.0)  # retries in the load pass from here on
        admin(admin_socket, {"cmd": "whitelist.add", "kind": "client", "value": "203.0.113.0/24"})
        by_admin = new_triplet(90_001, "admin", "k1")
        assert ask(daemon.socket, by_admin).answer.startswith(GREYLISTED)
        client = re.search(rb"ip=(\S+)", by_admin)
        assert client is not None
        triplet = {"client": client[1].decode(), "sender": "s90001admin@example.net"}
        triplet["recipient"] = "u90001@test.example"
        passed = admin(admin_socket, {"cmd": "greylist.pass", **triplet})
        assert passed["passed"] == 1, passed
        time.sleep(1.0)
        killed = time.monotonic()
        daemon.kill()  # SIGKILL: no drain, no final commit
        daemon.start()
        restarted = time.monotonic()
        time.sleep(1.0)

    assert_every_question_answered(load.between(0, killed - 0.1) + load.between(restarted))
    assert_bounded(load)
    # Every question sent before the kill got its real answer; the ones sent while the
    # daemon was down were refused (Exim then takes its FAIL branch: fail-open).
    durable = [s for s in load.between(0, killed - DURABLE_AFTER) if s.answer == PASSED]
    assert len(durable) > 20, "the load passed too few triplets before the kill"
    lost = [
        s
        for i, s in enumerate(durable)
        if ask(daemon.socket, again(s, f"k{i}")).answer != b"ok known"
    ]
    assert not lost, f"{len(lost)} of {len(durable)} passed triplets lost; first {lost[0]}"
    # A triplet greylisted before the kill and retried after the delay passes (or is known:
    # its retry in the load may have passed it already).
    early = load.between(0, killed - DURABLE_AFTER)
    greylisted = [s for s in early if s.answer.startswith(GREYLISTED)]
    forgotten = [
        s
        for i, s in enumerate(greylisted)
        if ask(daemon.socket, again(s, f"g{i}")).answer not in (PASSED, b"ok known")
    ]
    assert not forgotten, f"{len(forgotten)} greylisted triplets forgotten; first {forgotten[0]}"
    assert ask(daemon.socket, again(Sample(0, by_admin, 0), "k2")).answer in (PASSED, b"ok known")
    listed = admin(admin_socket, {"cmd": "whitelist.list"})
    assert [e["value"] for e in listed] == ["203.0.113.0/24"]
    assert_no_traceback(daemon.stderr())
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    "broken",
    ['[greylist]\ndelay = "soon"\nenabled = false\n', "[greylist\ndelay = 1s\n"],
    ids=["bad-value", "not-toml"],
)
def test_broken_config_on_sighup_keeps_the_running_one(
    daemon_factory: DaemonFactory, load_on: LoadFactory, broken: str
) -> None:
    daemon = daemon_factory(**policy())
    daemon.start()
    good = daemon.config_path.read_text()
    with running(load_on(daemon)) as load:
        time.sleep(0.5)
        mark = daemon.log_mark()
        daemon.config_path.write_text(broken)
        daemon.send_signal(signal.SIGHUP)
        daemon.wait_for_log("reload refused", since=mark)
        refused = time.monotonic()
        time.sleep(1.0)
        # The old policy still answers: new triplets are greylisted.
        after = load.between(refused)
        assert any(s.answer.startswith(GREYLISTED) for s in after)
        # Fixed, the file is taken at the next SIGHUP.
        daemon.config_path.write_text(good)
        daemon.send_signal(signal.SIGHUP)
        daemon.wait_for_log("reloaded configuration", since=mark)
        time.sleep(0.3)

    assert_every_question_answered(load.samples)
    assert_bounded(load)
    log = daemon.stderr()[mark:]
    errors = log_lines(log, " ERROR ")
    assert len(errors) == 1 and "reload refused" in errors[0], errors
    assert_no_traceback(daemon.stderr())
    assert daemon.stop() == 0

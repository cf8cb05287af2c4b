"""Rate limits through the dispatcher with the real embedded store and an injected clock:
counting once per message or per recipient across RCPT and DATA, and the refusal texts."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from policyd.config import from_mapping
from policyd.dispatch import Dispatcher
from policyd.stores import open_store


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def rcpt(txn: str, to: str, ip: str = "192.0.2.10", conn: str = "c1") -> bytes:
    return (
        f"rcpt v=1 ip={ip} from_b64={b64('a@example.net')} rcpt_b64={b64(to)} "
        f"txn={txn} conn={conn}\n"
    ).encode()


def data(txn: str, rcpts: list[str], ip: str = "192.0.2.10", conn: str = "c1") -> bytes:
    """As data.acl asks: the recipient count, not the list (each was asked at RCPT)."""
    return (
        f"data v=1 ip={ip} from_b64={b64('a@example.net')} "
        f"nrcpt={len(rcpts)} size=1000 txn={txn} conn={conn}\n"
    ).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


Make = Callable[[list[dict[str, object]]], "Dispatcher"]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    stores = []
    clock = Clock()

    async def factory(rules: list[dict[str, object]]) -> tuple[Dispatcher, Clock]:
        config = from_mapping(
            {
                "store": {"url": f"sqlite://{tmp_path / 'state.sqlite3'}"},
                "greylist": {"enabled": False},
                "ratelimit": {"rule": rules},
            }
        )
        store = await open_store(config.store)
        stores.append(store)
        return Dispatcher(config, store, clock=clock, hostname="mx.test"), clock

    yield factory
    for store in stores:
        await store.aclose()


async def test_twenty_recipients_count_once_per_message_and_twenty_per_recipient(make) -> None:  # type: ignore[no-untyped-def]
    disp, _ = await make(
        [
            {"name": "msgs", "count": "messages", "rate": "2/1h"},
            {"name": "rcpts", "count": "recipients", "rate": "40/1h"},
            {"name": "msgs-data", "count": "messages", "rate": "2/1h", "stage": "data"},
            {"name": "rcpts-data", "count": "recipients", "rate": "40/1h", "stage": "data"},
        ]
    )
    recipients = [f"u{i}@example.org" for i in range(20)]
    for message in ("m1", "m2"):
        for to in recipients:
            assert (await disp.answer(rcpt(message, to))).startswith(b"ok")
        assert (await disp.answer(data(message, recipients))).startswith(b"ok")
    counters = disp.ratelimit.counters
    # 2 messages × 1 for per-message rules; 40 recipients at RCPT; 2 DATA questions × 20.
    assert counters["msgs"].allowed == 2
    assert counters["rcpts"].allowed == 40
    assert counters["msgs-data"].allowed == 2
    assert counters["rcpts-data"].allowed == 2
    # A third message is refused at its first RCPT, and every later RCPT of it too.
    first = await disp.answer(rcpt("m3", recipients[0]))
    assert first.startswith(b"defer 451 4.7.1 ")
    assert b"in 1800 seconds" in first
    assert await disp.answer(rcpt("m3", recipients[1])) == first


async def test_hundred_per_hour_exactly_then_again_after_the_interval(make) -> None:  # type: ignore[no-untyped-def]
    disp, clock = await make([{"name": "per-client", "count": "messages", "rate": "100/1h"}])
    answers = [await disp.answer(rcpt(f"m{i}", "b@example.org")) for i in range(150)]
    assert sum(a.startswith(b"ok") for a in answers) == 100
    refused = [a for a in answers if not a.startswith(b"ok")]
    assert len(refused) == 50
    assert all(a.startswith(b"defer 451 4.7.1 ") for a in refused)
    other = await disp.answer(rcpt("x1", "b@example.org", ip="198.51.100.7"))
    assert other.startswith(b"ok")
    clock.now += 36
    assert (await disp.answer(rcpt("m-late", "b@example.org"))).startswith(b"ok")


async def test_connections_are_counted_once_per_connection(make) -> None:  # type: ignore[no-untyped-def]
    disp, _ = await make([{"name": "conns", "count": "connections", "rate": "2/1h"}])
    for conn in ("c1", "c2"):
        for i in range(3):
            assert (await disp.answer(rcpt(f"{conn}-m{i}", "b@example.org", conn=conn))).startswith(
                b"ok"
            )
    assert (await disp.answer(rcpt("c3-m0", "b@example.org", conn="c3"))).startswith(b"defer")


async def test_dry_run_defers_nothing_and_counts_would_limit(make, caplog) -> None:  # type: ignore[no-untyped-def]
    disp, _ = await make([{"name": "dry", "rate": "1/1h", "dry_run": True}])
    with caplog.at_level("INFO"):
        answers = [await disp.answer(rcpt(f"m{i}", "b@example.org")) for i in range(3)]
    assert all(a.startswith(b"ok") for a in answers)
    assert disp.ratelimit.counters["dry"].would_limit == 2
    assert "rule=dry" in caplog.text and "would refuse" in caplog.text


async def test_a_list_post_is_counted_and_logged_from_its_count(make, caplog) -> None:  # type: ignore[no-untyped-def]
    disp, _ = await make(
        [{"name": "rcpts-data", "count": "recipients", "rate": "6000/1h", "stage": "data"}]
    )
    members = [f"m{i}@lists.example.org" for i in range(5000)]
    with caplog.at_level("DEBUG", logger="policyd.decision"):
        assert await disp.answer(data("post1", members)) == b"ok"
        # 5,000 of 6,000 used: a second post of the same size is over the limit.
        assert (await disp.answer(data("post2", members))).startswith(b"defer 451 4.7.1 ")
        # A question from the fragment of 0.1.0, with the list: the same count, and the
        # list is not written to the decision line.
        listed = f"data v=1 ip=192.0.2.99 rcpts_b64={b64(', '.join(members[:100]))} nrcpt=100"
        assert await disp.answer(listed.encode()) == b"ok"
    assert disp.ratelimit.counters["rcpts-data"].allowed == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "policyd.decision"]
    assert [line.split(" nrcpt=")[1].split()[0] for line in lines] == ["5000", "5000", "100"]
    assert all("@lists.example.org" not in line and len(line) < 400 for line in lines)

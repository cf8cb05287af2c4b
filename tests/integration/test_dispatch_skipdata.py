"""Fewer questions (docs/protocol.md, "Fewer questions"): an RCPT question with
``skipdata=1`` gets ``skipdata`` and the message's header lines when nothing is decided at
DATA; through the dispatcher with the real embedded store and an injected clock."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from policyd.config import Config, from_mapping
from policyd.dispatch import Dispatcher
from policyd.protocol import SKIP_DATA_LINE
from policyd.stores import open_store

DELAY = 300.0
WHITELISTED = "198.51.100.7"
DATA_RULE = {"name": "msgs-data", "count": "messages", "rate": "100/1h", "stage": "data"}
RCPT_RULE = {"name": "msgs", "count": "messages", "rate": "100/1h"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def rcpt(txn: str, to: str, *, ip: str = "192.0.2.10", skip: bool = True) -> bytes:
    flag = " skipdata=1" if skip else ""
    return (
        f"rcpt v=1 ip={ip} from_b64={b64('a@example.net')} rcpt_b64={b64(to)} "
        f"txn={txn} conn=c-{txn}{flag}\n"
    ).encode()


def data(txn: str, nrcpt: int) -> bytes:
    return (
        f"data v=1 ip=192.0.2.10 from_b64={b64('a@example.net')} nrcpt={nrcpt} size=900 "
        f"txn={txn} conn=c-{txn}\n"
    ).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def config(tmp_path: Path, rules: list[dict[str, object]]) -> Config:
    return from_mapping(
        {
            "store": {"url": f"sqlite://{tmp_path / 'state.sqlite3'}"},
            "greylist": {
                "delay": f"{int(DELAY)}s",
                "whitelist_clients": [f"{WHITELISTED}/32"],
                "add_header": True,
            },
            "ratelimit": {"rule": rules},
        }
    )


Make = Callable[[list[dict[str, object]]], Coroutine[Any, Any, tuple[Dispatcher, Clock]]]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    stores = []
    clock = Clock()

    async def factory(rules: list[dict[str, object]]) -> tuple[Dispatcher, Clock]:
        cfg = config(tmp_path, rules)
        store = await open_store(cfg.store)
        stores.append(store)
        return Dispatcher(cfg, store, clock=clock, hostname="mx.test"), clock

    yield factory
    for store in stores:
        await store.aclose()


def lines(answer: bytes) -> list[str]:
    return answer.decode("ascii").split("\n")


async def test_an_accepted_recipient_carries_the_headers_data_would_add(make: Make) -> None:
    disp, clock = await make([RCPT_RULE])
    rcpts = ["u1@example.org", "u2@example.org"]
    first = [await disp.answer(rcpt("m1", to)) for to in rcpts]
    # Deferred recipients are refused: no skipdata, nothing to carry.
    assert [lines(a)[0].split()[0] for a in first] == ["defer", "defer"], first
    assert all(len(lines(a)) == 1 for a in first), first

    clock.now += DELAY + 12
    retry = [lines(await disp.answer(rcpt("m2", to))) for to in rcpts]
    for answer in retry:
        verdict, skip, *headers = answer
        assert verdict.split()[0] == "ok" and skip == SKIP_DATA_LINE, answer
        assert len(headers) == 1 and headers[0].startswith("X-Greylist: delayed 312 seconds"), (
            answer
        )
    # The same lines the DATA question would have given, had it been asked.
    asked = lines(await disp.answer(data("m2", len(rcpts))))
    assert asked[0] == "ok" and asked[1:] == retry[-1][2:], (asked, retry)


async def test_without_headers_the_answer_is_ok_and_skipdata(make: Make) -> None:
    disp, _ = await make([])
    answer = await disp.answer(rcpt("m1", "u@example.org", ip=WHITELISTED))
    assert lines(answer) == ["ok whitelisted-client", SKIP_DATA_LINE], answer


async def test_a_request_without_skipdata_gets_the_answer_of_before(make: Make) -> None:
    disp, _ = await make([])
    answer = await disp.answer(rcpt("m1", "u@example.org", ip=WHITELISTED, skip=False))
    assert answer == b"ok whitelisted-client"


async def test_a_data_stage_rule_keeps_the_data_question(make: Make) -> None:
    disp, _ = await make([DATA_RULE])
    answer = await disp.answer(rcpt("m1", "u@example.org", ip=WHITELISTED))
    assert answer == b"ok whitelisted-client", answer


async def test_a_reload_that_adds_a_data_rule_stops_skipdata_at_once(
    make: Make, tmp_path: Path
) -> None:
    disp, _ = await make([])
    assert SKIP_DATA_LINE in lines(await disp.answer(rcpt("m1", "u@example.org", ip=WHITELISTED)))
    disp.reconfigure(config(tmp_path, [DATA_RULE]))
    assert lines(await disp.answer(rcpt("m2", "u@example.org", ip=WHITELISTED))) == [
        "ok whitelisted-client"
    ]
    disp.reconfigure(config(tmp_path, [RCPT_RULE]))
    assert SKIP_DATA_LINE in lines(await disp.answer(rcpt("m3", "u@example.org", ip=WHITELISTED)))

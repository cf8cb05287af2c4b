"""Config values refused or warned about before the first question: every numeric key of
every section, ports, store URLs, and the warnings against the shipped Exim fragments.
The machine-dependent refusals (files, groups, sockets) are run for real in
tests/integration/test_config_refusal.py."""

from __future__ import annotations

import base64
import dataclasses
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from policyd.config import Config, ConfigError, RateRule, from_mapping
from policyd.config.convert import MAX_DURATION, MAX_PORT
from policyd.config.preflight import (
    FRAGMENT_RCPT_REQUEST_BYTES,
    database_refusal,
    preflight,
    warnings,
)
from policyd.protocol import DEFAULT_MAX_REQUEST_BYTES, parse_request
from policyd.stale import EXIM_TIMEOUT

REPO = Path(__file__).resolve().parents[2]
SNIPPETS = REPO / "exim-snippets"

#: Durations where 0 would switch something off or spin: they must be longer than 0.
POSITIVE_DURATIONS = {
    "server.deadline",
    "server.request_timeout",
    "store.expire_interval",
    "store.timeout",
    "store.breaker_reset",
    "greylist.retry_window",
    "greylist.max_age",
    "spf.timeout",
    "spf.query_timeout",
}


def numeric_keys() -> list[tuple[str, str, object]]:
    """(section, key, default) of every int and float key, [[ratelimit.rule]] included."""
    keys = []
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        cls = section.default_factory  # type: ignore[misc]  # every section has one
        for f in dataclasses.fields(cls):
            if type(f.default) in (int, float):
                keys.append((section.name, f.name, f.default))
    keys.extend(
        ("ratelimit.rule", f.name, f.default)
        for f in dataclasses.fields(RateRule)
        if type(f.default) in (int, float)
    )
    return keys


NUMERIC = numeric_keys()
DURATIONS = [(s, k) for s, k, default in NUMERIC if isinstance(default, float)]
INTEGERS = [(s, k) for s, k, default in NUMERIC if isinstance(default, int)]


def mapping(section: str, key: str, value: object) -> dict[str, Any]:
    if section == "ratelimit.rule":
        return {"ratelimit": {"rule": [{"name": "r", key: value}]}}
    return {section: {key: value}}


def named(section: str, key: str) -> str:
    return f"ratelimit.rule[0].{key}" if section == "ratelimit.rule" else f"{section}.{key}"


def test_the_table_covers_every_section() -> None:
    sections = {s for s, _, _ in NUMERIC}
    assert sections >= {"server", "store", "greylist", "ratelimit.rule", "spf"}
    assert {named(*k) for k in DURATIONS} >= POSITIVE_DURATIONS | {"greylist.delay"}
    assert len(DURATIONS) >= 14 and len(INTEGERS) >= 15


@pytest.mark.parametrize(("section", "key"), DURATIONS, ids=[named(*k) for k in DURATIONS])
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), float("-inf"), -1, "-5s", MAX_DURATION + 1, "99999999w"],
    ids=["nan", "inf", "-inf", "negative", "negative-string", "too-long", "too-long-string"],
)
def test_durations_must_be_finite_and_in_range(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(mapping(section, key, value))
    assert str(info.value).startswith(named(section, key) + ":")


@pytest.mark.parametrize(("section", "key"), DURATIONS, ids=[named(*k) for k in DURATIONS])
def test_zero_durations_only_where_zero_makes_sense(section: str, key: str) -> None:
    if named(section, key) in POSITIVE_DURATIONS:
        with pytest.raises(ConfigError, match=rf"^{re.escape(named(section, key))}: .*than 0"):
            from_mapping(mapping(section, key, 0))
    else:
        # drain_timeout, commit_interval, negative_ttl, … : 0 means "none", on purpose.
        config = from_mapping(mapping(section, key, 0))
        assert config is not None


@pytest.mark.parametrize(("section", "key"), INTEGERS, ids=[named(*k) for k in INTEGERS])
@pytest.mark.parametrize("value", [-1, 1.5, float("nan"), True])
def test_integers_are_whole_and_not_negative(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(mapping(section, key, value))
    assert str(info.value).startswith(named(section, key) + ":")


@pytest.mark.parametrize("value", ["0/h", "1/0s", "1/99999999w", "nan/h", "1/nans"])
def test_rule_rates_are_refused_out_of_range(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^ratelimit\.rule\[0\]\.rate:"):
        from_mapping(mapping("ratelimit.rule", "rate", value))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("server", "tcp", f"127.0.0.1:{MAX_PORT + 1}"),
        ("server", "tcp", "999.0.0.1:10031"),
        ("metrics", "listen", "127.0.0.1:99999"),
        ("metrics", "listen", "[::1]:70000"),
        ("spf", "nameservers", ["127.0.0.1:65536"]),
        ("spf", "nameservers", ["[::1]:99999"]),
    ],
)
def test_ports_and_addresses_out_of_range(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}:"):
        from_mapping({section: {key: value}})


def test_highest_port_is_accepted() -> None:
    config = from_mapping(
        {"metrics": {"listen": f"127.0.0.1:{MAX_PORT}"}, "spf": {"nameservers": ["[::1]:53"]}}
    )
    assert config.metrics.listen.endswith(str(MAX_PORT))


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///var/lib/policyd/", "sqlite://var/"])
def test_sqlite_url_without_a_file_name(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^store\.url: .*names no database file"):
        from_mapping({"store": {"url": url}})


# --- warnings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"server": {"deadline": "30s"}}, "server.deadline"),
        ({"server": {"deadline": EXIM_TIMEOUT}}, "server.deadline"),
        ({"greylist": {"max_age": "1m", "delay": "5m"}}, "greylist.max_age"),
        ({"server": {"max_request_bytes": 10}}, "server.max_request_bytes"),
        (
            {"server": {"max_request_bytes": FRAGMENT_RCPT_REQUEST_BYTES - 1}},
            "server.max_request_bytes",
        ),
    ],
    ids=["deadline-30s", "deadline-at-timeout", "max-age", "request-10", "request-just-short"],
)
def test_warned_values(raw: dict[str, Any], key: str) -> None:
    found = warnings(from_mapping(raw))
    assert [str(p).split(":")[0] for p in found] == [key]
    assert not found[0].fatal


def test_defaults_give_no_warning() -> None:
    assert warnings(from_mapping({})) == []
    limits = {"max_request_bytes": FRAGMENT_RCPT_REQUEST_BYTES, "deadline": 1.999}
    assert warnings(from_mapping({"server": limits})) == []


def fragment_requests() -> list[bytes]:
    """The RCPT questions of rcpt.acl and outbound.acl with every field at its limit."""
    b64 = {n: base64.b64encode(b"x" * n).decode() for n in (254, 255)}
    values = {
        "${if eq{POLICYD_HOST_NAME}{yes}{${base64:$sender_host_name}}}": b64[255],
        "${base64:$sender_helo_name}": b64[255],
        "${base64:$sender_address}": b64[254],
        "${base64:$local_part@$domain}": b64[254],
        "${base64:$authenticated_id}": b64[254],
        "$sender_host_address": "2001:0db8:0000:0000:0000:0000:0000:0001",
        "$sender_host_port": "65535",
        "$acl_m_pdtxn": "4194304-1700000000123456",  # $pid-$tod_epoch_l, pid_max 2**22
        "$acl_c_pdconn": "4194304-1700000000123456",
        "$rcpt_count": "50000",
        "$tod_epoch_l": "1700000000123456",  # t=, microseconds
        "\\n": "\n",
    }
    requests = []
    for name in ("rcpt.acl", "outbound.acl"):
        lines = SNIPPETS.joinpath(name).read_text().splitlines()
        text = re.sub(r"\\\n\s*", "", "\n".join(x for x in lines if not x.lstrip().startswith("#")))
        opening = "${readsocket{POLICYD_SOCKET}{"
        start = text.index(opening) + len(opening)
        depth, end = 1, start
        while depth:  # to the brace that closes the request argument
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        request = text[start : end - 1]
        for variable, value in values.items():
            request = request.replace(variable, value)
        assert "$" not in request, f"{name}: a field this test does not know: {request!r}"
        requests.append(request.encode())
    return requests


def test_fragment_request_size_is_measured_from_the_fragments() -> None:
    requests = fragment_requests()
    for request in requests:
        assert parse_request(request).recipient == "x" * 254
    assert max(len(r) for r in requests) == FRAGMENT_RCPT_REQUEST_BYTES
    assert DEFAULT_MAX_REQUEST_BYTES >= FRAGMENT_RCPT_REQUEST_BYTES


# --- preflight on files ---------------------------------------------------------------------


def test_a_fresh_directory_passes(tmp_path: Path) -> None:
    config = from_mapping(
        {
            "server": {"socket": str(tmp_path / "run" / "p.sock")},
            "admin": {"socket": str(tmp_path / "run" / "a.sock")},
            "store": {"url": f"sqlite://{tmp_path / 'lib' / 'state.sqlite3'}"},
        }
    )
    assert preflight(config) == []
    assert list(tmp_path.iterdir()) == [], "the check must not create anything"


def test_database_errors_at_open_become_one_line() -> None:
    url = "sqlite:///var/lib/policyd/x.sqlite3"
    readonly = str(database_refusal(url, sqlite3.OperationalError("attempt to write a readonly")))
    assert readonly.startswith("store.url: /var/lib/policyd/x.sqlite3 cannot be opened")
    corrupt = str(database_refusal(url, sqlite3.DatabaseError("file is not a database")))
    assert corrupt.startswith("store.url: /var/lib/policyd/x.sqlite3 is not a usable")
    assert "move it aside" in corrupt
    assert "\n" not in readonly + corrupt

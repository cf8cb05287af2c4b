"""Config: typed, validated once, errors name the key; `--check-config`."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from policyd.config import ConfigError, from_mapping, load, parse_duration
from policyd.daemon import main


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("2d", 172800.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("1w", 604800.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "-1s", "", True, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ConfigError, match=r"greylist\.delay"):
        from_mapping({"greylist": {"delay": value}})


def test_defaults_work_without_a_file() -> None:
    config = load(None)
    assert config.greylist.delay == 300
    assert config.greylist.retry_window == 2 * 86400
    assert config.greylist.max_age == 35 * 86400
    assert config.store.url.startswith("sqlite://")
    assert config.server.socket.endswith("policyd.sock")


def test_values_are_typed() -> None:
    config = from_mapping(
        {
            "server": {"socket_mode": "0666", "deadline": "750ms", "fallback": "defer"},
            "greylist": {"whitelist_clients": ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]},
        }
    )
    assert config.server.socket_mode == 0o666
    assert config.server.deadline == 0.75
    assert config.greylist.whitelist_clients[2] == ipaddress.ip_network("198.51.100.7/32")


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"greylist": {"dealy": "5m"}}, "greylist.dealy: unknown key"),
        ({"grey": {}}, "[grey]: unknown section"),
        ({"greylist": {"whitelist_clients": ["300.1.1.1/24"]}}, "greylist.whitelist_clients"),
        ({"greylist": {"ipv4_prefix": 33}}, "greylist.ipv4_prefix"),
        ({"server": {"fallback": "reject"}}, "server.fallback"),
        ({"server": {"socket_mode": "rw"}}, "server.socket_mode"),
        ({"server": {"tcp": "0.0.0.0"}}, "server.tcp"),
        ({"server": {"max_connections": 0}}, "server.max_connections"),
        ({"store": {"url": "mysql://x"}}, "store.url"),
        ({"greylist": {"delay": "3d"}}, "greylist.delay"),
        ({"greylist": {"learn": "yes"}}, "greylist.learn"),
    ],
)
def test_errors_name_the_key(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    assert named in str(info.value)


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[greylist]\ndelay = "2m"\n')
    assert main(["--config", str(good), "--check-config"]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[greylist]\ndelay = "2 minutes"\n')
    assert main(["--config", str(bad), "--check-config"]) != 0
    assert "greylist.delay" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[greylist\n")
    assert main(["--config", str(broken), "--check-config"]) != 0
    assert "invalid TOML" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml"), "--check-config"]) != 0

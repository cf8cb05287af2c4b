"""Drop-ins: ``policyd.toml.d/*.toml`` beside the file, read in name order after it, each key
replacing the one before whole; an error in a drop-in names the drop-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.config import ConfigError, drop_ins, load

MAIN = """\
[server]
socket = "/run/policyd/policyd.sock"
[greylist]
delay = "5m"
whitelist_clients = ["127.0.0.0/8"]
[[ratelimit.rule]]
name = "shipped"
key = "client"
rate = "10/1m"
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_drop_ins_apply_in_name_order_key_by_key(tmp_path: Path) -> None:
    main = write(tmp_path / "policyd.toml", MAIN)
    write(tmp_path / "policyd.toml.d/20-later.toml", '[greylist]\ndelay = "7s"\n')
    write(tmp_path / "policyd.toml.d/10-first.toml", '[greylist]\ndelay = "3s"\nlearn = true\n')
    write(tmp_path / "policyd.toml.d/README", "not toml, not read")
    assert [p.name for p in drop_ins(main)] == ["10-first.toml", "20-later.toml"]
    config = load(main)
    assert config.greylist.delay == 7.0
    assert config.greylist.learn is True
    # Keys a drop-in does not name keep the file's values.
    assert [str(n) for n in config.greylist.whitelist_clients] == ["127.0.0.0/8"]
    assert config.server.socket == "/run/policyd/policyd.sock"


def test_a_drop_in_replaces_a_list_whole(tmp_path: Path) -> None:
    main = write(tmp_path / "policyd.toml", MAIN)
    write(
        tmp_path / "policyd.toml.d/50-site.toml",
        '[[ratelimit.rule]]\nname = "site"\nkey = "sender"\nrate = "5/1h"\n'
        "[greylist]\nwhitelist_clients = []\n",
    )
    config = load(main)
    assert [rule.name for rule in config.ratelimit.rule] == ["site"]
    assert config.greylist.whitelist_clients == ()


def test_no_drop_in_directory_is_the_file_alone(tmp_path: Path) -> None:
    main = write(tmp_path / "policyd.toml", MAIN)
    assert drop_ins(main) == []
    assert load(main).greylist.delay == 300.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[greylist]\ndealy = "3s"\n', "greylist.dealy: unknown key"),
        ("[grey]\n", "[grey]: unknown section"),
        ("[greylist\n", "invalid TOML"),
    ],
)
def test_an_error_in_a_drop_in_names_it(tmp_path: Path, text: str, message: str) -> None:
    main = write(tmp_path / "policyd.toml", MAIN)
    bad = write(tmp_path / "policyd.toml.d/50-bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load(main)
    assert str(bad) in str(info.value) and message in str(info.value)


def test_checks_across_sections_see_the_merged_result(tmp_path: Path) -> None:
    main = write(tmp_path / "policyd.toml", MAIN)
    write(tmp_path / "policyd.toml.d/50-long.toml", '[greylist]\ndelay = "3d"\n')
    with pytest.raises(ConfigError, match=r"greylist\.delay: must be shorter than"):
        load(main)

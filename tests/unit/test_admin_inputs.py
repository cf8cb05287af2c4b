"""What an admin types: which config file is found, and whitelist values that are valid but
almost certainly a mistake (the whole Internet, a recipient without '@')."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.addresses import AddressPatterns
from policyd.config import files as configfile
from policyd.ctl.commands import HASHED_NOTE, SENDER_NOTE, key_notes
from policyd.ctl.importers import parse
from policyd.whitelist import MAX_CLIENT_PREFIX, ListError, normalise_entry


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed = tmp_path / "etc" / "policyd.toml"
    monkeypatch.setattr(configfile, "SYSTEM_CONFIG", installed)
    named = {configfile.ENV_VAR: "/srv/policyd.toml"}

    none = configfile.find(None, {})
    assert none.path is None and str(installed) in none.describe()
    installed.parent.mkdir()
    installed.write_text("")
    assert configfile.find(None, {}) == configfile.Choice(str(installed), "installed default")
    assert configfile.find(None, {configfile.ENV_VAR: ""}).path == str(installed)
    assert configfile.find(None, named) == configfile.Choice("/srv/policyd.toml", "$POLICYD_CONFIG")
    assert configfile.find("x.toml", named) == configfile.Choice("x.toml", "--config")


@pytest.mark.parametrize(
    ("value", "version"),
    [("0.0.0.0/0", 4), ("10.0.0.0/7", 4), ("::/0", 6), ("2000::/3", 6), ("2000::/15", 6)],
)
def test_client_networks_wider_than_the_limit_need_force(value: str, version: int) -> None:
    with pytest.raises(ListError, match=rf"wider than an IPv{version} /\d+; add --force"):
        normalise_entry("client", value)
    assert normalise_entry("client", value, force=True) == value


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("2001:db8::/16", "2001::/16"),
        ("2001:db8::1", "2001:db8::1/128"),
    ],
)
def test_client_networks_up_to_the_limit_are_taken(value: str, stored: str) -> None:
    assert normalise_entry("client", value) == stored
    assert MAX_CLIENT_PREFIX == {4: 8, 6: 16}


@pytest.mark.parametrize(
    ("value", "stored", "matches", "misses"),
    [
        ("Postmaster@", "postmaster@", "postmaster@any.example", "root@any.example"),
        ("bob@example.org", "bob@example.org", "bob@example.org", "bob@example.net"),
        ("example.org", "example.org", "anyone@example.org", "anyone@example.net"),
        ("@example.org", "@example.org", "anyone@example.org", "anyone@sub.example.org"),
        ("@localdomain", "@localdomain", "root@localdomain", "localdomain@example.org"),
    ],
)
def test_recipient_forms_mean_what_admin_md_says(
    value: str, stored: str, matches: str, misses: str
) -> None:
    assert normalise_entry("recipient", value) == stored
    patterns = AddressPatterns([stored])
    assert patterns.match(matches)
    assert not patterns.match(misses)


def test_a_recipient_without_at_or_dot_is_refused_with_the_forms_to_use() -> None:
    with pytest.raises(ListError) as refused:
        normalise_entry("recipient", "postmaster")
    message = str(refused.value)
    for form in ("postmaster@", "postmaster@example.org", "example.org", "@postmaster"):
        assert form in message
    # Removal passes force, so an entry stored before this rule can still be removed.
    assert normalise_entry("recipient", "postmaster", force=True) == "postmaster"


def test_imports_skip_what_the_command_line_refuses() -> None:
    parsed = parse("postgrey-recipients", "postmaster\npostmaster@\nexample.org\n")
    assert [(i.kind, i.value) for i in parsed.items] == [
        ("recipient", "postmaster@"),
        ("recipient", "example.org"),
    ]
    assert [s.line for s in parsed.skipped] == [1]
    assert "has no '@'" in parsed.skipped[0].reason


def test_greylist_show_notes() -> None:
    plain = ["192.0.2.0/24|alice@example.net|b@example.org"]
    assert key_notes(None, plain) == []
    assert key_notes("Alice@Example.NET", plain) == [
        "sender Alice@Example.NET is keyed as alice@example.net"
    ]
    assert key_notes(None, ["192.0.2.0/24|v#@six.example|b@example.org"]) == [SENDER_NOTE]
    hashed = "~" + "A" * 22
    assert key_notes(None, [f"{hashed}|{hashed}|{hashed}"]) == [HASHED_NOTE]

"""Redis store URLs: every documented form parses, bad ones name their fault, secrets are
masked, and the key layout round-trips."""

from __future__ import annotations

import pytest

from policyd.config import ConfigError, from_mapping
from policyd.stores.keys import KeyHasher
from policyd.stores.redis_scripts import KeyLayout
from policyd.stores.redis_url import RedisTarget, RedisURLError, mask_url, parse_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisTarget("single", False, (("localhost", 6379),))),
        (
            "redis://u%40x:p%3Aw@10.0.0.5:6380/2",
            RedisTarget(
                "single", False, (("10.0.0.5", 6380),), db=2, username="u@x", password="p:w"
            ),
        ),
        ("redis://:secret@h", RedisTarget("single", False, (("h", 6379),), password="secret")),
        ("rediss://[::1]:6390/1", RedisTarget("single", True, (("::1", 6390),), db=1)),
        (
            "unix:///run/redis/r.sock?db=3",
            RedisTarget("single", False, unix_path="/run/redis/r.sock", db=3),
        ),
        (
            "unix://:pw@/run/r.sock",
            RedisTarget("single", False, unix_path="/run/r.sock", password="pw"),
        ),
        (
            "redis+sentinel://a:1,b/mymaster/4?sentinel_password=s",
            RedisTarget(
                "sentinel",
                False,
                (("a", 1), ("b", 26379)),
                db=4,
                service="mymaster",
                sentinel_password="s",
            ),
        ),
        (
            "redis+cluster://user:pw@h1:7000,h2:7001",
            RedisTarget(
                "cluster", False, (("h1", 7000), ("h2", 7001)), username="user", password="pw"
            ),
        ),
        (
            "rediss+sentinel://a,b:26380/mymaster",
            RedisTarget("sentinel", True, (("a", 26379), ("b", 26380)), service="mymaster"),
        ),
        ("rediss+cluster://h1:7000", RedisTarget("cluster", True, (("h1", 7000),))),
    ],
)
def test_documented_forms(url: str, expected: RedisTarget) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "fault"),
    [
        ("memcached://h", "scheme"),
        ("redis://h/x", "database"),
        ("redis://h1,h2", "several hosts"),
        ("redis+sentinel://h", "service_name"),
        ("redis+cluster://h/1", "only database 0"),
        ("rediss+cluster://h/1", "only database 0"),
        ("rediss+unix:///r.sock", "scheme"),
        ("unix://relative.sock", "absolute"),
        ("redis://h:99999", "port"),
        ("redis://h?timeout=1", "unknown URL parameter"),
    ],
)
def test_bad_urls_name_their_fault(url: str, fault: str) -> None:
    with pytest.raises(RedisURLError, match=fault):
        parse_url(url)


def test_config_validation_rejects_a_bad_redis_url() -> None:
    with pytest.raises(ConfigError, match=r"^store\.url: .*several hosts"):
        from_mapping({"store": {"url": "redis://a,b"}})


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://u:hunter2@h:1/0", "redis://u:***@h:1/0"),
        ("redis://:p%40ss@h", "redis://:***@h"),
        ("unix://:pw@/run/r.sock?db=1", "unix://:***@/run/r.sock?db=1"),
        (
            "redis+sentinel://a,b/m?sentinel_password=x&db=1",
            "redis+sentinel://a,b/m?sentinel_password=***&db=1",
        ),
        ("redis://h", "redis://h"),
    ],
)
def test_secrets_are_masked(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_store_config_repr_hides_the_hash_secret() -> None:
    config = from_mapping({"store": {"url": "redis://h", "hash_secret": "s3cr3t-0123456789"}})
    assert "s3cr3t" not in repr(config)


@pytest.mark.parametrize(
    "client",
    ["192.0.2.0/24", "2001:db8::/64", "we{ird}", "%7B", "", "%", "a}b{c"],
)
def test_layout_round_trips_and_keeps_one_slot(client: str) -> None:
    layout = KeyLayout("policyd")
    key = f"{client}|a@example.net|b{{x}}@example.org"
    redis_key = layout.triplet(key)
    assert layout.triplet_key(redis_key) == key
    tag = redis_key.split("{", 1)[1].split("}", 1)[0]
    assert tag and tag == layout.client(client).split("{", 1)[1].split("}", 1)[0]


def test_hashing_per_segment_is_stable_and_idempotent() -> None:
    hasher = KeyHasher(b"0123456789abcdef")
    key = "192.0.2.0/24|alice@example.net|bob@example.org"
    hashed = hasher.key(key)
    parts = hashed.split("|")
    assert len(parts) == 3 and all(len(p) == 23 and p.startswith("~") for p in parts)
    assert "example" not in hashed
    assert hasher.key(hashed) == hashed  # keys read back from a scan stay as they are
    assert hasher.segment("192.0.2.0/24") == parts[0]
    assert hasher.parts(["192.0.2.0/24", None, "bob@example.org"]) == [parts[0], None, parts[2]]
    assert hasher.key("rule|192.0.2.1", keep=1).startswith("rule|~")
    assert KeyHasher(b"another-secret-16b").key(key) != hashed


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        KeyHasher(b"short")


@pytest.mark.parametrize(
    ("store", "fault"),
    [
        ({"url": "redis://h", "timeout": "1s"}, r"^store\.timeout: must be shorter"),
        ({"url": "redis://h", "timeout": 0}, r"^store\.timeout: must be longer than 0"),
        ({"prefix": "a{b}"}, r"^store\.prefix: "),
        ({"prefix": ""}, r"^store\.prefix: "),
        ({"hash_secret": "short"}, r"^store\.hash_secret: at least 16 bytes"),
        (
            {"hash_secret": "0123456789abcdef", "hash_secret_file": "/x"},
            r"^store\.hash_secret: set hash_secret or hash_secret_file, not both",
        ),
        ({"breaker_failures": 0}, r"^store\.breaker_failures: must be at least 1"),
    ],
)
def test_store_options_are_validated(store: dict[str, object], fault: str) -> None:
    with pytest.raises(ConfigError, match=fault):
        from_mapping({"store": store})


def test_the_store_timeout_only_binds_a_remote_store() -> None:
    config = from_mapping({"server": {"deadline": "200ms"}, "store": {"timeout": "250ms"}})
    assert config.store.url.startswith("sqlite://")

"""Typed, frozen configuration read once from TOML; every error names the offending key.

Each section is a frozen dataclass; a field's converter comes from its ``metadata["conv"]``
(default: by annotation). Unknown keys and sections are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from .model import IPNetwork
from .protocol import DEFAULT_MAX_REQUEST_BYTES

#: Relative to the working directory: the default works for a non-root user in a checkout.
DEFAULT_STATE_DIR: Final = Path("var")
_DURATION_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*")
_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the dotted key."""


def parse_duration(value: object, key: str = "duration") -> float:
    """Seconds from ``90``, ``1.5``, ``"90s"``, ``"5m"``, ``"2d"``, ``"500ms"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key}: expected seconds or a string like '90s', '5m', '2d'")
    if seconds < 0:
        raise ConfigError(f"{key}: must not be negative")
    return seconds


def _conv_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if value < 0:
        raise ConfigError(f"{key}: must not be negative")
    return value


def _conv_bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _conv_str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _conv_mode(value: object, key: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ConfigError(f"{key}: expected an octal mode string like '0660'")


def _conv_str_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings")
    return tuple(value)


def _conv_networks(value: object, key: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for item in _conv_str_list(value, key):
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not an IP address or CIDR") from None
    return tuple(out)


def _choice(*allowed: str) -> Callable[[object, str], str]:
    def conv(value: object, key: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}; got {value!r}")
        return str(value)

    return conv


def _tcp(value: object, key: str) -> str:
    text = _conv_str(value, key)
    if text and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[0-9.]+|localhost):[0-9]{1,5}", text):
        raise ConfigError(f"{key}: expected 'host:port' (e.g. '127.0.0.1:10031'), got {text!r}")
    return text


def _store_url(value: object, key: str) -> str:
    text = _conv_str(value, key)
    if not re.match(r"(sqlite|redis|rediss|unix|redis\+sentinel|redis\+cluster)://", text):
        raise ConfigError(f"{key}: unsupported store URL {text.split('://')[0]!r}")
    if not text.startswith("sqlite://"):
        from .stores.redis_url import parse_url  # standard library only; config is loaded

        try:
            parse_url(text)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return text


def _prefix(limit: int) -> Callable[[object, str], int]:
    def conv(value: object, key: str) -> int:
        number = _conv_int(value, key)
        if number > limit:
            raise ConfigError(f"{key}: a prefix length is at most {limit}")
        return number

    return conv


def _positive(value: object, key: str) -> int:
    number = _conv_int(value, key)
    if number == 0:
        raise ConfigError(f"{key}: must be at least 1")
    return number


def _duration(value: object, key: str) -> float:
    return parse_duration(value, key)


def _positive_duration(value: object, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be longer than 0")
    return seconds


def _hash_secret(value: object, key: str) -> str:
    text = _conv_str(value, key)
    if text and len(text.encode()) < 16:  # stores.keys.MIN_SECRET_BYTES
        raise ConfigError(f'{key}: at least 16 bytes, or "" for no hashing')
    return text


def _redis_prefix(value: object, key: str) -> str:
    text = _conv_str(value, key)
    # Braces would move the hash tag; glob characters would break admin scans.
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text):
        raise ConfigError(f"{key}: 1-64 characters from A-Z a-z 0-9 _ . : - expected")
    return text


def opt(default: Any, conv: Callable[[object, str], Any]) -> Any:
    """A config field with its default and its converter."""
    return field(default=default, metadata={"conv": conv})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: listeners and the named limits that protect them."""

    socket: str = opt(str(DEFAULT_STATE_DIR / "policyd.sock"), _conv_str)
    socket_mode: int = opt(0o660, _conv_mode)
    socket_group: str = opt("", _conv_str)
    tcp: str = opt("", _tcp)
    #: Whole-connection budget, well under the 2 s readsocket timeout of our snippets.
    deadline: float = opt(1.0, _duration)
    max_request_bytes: int = opt(DEFAULT_MAX_REQUEST_BYTES, _positive)
    #: Open connections answered normally; Exim's own smtp_accept_max defaults to 20, so
    #: this leaves room for idle or slow clients without turning checks off.
    max_connections: int = opt(1024, _positive)
    #: What a question over a limit (busy, deadline, store down) is answered.
    fallback: str = opt("accept", _choice("accept", "defer"))
    drain_timeout: float = opt(5.0, _duration)
    log_level: str = opt("info", _choice("debug", "info", "warning", "error"))
    #: stderr (journald under systemd) or the local syslog socket /dev/log.
    log_target: str = opt("stderr", _choice("stderr", "syslog"))
    syslog_facility: str = opt(
        "mail",
        _choice(
            "mail",
            "daemon",
            "local0",
            "local1",
            "local2",
            "local3",
            "local4",
            "local5",
            "local6",
            "local7",
        ),
    )


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: where state lives (embedded SQLite by default)."""

    url: str = opt(f"sqlite://{DEFAULT_STATE_DIR / 'policyd.sqlite3'}", _store_url)
    #: SQLite page cache; bounds the store's memory whatever the number of rows.
    cache_kib: int = opt(4096, _positive)
    #: Rows removed per expiry step; expiry runs in small steps, never stop-the-world.
    expire_batch: int = opt(500, _positive)
    expire_interval: float = opt(10.0, _duration)
    #: SQLite: questions share one write transaction this long (group commit).
    commit_interval: float = opt(0.005, _duration)
    # Redis (docs/redis.md); ignored by the embedded store unless noted.
    #: Namespace of every Redis key (``policyd:t:{…}…``); lets several setups share a Redis.
    prefix: str = opt("policyd", _redis_prefix)
    #: Budget of one Redis round trip (connect included); well under ``server.deadline``.
    timeout: float = opt(0.25, _positive_duration)
    #: Consecutive failed round trips that open the circuit (answer the fallback at once).
    breaker_failures: int = opt(3, _positive)
    #: While open, one probe goes through this often; success closes the circuit.
    breaker_reset: float = opt(1.0, _positive_duration)
    #: TLS (``rediss://``): CA bundle to verify the server, client certificate and key.
    tls_ca_file: str = opt("", _conv_str)
    tls_cert_file: str = opt("", _conv_str)
    tls_key_file: str = opt("", _conv_str)
    #: Keyed hashing (HMAC-SHA256) of stored keys, any store; the same secret on every MX.
    hash_secret: str = field(default="", repr=False, metadata={"conv": _hash_secret})
    hash_secret_file: str = opt("", _conv_str)


@dataclass(frozen=True, slots=True)
class GreylistConfig:
    """``[greylist]``: design.md §3 greylisting."""

    enabled: bool = opt(True, _conv_bool)
    delay: float = opt(300.0, _duration)
    retry_window: float = opt(2 * 86400.0, _duration)
    max_age: float = opt(35 * 86400.0, _duration)
    auto_whitelist_after: int = opt(5, _conv_int)
    ipv4_prefix: int = opt(24, _prefix(32))
    ipv6_prefix: int = opt(64, _prefix(128))
    learn: bool = opt(False, _conv_bool)
    skip_authenticated: bool = opt(True, _conv_bool)
    #: Questions from the outbound fragment (relay hosts, authenticated clients).
    skip_relay: bool = opt(True, _conv_bool)
    whitelist_clients: tuple[IPNetwork, ...] = opt(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")), _conv_networks
    )
    whitelist_recipients: tuple[str, ...] = opt(("postmaster@", "abuse@"), _conv_str_list)
    multi_recipient: str = opt("first", _choice("first", "each"))
    add_header: bool = opt(True, _conv_bool)
    message: str = opt(
        "Greylisted: your mail server must retry; a new sender is accepted after {delay}",
        _conv_str,
    )


_RATE_RE: Final = re.compile(r"\s*([0-9]+)\s*/\s*([0-9.]*\s*(?:ms|s|m|h|d|w)?)\s*")
RATE_KEY_PARTS: Final = (
    "client",
    "sender",
    "sender_domain",
    "auth",
    "recipient",
    "recipient_domain",
)


def parse_rate(value: object, key: str = "rate") -> tuple[int, float]:
    """``"100/1h"``, ``"100/h"``, ``"10/90s"`` → (count, period in seconds)."""
    if isinstance(value, str) and (m := _RATE_RE.fullmatch(value)):
        count = int(m.group(1))
        unit = m.group(2).strip()
        period = parse_duration(unit if unit[:1].isdigit() else f"1{unit or 's'}", key)
        if count > 0 and period > 0:
            return count, period
    raise ConfigError(f"{key}: expected a rate like '100/1h', '10/m' or '5/90s', got {value!r}")


def _rate(value: object, key: str) -> tuple[int, float]:
    return parse_rate(value, key)


def _key_parts(value: object, key: str) -> tuple[str, ...]:
    parts = (value,) if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or not parts:
        raise ConfigError(f"{key}: expected a key part or a list of them")
    for part in parts:
        if part not in RATE_KEY_PARTS:
            raise ConfigError(f"{key}: {part!r} is not one of {', '.join(RATE_KEY_PARTS)}")
    return tuple(str(p) for p in parts)


def _lower_list(value: object, key: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in _conv_str_list(value, key))


@dataclass(frozen=True, slots=True)
class RateRule:
    """One ``[[ratelimit.rule]]``: what is counted, per which key, how fast, and the action."""

    name: str = opt("", _conv_str)
    key: tuple[str, ...] = opt(("client",), _key_parts)
    count: str = opt("messages", _choice("connections", "messages", "recipients", "bytes"))
    rate: tuple[int, float] = opt((100, 3600.0), _rate)
    #: Units admitted at once; 0 means the rate's count (a full period's worth).
    burst: int = opt(0, _conv_int)
    stage: str = opt("rcpt", _choice("rcpt", "data"))
    action: str = opt("defer", _choice("defer", "reject"))
    dry_run: bool = opt(False, _conv_bool)
    ipv4_prefix: int = opt(32, _prefix(32))
    ipv6_prefix: int = opt(64, _prefix(128))
    exempt_clients: tuple[IPNetwork, ...] = opt((), _conv_networks)
    exempt_users: tuple[str, ...] = opt((), _lower_list)
    exempt_senders: tuple[str, ...] = opt((), _lower_list)
    message: str = opt("Too much mail ({rule}); please try again {retry}", _conv_str)

    @property
    def effective_burst(self) -> int:
        return self.burst or self.rate[0]


def _rules(value: object, key: str) -> tuple[RateRule, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected [[{key}]] tables")
    rules = tuple(_section(RateRule, f"{key}[{i}]", item) for i, item in enumerate(value))
    names = [r.name for r in rules]
    for i, rule in enumerate(rules):
        if not rule.name:
            raise ConfigError(f"{key}[{i}].name: every rule needs a name")
        if names.count(rule.name) > 1:
            raise ConfigError(f"{key}[{i}].name: duplicate rule name {rule.name!r}")
        if rule.count == "bytes" and rule.stage != "data":
            raise ConfigError(f"{key}[{i}].stage: bytes are only known at stage 'data'")
        if rule.stage == "data" and {"recipient", "recipient_domain"} & set(rule.key):
            raise ConfigError(f"{key}[{i}].key: recipient keys need stage 'rcpt'")
    return rules


@dataclass(frozen=True, slots=True)
class RatelimitConfig:
    """``[ratelimit]``: flood protection rules (``[[ratelimit.rule]]``)."""

    enabled: bool = opt(True, _conv_bool)
    exempt_clients: tuple[IPNetwork, ...] = opt(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")), _conv_networks
    )
    rule: tuple[RateRule, ...] = opt((), _rules)


_NAMESERVER_RE: Final = re.compile(
    r"\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?|[0-9.]+(:[0-9]{1,5})?|[0-9a-fA-F:]+"
)


def _nameservers(value: object, key: str) -> tuple[str, ...]:
    """DNS servers as c-ares takes them: ``127.0.0.1``, ``127.0.0.1:5353``, ``[::1]:5353``."""
    out = tuple(v.strip() for v in _conv_str_list(value, key))
    for entry in out:
        address = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry
        address = address.split("]")[0].lstrip("[")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(
                f"{key}: {entry!r} is not an IP address with an optional port "
                "(e.g. '127.0.0.1:5353', '[::1]:53')"
            ) from None
        if not _NAMESERVER_RE.fullmatch(entry):
            raise ConfigError(f"{key}: {entry!r} is not 'address' or 'address:port'")
    return out


@dataclass(frozen=True, slots=True)
class SpfConfig:
    """``[spf]``: SPF checks (docs/spf.md). Off by default: turning it on makes the daemon
    query DNS for every new sender domain."""

    enabled: bool = opt(False, _conv_bool)
    #: DNS servers (``host:port``); empty: the system's (/etc/resolv.conf).
    nameservers: tuple[str, ...] = opt((), _nameservers)
    #: Total time budget of one check; then the result is temperror. Below [server] deadline.
    timeout: float = opt(0.8, _duration)
    #: One DNS query, c-ares retries included.
    query_timeout: float = opt(0.5, _duration)
    #: DNS answers cached at once (LRU, ~0.4 KiB each); bounds the cache's memory.
    cache_size: int = opt(5_000, _positive)
    #: SPF results cached per (client IP, sender, HELO) until their DNS answers expire (LRU,
    #: ~0.5 KiB each): a repeat check costs a look-up instead of an evaluation.
    result_cache_size: int = opt(2_000, _positive)
    #: How long NXDOMAIN/NODATA answers are cached.
    negative_ttl: float = opt(300.0, _duration)
    #: ``null-sender``: the HELO identity is checked when MAIL FROM is <> (RFC 7208 §2.4);
    #: ``first``: also checked first for every sender, and a HELO fail decides (§2.3).
    helo: str = opt("null-sender", _choice("null-sender", "first"))
    skip_authenticated: bool = opt(True, _conv_bool)
    #: Relay hosts and other clients never checked.
    skip_clients: tuple[IPNetwork, ...] = opt(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")), _conv_networks
    )
    #: fail: ``reject`` (550 5.7.23) or ``tag`` (accept, headers only).
    fail_action: str = opt("reject", _choice("reject", "tag"))
    #: softfail is accepted with headers; this many seconds are added to the greylist delay.
    softfail_greylist_delay: float = opt(0.0, _duration)
    #: permerror: ``accept`` (headers only) or ``reject`` (550 5.7.24).
    permerror_action: str = opt("accept", _choice("accept", "reject"))
    #: temperror: ``defer`` (451 4.4.3) until the give-up rule, or ``accept`` at once.
    temperror_action: str = opt("defer", _choice("defer", "accept"))
    #: Give-up rule for one (client IP, sender): accept once it was deferred this many
    #: times, or once this long has passed since its first temperror.
    temperror_max_defers: int = opt(3, _conv_int)
    temperror_max_time: float = opt(3600.0, _duration)
    #: authserv-id of Authentication-Results (RFC 8601 §2.5); empty: the host name.
    authserv_id: str = opt("", _conv_str)
    received_spf_header: bool = opt(True, _conv_bool)
    authentication_results_header: bool = opt(True, _conv_bool)
    #: Wide-open guard for greylisting keyed on an SPF-pass domain: a record authorising
    #: more addresses in total than one IPv4 /N or IPv6 /N keeps network keying.
    greylist_max_ipv4_prefix: int = opt(12, _prefix(32))
    greylist_max_ipv6_prefix: int = opt(32, _prefix(128))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus exporter (needs prometheus-client)."""

    enabled: bool = opt(True, _conv_bool)
    #: Loopback by default; port 0 picks a free port (tests).
    listen: str = opt("127.0.0.1:9477", _tcp)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the policyctl socket, separate from Exim's so Exim cannot administer."""

    socket: str = opt(str(DEFAULT_STATE_DIR / "policyd-admin.sock"), _conv_str)
    socket_mode: int = opt(0o600, _conv_mode)
    socket_group: str = opt("", _conv_str)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration tree."""

    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    ratelimit: RatelimitConfig = field(default_factory=RatelimitConfig)
    spf: SpfConfig = field(default_factory=SpfConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    source: str = "<defaults>"


_SECTIONS: Final[dict[str, type[Any]]] = {
    "server": ServerConfig,
    "store": StoreConfig,
    "greylist": GreylistConfig,
    "ratelimit": RatelimitConfig,
    "spf": SpfConfig,
    "metrics": MetricsConfig,
    "admin": AdminConfig,
}
_T = TypeVar("_T")


def _section(cls: type[_T], name: str, raw: object) -> _T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{name}]: expected a table")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key")
        values[key] = known[key].metadata["conv"](value, f"{name}.{key}")
    return cls(**values)


def from_mapping(raw: Mapping[str, object], source: str = "<mapping>") -> Config:
    """Validate a parsed TOML document into a Config."""
    sections: dict[str, Any] = {}
    for name, body in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"[{name}]: unknown section")
        sections[name] = _section(_SECTIONS[name], name, body)
    config = Config(**sections, source=source)
    _cross_check(config)
    return config


def _cross_check(config: Config) -> None:
    grey = config.greylist
    if grey.delay >= grey.retry_window:
        raise ConfigError("greylist.delay: must be shorter than greylist.retry_window")
    if config.spf.enabled and config.spf.timeout >= config.server.deadline:
        raise ConfigError("spf.timeout: must be shorter than server.deadline")
    if not config.server.socket and not config.server.tcp:
        raise ConfigError("server.socket: no listener (set server.socket or server.tcp)")
    remote = not config.store.url.startswith("sqlite://")
    if remote and config.store.timeout >= config.server.deadline:
        raise ConfigError("store.timeout: must be shorter than server.deadline")
    if config.store.hash_secret and config.store.hash_secret_file:
        raise ConfigError("store.hash_secret: set hash_secret or hash_secret_file, not both")


def load(path: str | Path | None) -> Config:
    """Read and validate a TOML file; ``None`` gives the documented defaults."""
    if path is None:
        return from_mapping({}, "<defaults>")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_mapping(raw, str(path))

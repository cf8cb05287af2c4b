"""Typed, frozen configuration read once from TOML; every error names the offending key.

Each section is a frozen dataclass; a field's converter comes from its ``metadata["conv"]``
(default: by annotation). Unknown keys and sections are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from .convert import (
    DEFAULT_STATE_DIR,
    RATE_KEY_PARTS,
    ConfigError,
    _choice,
    _conv_bool,
    _conv_int,
    _conv_mode,
    _conv_networks,
    _conv_str,
    _conv_str_list,
    _duration,
    _hash_secret,
    _key_parts,
    _lower_list,
    _nameservers,
    _positive,
    _positive_duration,
    _prefix,
    _rate,
    _redis_prefix,
    _store_url,
    _tcp,
    opt,
    parse_duration,
    parse_rate,
)
from .model import IPNetwork

__all__ = [  # the configuration API; the conversion helpers are re-exported from .convert
    "RATE_KEY_PARTS",
    "AdminConfig",
    "Config",
    "ConfigError",
    "GreylistConfig",
    "MetricsConfig",
    "RateRule",
    "RatelimitConfig",
    "ServerConfig",
    "SpfConfig",
    "StoreConfig",
    "from_mapping",
    "load",
    "parse_duration",
    "parse_rate",
]
from .protocol import DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: listeners and the named limits that protect them."""

    socket: str = opt(str(DEFAULT_STATE_DIR / "policyd.sock"), _conv_str)
    socket_mode: int = opt(0o660, _conv_mode)
    socket_group: str = opt("", _conv_str)
    tcp: str = opt("", _tcp)
    #: Whole-connection budget, well under the 2 s readsocket timeout of our snippets.
    deadline: float = opt(1.0, _positive_duration)
    #: Accept → complete request; Exim writes it at once, so only idle or slow clients
    #: reach it. They are closed, and do not hold a slot until the deadline.
    request_timeout: float = opt(0.25, _positive_duration)
    max_request_bytes: int = opt(DEFAULT_MAX_REQUEST_BYTES, _positive)
    #: Open connections answered normally; Exim's own smtp_accept_max defaults to 20, so
    #: this leaves room for idle or slow clients without turning checks off.
    max_connections: int = opt(1024, _positive)
    #: What a question over a limit (busy, deadline, store down) is answered.
    fallback: str = opt("accept", _choice("accept", "defer"))
    drain_timeout: float = opt(5.0, _duration)
    log_level: str = opt("info", _choice("debug", "info", "warning", "error"))
    #: Decision lines at INFO: those that change something (refusals, first passes), all,
    #: or none; the others are DEBUG (policyd/decisions.py).
    log_decisions: str = opt("changes", _choice("changes", "all", "none"))
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
    expire_interval: float = opt(10.0, _positive_duration)
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
    #: TLS (``rediss://``, ``rediss+sentinel://``, ``rediss+cluster://``): CA bundle to
    #: verify the servers, client certificate and key.
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
    retry_window: float = opt(2 * 86400.0, _positive_duration)
    max_age: float = opt(35 * 86400.0, _positive_duration)
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


@dataclass(frozen=True, slots=True)
class SpfConfig:
    """``[spf]``: SPF checks (docs/spf.md). Off by default: turning it on makes the daemon
    query DNS for every new sender domain."""

    enabled: bool = opt(False, _conv_bool)
    #: DNS servers (``host:port``); empty: the system's (/etc/resolv.conf).
    nameservers: tuple[str, ...] = opt((), _nameservers)
    #: Total time budget of one check; then the result is temperror. Below [server] deadline.
    timeout: float = opt(0.8, _positive_duration)
    #: One DNS query, c-ares retries included.
    query_timeout: float = opt(0.5, _positive_duration)
    #: DNS answers cached at once (LRU, ~0.4 KiB each); bounds the cache's memory.
    cache_size: int = opt(5_000, _positive)
    #: SPF results cached per (client IP, sender, HELO) until their DNS answers expire (LRU,
    #: ~0.5 KiB each): a repeat check costs a look-up instead of an evaluation.
    result_cache_size: int = opt(1_000, _positive)
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


#: Drop-ins beside the file: ``policyd.toml.d/*.toml``, read in name order after it, so a
#: packaged conffile stays as shipped while the site changes keys (README.Debian).
DROP_IN_SUFFIX: Final = ".d"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def drop_ins(path: str | Path) -> list[Path]:
    """The drop-in files of the configuration file ``path``, in the order they apply."""
    directory = Path(path).with_name(Path(path).name + DROP_IN_SUFFIX)
    return sorted(directory.glob("*.toml")) if directory.is_dir() else []


def load(path: str | Path | None) -> Config:
    """Read and validate a TOML file and its drop-ins; ``None`` gives the documented defaults.

    A drop-in's key replaces the same key of the file (or an earlier drop-in) whole, lists
    and ``[[ratelimit.rule]]`` included; its sections and keys are checked on their own first,
    so an error names the drop-in."""
    if path is None:
        return from_mapping({}, "<defaults>")
    raw = _read_toml(Path(path))
    extras = drop_ins(path)
    if extras:
        _check_sections(raw)  # before merging: the file's own errors are its own
    for extra in extras:
        layer = _read_toml(extra)
        try:
            _check_sections(layer)
        except ConfigError as exc:
            raise ConfigError(f"{extra}: {exc}") from None
        for name, body in layer.items():
            raw[name] = {**raw.get(name, {}), **body}
    return from_mapping(raw, str(path))


def _check_sections(raw: Mapping[str, object]) -> None:
    """Check the sections and keys of ``raw`` without the checks across sections."""
    for name, body in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"[{name}]: unknown section")
        _section(_SECTIONS[name], name, body)

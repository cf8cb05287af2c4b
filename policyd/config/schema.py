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

from ..model import IPNetwork
from ..protocol import DEFAULT_MAX_REQUEST_BYTES
from . import convert as conv
from .convert import (
    DEFAULT_STATE_DIR,
    ConfigError,
    opt,
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: listeners and the named limits that protect them."""

    socket: str = opt(
        str(DEFAULT_STATE_DIR / "policyd.sock"),
        conv.string,
        (
            "Unix socket Exim asks on (empty: none). A missing directory is created with "
            "mode 0750 and group socket_group when the daemon may; otherwise the start "
            "stops with exit status 2, naming the command that creates it."
        ),
    )
    socket_mode: int = opt(0o660, conv.file_mode, 'Octal mode of the socket, e.g. "0660".')
    socket_group: str = opt(
        "",
        conv.string,
        (
            "Group of the socket and of a socket directory the daemon creates, e.g. "
            "\"Debian-exim\"; the daemon's user must be a member. Empty: the daemon's "
            "group."
        ),
    )
    tcp: str = opt(
        "",
        conv.tcp_listen,
        (
            'Optional TCP listener, "host:port" such as "127.0.0.1:10031" (port 0: any '
            "free port). Empty: none."
        ),
    )
    #: Whole-connection budget, well under the 2 s readsocket timeout of our snippets.
    deadline: float = opt(
        1.0,
        conv.positive_duration,
        (
            "Whole-connection budget, accept to answer written; a question over it gets "
            "the fallback answer. Keep it below the readsocket timeout of the Exim "
            "snippets (2s)."
        ),
    )
    request_timeout: float = opt(
        0.25,
        conv.positive_duration,
        (
            "Accept to complete request: Exim writes its request at once, so only idle or "
            "slow clients reach this. They are closed and do not hold a connection slot "
            "until the deadline; one that sent part of a request gets the fallback answer."
        ),
    )
    max_request_bytes: int = opt(
        DEFAULT_MAX_REQUEST_BYTES, conv.positive, "A longer request gets the fallback answer."
    )
    #: Open connections answered normally; Exim's own smtp_accept_max defaults to 20, so
    #: this leaves room for idle or slow clients without turning checks off.
    max_connections: int = opt(
        1024,
        conv.positive,
        (
            "Questions beyond this many open connections get the fallback answer without "
            "being evaluated; beyond twice as many, connections are closed at once."
        ),
    )
    fallback: str = opt(
        "accept",
        conv.choice("accept", "defer"),
        (
            "The answer when the daemon cannot decide (store down, deadline passed, too "
            'many connections): accept ("ok fallback CAUSE") or defer (451 4.3.0).'
        ),
    )
    drain_timeout: float = opt(
        5.0,
        conv.duration,
        "On SIGTERM, how long open questions may finish before they are cut short.",
    )
    log_level: str = opt(
        "info",
        conv.choice("debug", "info", "warning", "error"),
        (
            "debug, info (decisions as log_decisions says), warning or error; SIGHUP "
            "applies a change."
        ),
    )
    log_decisions: str = opt(
        "changes",
        conv.choice("changes", "all", "none"),
        (
            "Which decision lines are logged at INFO: changes (refusals and first passes; "
            "passes of known triplets, whitelisted clients and early retries at DEBUG), all, "
            "or none (every decision at DEBUG)."
        ),
    )
    log_target: str = opt(
        "stderr",
        conv.choice("stderr", "syslog"),
        "stderr (the journal under systemd) or syslog (/dev/log).",
    )
    syslog_facility: str = opt(
        "mail",
        conv.choice(
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
        'Facility with log_target = "syslog": mail, daemon, local0 to local7.',
    )


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: where state lives (embedded SQLite by default)."""

    url: str = opt(
        f"sqlite://{DEFAULT_STATE_DIR / 'policyd.sqlite3'}",
        conv.store_url,
        (
            "Where state lives: sqlite://PATH (everything after sqlite:// is the path, so"
            " sqlite:///var/lib/policyd/policyd.sqlite3 is absolute), or Redis: "
            "redis://[user:pass@]host[:port][/db], rediss:// (TLS), "
            "unix:///path/redis.sock[?db=N], "
            "redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db], "
            "redis+cluster://[user:pass@]h1:p1,h2:p2, and rediss+sentinel://, "
            "rediss+cluster:// over TLS."
        ),
    )
    cache_kib: int = opt(
        4096,
        conv.positive,
        ("SQLite page cache in KiB; bounds the store's memory whatever the number of rows."),
    )
    expire_batch: int = opt(
        500,
        conv.positive,
        "SQLite: rows deleted per expiry step; expiry never runs as one long sweep.",
    )
    expire_interval: float = opt(
        10.0, conv.positive_duration, "SQLite: pause between expiry steps."
    )
    commit_interval: float = opt(
        0.005,
        conv.duration,
        (
            "SQLite: the rows answered questions changed are written together this often; "
            "answers are given before the commit, so a crash loses at most this much "
            "triplet and rate state."
        ),
    )
    # Redis (docs/redis.md); ignored by the embedded store unless noted.
    prefix: str = opt(
        "policyd",
        conv.redis_prefix,
        (
            "Redis: namespace of every key, 1 to 64 of A-Z a-z 0-9 _ . : -; several "
            "setups can share one Redis with different prefixes."
        ),
    )
    timeout: float = opt(
        0.25,
        conv.positive_duration,
        (
            "Redis: budget of one round trip, connect and queueing included, then the "
            "fallback answer; shorter than server.deadline."
        ),
    )
    breaker_failures: int = opt(
        3,
        conv.positive,
        (
            "Redis: consecutive failed round trips that open the circuit; questions then "
            "get the fallback answer at once."
        ),
    )
    breaker_reset: float = opt(
        1.0,
        conv.positive_duration,
        (
            "Redis: while the circuit is open, one probe goes through this often; the "
            "first success closes it."
        ),
    )
    tls_ca_file: str = opt(
        "",
        conv.string,
        ("rediss: CA bundle that signed the server's certificate (empty: the system's)."),
    )
    tls_cert_file: str = opt(
        "", conv.string, "rediss: client certificate, when the server asks for one."
    )
    tls_key_file: str = opt("", conv.string, "rediss: the client certificate's key.")
    hash_secret: str = field(
        default="",
        repr=False,
        metadata={
            "conv": conv.hash_secret,
            "doc": (
                "Any store: key material is stored as HMAC-SHA256 with this secret (at least "
                "16 bytes, the same on every MX sharing a store); empty: off."
            ),
        },
    )
    hash_secret_file: str = opt(
        "",
        conv.string,
        (
            "The hash secret read from a file (e.g. a systemd credential), surrounding "
            "whitespace stripped; not together with hash_secret."
        ),
    )


@dataclass(frozen=True, slots=True)
class GreylistConfig:
    """``[greylist]``: design.md §3 greylisting."""

    enabled: bool = opt(True, conv.boolean, "Greylist at RCPT.")
    delay: float = opt(
        300.0,
        conv.duration,
        (
            "A retry sooner than this after the first attempt is deferred again (the "
            "first attempt is kept, the clock not reset)."
        ),
    )
    retry_window: float = opt(
        2 * 86400.0,
        conv.positive_duration,
        "An unpassed triplet not retried within this is forgotten; longer than delay.",
    )
    max_age: float = opt(
        35 * 86400.0,
        conv.positive_duration,
        ("A passed triplet, and an auto-whitelisted client, unused this long is forgotten."),
    )
    auto_whitelist_after: int = opt(
        5,
        conv.integer,
        ("A client network that passed this many distinct triplets skips greylisting (0: never)."),
    )
    ipv4_prefix: int = opt(
        24, conv.prefix_length(32), "Prefix length of the client network in the key, IPv4."
    )
    ipv6_prefix: int = opt(
        64, conv.prefix_length(128), "Prefix length of the client network in the key, IPv6."
    )
    learn: bool = opt(
        False,
        conv.boolean,
        ("Record every triplet but defer nothing, to fill the auto-whitelist before going live."),
    )
    skip_authenticated: bool = opt(True, conv.boolean, "Authenticated senders are not greylisted.")
    skip_relay: bool = opt(
        True,
        conv.boolean,
        (
            "Questions from outbound.acl (relay hosts and authenticated clients, relay=1)"
            " are not greylisted; on Debian, Exim's relay_from_hosts includes localhost."
        ),
    )
    whitelist_clients: tuple[IPNetwork, ...] = opt(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        conv.networks,
        "Client networks (CIDR, IPv4 and IPv6) never greylisted; loopback by default.",
    )
    whitelist_recipients: tuple[str, ...] = opt(
        ("postmaster@", "abuse@"),
        conv.string_list,
        (
            "Recipients that opt out: user@domain, user@ (that local part in every "
            "domain), domain or @domain."
        ),
    )
    multi_recipient: str = opt(
        "first",
        conv.choice("first", "each"),
        (
            "first: the first greylisted recipient decides for the whole message, which "
            "is never split; each: every recipient on its own."
        ),
    )
    add_header: bool = opt(
        True, conv.boolean, "Return an X-Greylist header at DATA when a message was delayed."
    )
    message: str = opt(
        "Greylisted: your mail server must retry; a new sender is accepted after {delay}",
        conv.string,
        "The SMTP text of a deferral; {delay} becomes the delay in words.",
    )


@dataclass(frozen=True, slots=True)
class RateRule:
    """One ``[[ratelimit.rule]]``: what is counted, per which key, how fast, and the action."""

    name: str = opt(
        "",
        conv.string,
        "Required and unique; in logs, metrics, the 451 text and policyctl ratelimit.",
    )
    key: tuple[str, ...] = opt(
        ("client",),
        conv.key_parts,
        (
            "What is counted per: client, sender, sender_domain, auth, recipient, "
            "recipient_domain, or a list of them; a question missing a part is not "
            "counted by the rule."
        ),
    )
    count: str = opt(
        "messages",
        conv.choice("connections", "messages", "recipients", "bytes"),
        "connections, messages, recipients or bytes (bytes only at stage data).",
    )
    rate: tuple[int, float] = opt(
        (100, 3600.0), conv.rate, 'Count per period: "100/1h", "10/m", "5/90s".'
    )
    burst: int = opt(0, conv.integer, "Units admitted at once; 0: the rate's count.")
    stage: str = opt(
        "rcpt", conv.choice("rcpt", "data"), "rcpt or data (recipient keys need rcpt)."
    )
    action: str = opt(
        "defer",
        conv.choice("defer", "reject"),
        "defer (451 4.7.1, with the time to retry) or reject (550 5.7.1).",
    )
    dry_run: bool = opt(
        False,
        conv.boolean,
        "Never refuse; log and count (would_limit) what would have been refused.",
    )
    ipv4_prefix: int = opt(
        32, conv.prefix_length(32), "Client network of the client key part, IPv4 prefix length."
    )
    ipv6_prefix: int = opt(
        64, conv.prefix_length(128), "Client network of the client key part, IPv6 prefix length."
    )
    exempt_clients: tuple[IPNetwork, ...] = opt(
        (), conv.networks, "Client networks (CIDR) this rule does not apply to."
    )
    exempt_users: tuple[str, ...] = opt(
        (), conv.lower_list, "Authenticated ids this rule does not apply to."
    )
    exempt_senders: tuple[str, ...] = opt(
        (), conv.lower_list, "Senders (user@domain, user@, domain) this rule does not apply to."
    )
    message: str = opt(
        "Too much mail ({rule}); please try again {retry}",
        conv.string,
        (
            'The SMTP text; {rule} becomes the rule\'s name, {retry} "in N seconds" ("in 1'
            ' second") or "later".'
        ),
    )

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

    enabled: bool = opt(True, conv.boolean, "Rate-limit rules apply.")
    exempt_clients: tuple[IPNetwork, ...] = opt(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        conv.networks,
        "Client networks no rule applies to; loopback by default.",
    )
    rule: tuple[RateRule, ...] = opt((), _rules, "The rules, as [[ratelimit.rule]] tables.")


@dataclass(frozen=True, slots=True)
class SpfConfig:
    """``[spf]``: SPF checks (docs/spf.md). Off by default: turning it on makes the daemon
    query DNS for every new sender domain."""

    enabled: bool = opt(
        False, conv.boolean, "Check SPF; on, the daemon queries DNS for every new sender domain."
    )
    nameservers: tuple[str, ...] = opt(
        (),
        conv.nameservers,
        (
            'DNS servers as "address" or "address:port" ("127.0.0.1:5353", "[::1]:53"); '
            "empty: those of /etc/resolv.conf."
        ),
    )
    timeout: float = opt(
        0.8,
        conv.positive_duration,
        "Total budget of one check, then temperror; below server.deadline.",
    )
    query_timeout: float = opt(
        0.5, conv.positive_duration, "One DNS query, c-ares retries included."
    )
    cache_size: int = opt(5_000, conv.positive, "DNS answers cached (LRU, about 0.4 KiB each).")
    #: SPF results cached per (client IP, sender, HELO) until their DNS answers expire (LRU,
    #: ~0.5 KiB each): a repeat check costs a look-up instead of an evaluation.
    result_cache_size: int = opt(
        1_000,
        conv.positive,
        (
            "SPF results cached per (client IP, sender, HELO) until their DNS answers "
            "expire (LRU, about 0.5 KiB each)."
        ),
    )
    negative_ttl: float = opt(
        300.0, conv.duration, "How long NXDOMAIN and NODATA answers are cached."
    )
    helo: str = opt(
        "null-sender",
        conv.choice("null-sender", "first"),
        (
            "null-sender: the HELO identity is checked when MAIL FROM is <> (RFC 7208 "
            "section 2.4); first: also checked first for every sender, and a HELO fail "
            "decides."
        ),
    )
    skip_authenticated: bool = opt(True, conv.boolean, "Authenticated senders are not checked.")
    skip_clients: tuple[IPNetwork, ...] = opt(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        conv.networks,
        "Client networks never checked (relay hosts); loopback by default.",
    )
    fail_action: str = opt(
        "reject",
        conv.choice("reject", "tag"),
        "fail: reject (550 5.7.23) or tag (accept, headers only).",
    )
    softfail_greylist_delay: float = opt(
        0.0,
        conv.duration,
        "softfail is accepted with headers; this much is added to the greylist delay.",
    )
    permerror_action: str = opt(
        "accept",
        conv.choice("accept", "reject"),
        "permerror: accept (headers only) or reject (550 5.7.24).",
    )
    temperror_action: str = opt(
        "defer",
        conv.choice("defer", "accept"),
        "temperror: defer (451 4.4.3) until the give-up rule, or accept at once.",
    )
    temperror_max_defers: int = opt(
        3,
        conv.integer,
        ("Give-up rule: accept once one (client IP, sender) was deferred this many times."),
    )
    temperror_max_time: float = opt(
        3600.0,
        conv.duration,
        "Give-up rule: accept once this long has passed since its first temperror.",
    )
    authserv_id: str = opt(
        "",
        conv.string,
        ("authserv-id of Authentication-Results (RFC 8601 section 2.5); empty: the host name."),
    )
    received_spf_header: bool = opt(
        True, conv.boolean, "Return a Received-SPF header for Exim to add at DATA."
    )
    authentication_results_header: bool = opt(
        True, conv.boolean, "Return an Authentication-Results header for Exim to add at DATA."
    )
    greylist_max_ipv4_prefix: int = opt(
        12,
        conv.prefix_length(32),
        (
            "Wide-open guard for greylisting keyed on an SPF-pass domain: a record "
            "authorising more addresses in total than one IPv4 /N keeps network keying."
        ),
    )
    greylist_max_ipv6_prefix: int = opt(
        32,
        conv.prefix_length(128),
        "The same guard for IPv6: more than one IPv6 /N keeps network keying.",
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus exporter (needs prometheus-client)."""

    enabled: bool = opt(
        True,
        conv.boolean,
        (
            "Serve Prometheus metrics (needs prometheus-client; without it they are off "
            "and a warning says so)."
        ),
    )
    listen: str = opt(
        "127.0.0.1:9477",
        conv.tcp_listen,
        (
            "The /metrics HTTP listener, host:port; port 0: any free port (logged). One "
            "that cannot bind is logged and skipped."
        ),
    )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the policyctl socket, separate from Exim's so Exim cannot administer."""

    socket: str = opt(
        str(DEFAULT_STATE_DIR / "policyd-admin.sock"),
        conv.string,
        (
            "The policyctl socket (empty: none), separate from Exim's so that Exim cannot"
            " administer; its directory is created as for server.socket."
        ),
    )
    socket_mode: int = opt(
        0o600, conv.file_mode, "Its octal mode; whoever may connect may change policy."
    )
    socket_group: str = opt(
        "", conv.string, 'Its group (e.g. "policyd" for admins, with socket_mode = "0660").'
    )


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


SECTIONS: Final[dict[str, type[Any]]] = {
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
        if name not in SECTIONS:
            raise ConfigError(f"[{name}]: unknown section")
        sections[name] = _section(SECTIONS[name], name, body)
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
        if name not in SECTIONS:
            raise ConfigError(f"[{name}]: unknown section")
        _section(SECTIONS[name], name, body)

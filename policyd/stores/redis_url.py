"""Redis store URLs: parse them, mask their secrets for logs, build the one client they name.

Forms (docs/redis.md), all options of one store class:

- ``redis://[user:pass@]host[:port][/db]`` — one server (``rediss://`` for TLS)
- ``unix://[user:pass@]/path/redis.sock[?db=N]`` — one server on a Unix socket
- ``redis+sentinel://[user:pass@]h1[:p1],h2[:p2]/service_name[/db]`` — Sentinel; the
  credentials are the data nodes'; ``?sentinel_password=…`` (and ``sentinel_username``)
  authenticate to the sentinels themselves
- ``redis+cluster://[user:pass@]h1[:p1],h2[:p2]`` — Cluster (seed nodes; db is always 0)
- ``rediss+sentinel://`` and ``rediss+cluster://`` — the same over TLS (for Sentinel, to the
  sentinels and to the data nodes alike)

Parsing needs nothing but the standard library (the config validator uses it); the client
library is imported only when a client is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, unquote

if TYPE_CHECKING:
    from ..config import StoreConfig

SCHEMES: Final = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
DEFAULT_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379
#: Query parameters a URL may carry.
QUERY_KEYS: Final = frozenset({"db", "sentinel_username", "sentinel_password"})
#: Connections one client keeps per server: the store's in-flight batches plus admin work.
MAX_CONNECTIONS: Final = 16
_HOST_RE: Final = re.compile(
    r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([^:\[\]]+)(?::([0-9]{1,5}))?"
)
_MASK: Final = "***"


class RedisURLError(ValueError):
    """A store URL that cannot be used; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a URL names. ``mode``: ``single``, ``sentinel`` or ``cluster``."""

    mode: str
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    unix_path: str = ""
    db: int = 0
    service: str = ""
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def _hosts(text: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for item in text.split(","):
        match = _HOST_RE.fullmatch(item.strip())
        if not match:
            raise RedisURLError(f"bad host {item!r} (host:port or [v6]:port)")
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4) or default_port)
        if not 0 < port < 65536:
            raise RedisURLError(f"bad port in {item!r}")
        out.append((host, port))
    return tuple(out)


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisURLError(f"database must be a number, got {text!r}")
    return int(text)


def parse_url(url: str) -> RedisTarget:
    """Split a Redis store URL into a RedisTarget; RedisURLError names the bad part."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise RedisURLError(f"scheme must be one of {', '.join(SCHEMES)}")
    rest, _, query_text = rest.partition("?")
    query = _query(query_text)
    userinfo, at, location = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    creds: dict[str, Any] = {
        "username": (unquote(user) or None) if at else None,
        "password": unquote(password) if colon else None,
        "sentinel_username": query.get("sentinel_username") or None,
        "sentinel_password": query.get("sentinel_password") or None,
    }
    db = _db(query["db"]) if "db" in query else 0
    if scheme == "unix":
        if not location.startswith("/"):
            raise RedisURLError("unix:// needs an absolute socket path (unix:///run/redis.sock)")
        return RedisTarget("single", False, unix_path=location, db=db, **creds)
    netloc, _, path = location.partition("/")
    if not netloc:
        raise RedisURLError("no host")
    segments = [s for s in path.split("/") if s]
    tls = scheme.startswith("rediss")
    if scheme.endswith("+sentinel"):
        return _sentinel(netloc, segments, tls, db, creds)
    return _direct(scheme, netloc, segments, tls=tls, db=db, creds=creds)


def _query(text: str) -> dict[str, str]:
    """The URL's parameters (the last of repeated ones); unknown ones are an error."""
    query = {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}
    unknown = set(query) - QUERY_KEYS
    if unknown:
        raise RedisURLError(f"unknown URL parameter(s) {', '.join(sorted(unknown))}")
    return query


def _sentinel(
    netloc: str, segments: list[str], tls: bool, db: int, creds: dict[str, Any]
) -> RedisTarget:
    """``redis+sentinel://h1:p1,h2:p2/service[/db]``."""
    if not segments or len(segments) > 2:
        raise RedisURLError("Sentinel URL needs /service_name[/db]")
    db = _db(segments[1]) if len(segments) == 2 else db
    hosts = _hosts(netloc, DEFAULT_SENTINEL_PORT)
    return RedisTarget("sentinel", tls, hosts, db=db, service=segments[0], **creds)


def _direct(
    scheme: str, netloc: str, segments: list[str], *, tls: bool, db: int, creds: dict[str, Any]
) -> RedisTarget:
    """One server (``redis://host[:port][/db]``) or a Cluster's seed nodes."""
    if len(segments) > 1:
        raise RedisURLError("path must be /db")
    db = _db(segments[0]) if segments else db
    hosts = _hosts(netloc, DEFAULT_PORT)
    if scheme.endswith("+cluster"):
        if db:
            raise RedisURLError("Redis Cluster has only database 0")
        return RedisTarget("cluster", tls, hosts, **creds)
    if len(hosts) > 1:
        raise RedisURLError("several hosts need redis+sentinel:// or redis+cluster://")
    return RedisTarget("single", tls, hosts, db=db, **creds)


def mask_url(url: str) -> str:
    """The URL with its passwords replaced by ``***``: the only form that may be logged."""
    scheme, sep, rest = url.partition("://")
    rest, qmark, query = rest.partition("?")
    userinfo, at, location = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + _MASK
    masked_query = "&".join(
        f"{part.split('=', 1)[0]}={_MASK}" if "password" in part.split("=", 1)[0] else part
        for part in query.split("&")
        if part
    )
    return f"{scheme}{sep}{userinfo}{at}{location}{qmark}{masked_query}"


def build_client(target: RedisTarget, config: StoreConfig) -> Any:
    """The redis-py asyncio client for ``target``: ``Redis`` (one server or Sentinel's
    master) or ``RedisCluster``. No retries inside the client: a failure is reported at
    once and the store's circuit breaker decides what happens next."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "max_connections": MAX_CONNECTIONS,
    }
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {
            "ssl": True,
            "ssl_ca_certs": config.tls_ca_file or None,
            "ssl_certfile": config.tls_cert_file or None,
            "ssl_keyfile": config.tls_key_file or None,
        }
    if target.mode == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        return RedisCluster(startup_nodes=nodes, **common, **tls)
    if target.mode == "sentinel":
        sentinel = Sentinel(
            list(target.hosts),
            sentinel_kwargs={
                "username": target.sentinel_username,
                "password": target.sentinel_password,
                "socket_timeout": config.timeout,
                "socket_connect_timeout": config.timeout,
                "retry": Retry(NoBackoff(), 0),
                **tls,
            },
        )
        # ssl=True makes redis-py's sentinel pool use its SentinelManagedSSLConnection.
        return sentinel.master_for(target.service, redis_class=Redis, db=target.db, **common, **tls)
    if target.unix_path:
        return Redis(unix_socket_path=target.unix_path, db=target.db, **common)
    host, port = target.hosts[0]
    return Redis(host=host, port=port, db=target.db, **common, **tls)

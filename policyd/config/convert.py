"""Converters for configuration values: each takes the raw TOML value and the dotted key,
returns the typed value, or raises ConfigError naming the key. Used by ``config``'s
dataclass fields through ``opt(default, converter)``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Final

from ..model import IPNetwork

#: Relative to the working directory: the default works for a non-root user in a checkout.
DEFAULT_STATE_DIR: Final = Path("var")
_DURATION_RE: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*")
_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
#: Longest duration any key accepts (10 years): far beyond every sensible retry window or
#: rate period, and it keeps Redis TTLs (signed 64-bit milliseconds) and loop timers exact.
MAX_DURATION: Final = 10 * 365 * 86400.0
#: Highest TCP/UDP port number (RFC 793: a 16-bit field).
MAX_PORT: Final = 65535


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
    # TOML has nan and inf; a NaN delay compares false with everything and turns a check
    # off silently, so non-finite values are refused here, once, for every duration.
    if not math.isfinite(seconds):
        raise ConfigError(f"{key}: expected a finite number of seconds, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{key}: must not be negative")
    if seconds > MAX_DURATION:
        raise ConfigError(f"{key}: at most {MAX_DURATION:.0f} seconds (10 years)")
    return seconds


def integer(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if value < 0:
        raise ConfigError(f"{key}: must not be negative")
    return value


def boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def file_mode(value: object, key: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ConfigError(f"{key}: expected an octal mode string like '0660'")


def string_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings")
    return tuple(value)


def networks(value: object, key: str) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for item in string_list(value, key):
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not an IP address or CIDR") from None
    return tuple(out)


def choice(*allowed: str) -> Callable[[object, str], str]:
    def conv(value: object, key: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}; got {value!r}")
        return str(value)

    return conv


def _port(text: str, key: str) -> None:
    if int(text) > MAX_PORT:
        raise ConfigError(f"{key}: port {text} is out of range (0-{MAX_PORT})")


def tcp_listen(value: object, key: str) -> str:
    text = string(value, key)
    if not text:
        return text
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[0-9.]+|localhost):[0-9]{1,5}", text):
        raise ConfigError(f"{key}: expected 'host:port' (e.g. '127.0.0.1:10031'), got {text!r}")
    host, _, port = text.rpartition(":")
    if host != "localhost":
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ConfigError(f"{key}: {host!r} is not an IP address") from None
    _port(port, key)
    return text


def store_url(value: object, key: str) -> str:
    text = string(value, key)
    # standard library only, imported when a config is loaded
    from ..stores.redis_url import SCHEMES, parse_url

    scheme, sep, rest = text.partition("://")
    if not sep or (scheme != "sqlite" and scheme not in SCHEMES):
        raise ConfigError(f"{key}: unsupported store URL {text.split('://')[0]!r}")
    if scheme == "sqlite" and (not rest or rest.endswith("/")):
        raise ConfigError(
            f"{key}: {text!r} names no database file "
            "(e.g. 'sqlite:///var/lib/policyd/policyd.sqlite3')"
        )
    if scheme != "sqlite":
        try:
            parse_url(text)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return text


def prefix_length(limit: int) -> Callable[[object, str], int]:
    def conv(value: object, key: str) -> int:
        number = integer(value, key)
        if number > limit:
            raise ConfigError(f"{key}: a prefix length is at most {limit}")
        return number

    return conv


def positive(value: object, key: str) -> int:
    number = integer(value, key)
    if number == 0:
        raise ConfigError(f"{key}: must be at least 1")
    return number


def duration(value: object, key: str) -> float:
    return parse_duration(value, key)


def positive_duration(value: object, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be longer than 0")
    return seconds


def hash_secret(value: object, key: str) -> str:
    text = string(value, key)
    if text and len(text.encode()) < 16:  # stores.keys.MIN_SECRET_BYTES
        raise ConfigError(f'{key}: at least 16 bytes, or "" for no hashing')
    return text


def redis_prefix(value: object, key: str) -> str:
    text = string(value, key)
    # Braces would move the hash tag; glob characters would break admin scans.
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text):
        raise ConfigError(f"{key}: 1-64 characters from A-Z a-z 0-9 _ . : - expected")
    return text


def opt(default: Any, conv: Callable[[object, str], Any], doc: str = "") -> Any:
    """A config field with its default, its converter and its description: the one text
    policyd.toml(5) shows for the key (``policyd.manpages``; a test wants it for every key)."""
    return field(default=default, metadata={"conv": conv, "doc": doc})


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


def rate(value: object, key: str) -> tuple[int, float]:
    return parse_rate(value, key)


def key_parts(value: object, key: str) -> tuple[str, ...]:
    parts = (value,) if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or not parts:
        raise ConfigError(f"{key}: expected a key part or a list of them")
    for part in parts:
        if part not in RATE_KEY_PARTS:
            raise ConfigError(f"{key}: {part!r} is not one of {', '.join(RATE_KEY_PARTS)}")
    return tuple(str(p) for p in parts)


def lower_list(value: object, key: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in string_list(value, key))


_NAMESERVER_RE: Final = re.compile(
    r"\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?|[0-9.]+(:[0-9]{1,5})?|[0-9a-fA-F:]+"
)


def nameservers(value: object, key: str) -> tuple[str, ...]:
    """DNS servers as c-ares takes them: ``127.0.0.1``, ``127.0.0.1:5353``, ``[::1]:5353``."""
    out = tuple(v.strip() for v in string_list(value, key))
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
        if entry.count(":") == 1 or entry.startswith("["):
            port = entry.rpartition(":")[2]
            if port.isdigit():
                _port(port, key)
    return out

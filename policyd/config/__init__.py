"""The configuration: its schema (typed, frozen sections read once from TOML; ``schema``),
the converters that check each value (``convert``), where the file is found (``files``) and
the checks of the machine made before the first question (``preflight``)."""

from __future__ import annotations

from .convert import RATE_KEY_PARTS, ConfigError, parse_duration, parse_rate
from .schema import (
    SECTIONS,
    AdminConfig,
    Config,
    GreylistConfig,
    MetricsConfig,
    RatelimitConfig,
    RateRule,
    ServerConfig,
    SpfConfig,
    StoreConfig,
    drop_ins,
    from_mapping,
    load,
)

__all__ = [
    "RATE_KEY_PARTS",
    "SECTIONS",
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
    "drop_ins",
    "from_mapping",
    "load",
    "parse_duration",
    "parse_rate",
]

"""Every Prometheus metric, defined once, named ``policyd_*``.

prometheus-client is optional: without it (or with ``[metrics] enabled = false``) every
method still exists and does nothing, so the hot path never tests for it. Label values come
from bounded sets (stages, checks, reasons, configured rule names), never from mail data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Final

logger = logging.getLogger(__name__)

#: Latency buckets (seconds) around the budget: a question takes ~0.1 ms, the deadline is 1 s.
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
#: Greylist delay actually imposed (first attempt → pass): minutes to days.
DELAY_BUCKETS: Final = (
    60,
    300,
    600,
    900,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    8 * 3600,
    86400,
    2 * 86400,
)
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> float:
    """Resident set size of this process, from /proc (0 where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return float(int(handle.read().split()[1]) * _PAGE_SIZE)
    except (OSError, ValueError, IndexError):
        return 0.0


class _Null:
    """Stands in for any metric or child when metrics are off."""

    def labels(self, *_: object, **__: object) -> _Null:
        return self

    def inc(self, *_: object) -> None: ...

    def observe(self, *_: object) -> None: ...

    def set(self, *_: object) -> None: ...

    def set_function(self, *_: object) -> None: ...


class Metrics:
    """The daemon's metrics; a private registry so tests can run several daemons."""

    def __init__(self, enabled: bool = True) -> None:
        self.registry: Any = None
        self._http: Any = None
        prom: Any = None
        if enabled:
            try:
                import prometheus_client as prom
            except ImportError:
                logger.warning("prometheus-client is not installed; metrics are off")
        if prom is None:
            null = _Null()
            for name in self._NAMES:
                setattr(self, name, null)
            return
        self.registry = registry = prom.CollectorRegistry()

        def metric(
            kind: Callable[..., Any], name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any
        ) -> Any:
            return kind(f"policyd_{name}", doc, labels, registry=registry, **kw)

        c, g, h = prom.Counter, prom.Gauge, prom.Histogram
        self.questions = metric(c, "questions", "Questions answered, by stage", ("stage",))
        self.latency = metric(
            h,
            "question_seconds",
            "Time to decide a question, by stage",
            ("stage",),
            buckets=LATENCY_BUCKETS,
        )
        self.decisions = metric(
            c, "decisions", "Decisions by check, reason and action", ("check", "reason", "action")
        )
        self.bad_requests = metric(c, "bad_requests", "Requests that could not be parsed")
        self.fallbacks = metric(c, "fallbacks", "Fallback answers by cause", ("cause",))
        self.greylist_delay = metric(
            h,
            "greylist_delay_seconds",
            "Delay imposed by greylisting, first attempt to pass",
            buckets=DELAY_BUCKETS,
        )
        self.greylist_unretried = metric(
            c, "greylist_expired_unretried", "Greylisted triplets that expired without a retry"
        )
        self.store_seconds = metric(
            h, "store_seconds", "Store operation latency", ("operation",), buckets=LATENCY_BUCKETS
        )
        self.store_errors = metric(
            c, "store_errors", "Store operations that failed", ("operation",)
        )
        self.ratelimit = metric(
            c,
            "ratelimit_decisions",
            "Rate-limit decisions per rule: allowed, limited, would_limit",
            ("rule", "result"),
        )
        self.ratelimit_fill = metric(
            g,
            "ratelimit_peak_fill",
            "Highest burst fill of any key of the rule (0..1) since the last scrape",
            ("rule",),
        )
        self.spf = metric(c, "spf_results", "SPF results by identity", ("identity", "result"))
        self.open_connections = metric(g, "open_connections", "Connections open now")
        self.rss = metric(g, "process_rss_bytes", "Resident memory of the daemon")
        self.rss.set_function(rss_bytes)
        self.auto_whitelisted = metric(
            g, "greylist_auto_whitelisted", "Clients auto-whitelisted now (store statistics)"
        )
        self.never_retried = metric(
            g, "greylist_never_retried_ratio", "Share of expired greylisted triplets never retried"
        )

    _NAMES: Final = (
        "questions",
        "latency",
        "decisions",
        "bad_requests",
        "fallbacks",
        "greylist_delay",
        "greylist_unretried",
        "store_seconds",
        "store_errors",
        "ratelimit",
        "ratelimit_fill",
        "spf",
        "open_connections",
        "rss",
        "auto_whitelisted",
        "never_retried",
    )

    def serve(self, listen: str) -> int | None:
        """Start the HTTP exporter on ``host:port``; returns the bound port, or None."""
        if self.registry is None or not listen:
            return None
        import prometheus_client as prom

        host, _, port = listen.rpartition(":")
        try:
            server, _thread = prom.start_http_server(
                int(port), host.strip("[]"), registry=self.registry
            )
        except OSError as exc:
            logger.error("metrics listener %s not started: %s", listen, exc)
            return None
        self._http = server
        bound = int(server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

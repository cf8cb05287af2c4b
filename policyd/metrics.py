"""Every Prometheus metric, defined once, named ``policyd_*``.

Counters and histograms touched by every question are plain Python numbers exported by a
collector at scrape time (prometheus-client's own take a lock per operation: 13 % of the
throughput at 16 askers, measured with bench/variants.py; now ~1 %). Gauges read at scrape
time use prometheus-client's ``Gauge.set_function``.

prometheus-client is optional: without it (or with ``[metrics] enabled = false``) every
method still exists and does nothing, so the hot path never tests for it. Label values come
from bounded sets (stages, checks, reasons, configured rule names), never from mail data.
"""

from __future__ import annotations

import bisect
import logging
import math
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


class _CounterChild:
    """A counter value; a plain float add (the event loop is the only writer)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    """Bucket counts and a sum; observe() is one bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1


class _Family:
    """A counter or histogram family on the question path, without prometheus-client's
    per-operation lock (the event loop is the only writer; a scrape reads a snapshot that
    may miss the question in progress). Exported by ``_Exporter`` at scrape time."""

    def __init__(
        self, name: str, doc: str, labelnames: tuple[str, ...], buckets: tuple[float, ...] = ()
    ) -> None:
        self.name, self.doc, self.labelnames, self.buckets = name, doc, labelnames, buckets
        self.children: dict[tuple[str, ...], Any] = {}
        if not labelnames:
            self.children[()] = self._new()

    def _new(self) -> _CounterChild | _HistogramChild:
        return _HistogramChild(self.buckets) if self.buckets else _CounterChild()

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self._new()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.children[()].inc(amount)

    def observe(self, amount: float) -> None:
        self.children[()].observe(amount)


class _Exporter:
    """A prometheus-client collector over the ``_Family`` objects."""

    def __init__(self) -> None:
        self.families: list[_Family] = []

    def collect(self) -> Any:
        from prometheus_client import metrics_core as core

        for family in self.families:
            labels = list(family.labelnames)
            children = list(family.children.items())
            if family.buckets:
                histogram = core.HistogramMetricFamily(family.name, family.doc, labels=labels)
                for values, child in children:
                    cumulative, buckets = 0, []
                    for bound, count in zip((*family.buckets, math.inf), child.counts, strict=True):
                        cumulative += count
                        buckets.append((_go_float(bound), cumulative))
                    histogram.add_metric(list(values), buckets, child.sum)
                yield histogram
            else:
                counter = core.CounterMetricFamily(family.name, family.doc, labels=labels)
                for values, child in children:
                    counter.add_metric(list(values), child.value)
                yield counter


def _go_float(value: float) -> str:
    """The ``le`` label as Prometheus writes it (``+Inf``, ``0.5``, ``60.0``)."""
    return "+Inf" if math.isinf(value) else repr(float(value))


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
        exporter = _Exporter()
        registry.register(exporter)

        def metric(
            kind: Callable[..., Any], name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any
        ) -> Any:
            return kind(f"policyd_{name}", doc, labels, registry=registry, **kw)

        def counter(name: str, doc: str, labels: tuple[str, ...] = (), **_: Any) -> _Family:
            family = _Family(name, doc, labels)
            exporter.families.append(family)
            return family

        def histogram(
            name: str,
            doc: str,
            labels: tuple[str, ...] = (),
            *,
            buckets: tuple[float, ...],
            **_: Any,
        ) -> _Family:
            family = _Family(name, doc, labels, tuple(sorted(buckets)))
            exporter.families.append(family)
            return family

        c, g, h = counter, prom.Gauge, histogram
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

"""contrib/grafana/policyd.json: valid JSON, every query names a metric the daemon exports,
and every exported metric is on the dashboard."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policyd.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "policyd.json"
METRIC_NAME = re.compile(r"\bpolicyd_[a-zA-Z0-9_]+")
#: Sample-name suffixes the Prometheus exposition adds per metric type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}
#: Exported but deliberately not charted, with the reason.
NOT_CHARTED = {
    # Nothing increments it yet; the never-retried ratio gauge carries the same fact.
    "policyd_greylist_expired_unretried",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def exported() -> dict[str, str]:
    """Sample name → family name, for every metric the Metrics class registers."""
    metrics = Metrics(enabled=True)
    if metrics.registry is None:
        pytest.skip("prometheus-client is not installed")
    names: dict[str, str] = {}
    for family in metrics.registry.collect():
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
    return names


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)  # collapsed rows keep their panels inside


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"${variable['name']}", variable["definition"]


def test_every_query_names_an_exported_metric(dashboard: dict[str, Any]) -> None:
    names = exported()
    found = list(queries(dashboard))
    assert len(found) >= 15
    for where, expr in found:
        used = METRIC_NAME.findall(expr)
        assert used, f"{where}: no policyd metric in {expr!r}"
        unknown = [name for name in used if name not in names]
        assert not unknown, f"{where}: {unknown} not exported by policyd.metrics"


def test_every_exported_metric_is_charted(dashboard: dict[str, Any]) -> None:
    names = exported()
    charted = {names[n] for _, expr in queries(dashboard) for n in METRIC_NAME.findall(expr)}
    missing = set(names.values()) - charted - NOT_CHARTED
    assert not missing, f"metrics not on the dashboard: {sorted(missing)}"
    assert not NOT_CHARTED & charted, "charted now: remove it from NOT_CHARTED"


def test_queries_are_well_formed(dashboard: dict[str, Any]) -> None:
    for where, expr in queries(dashboard):
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), f"{where}: unbalanced {expr!r}"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "le" in expr, f"{where}: quantile needs le buckets"
        if "_total" in expr and not expr.startswith("label_values("):
            assert "rate(" in expr or "increase(" in expr, f"{where}: a counter needs rate()"


def test_panels_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = []
    for panel in panels(dashboard):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], panel["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"] == "policyd"

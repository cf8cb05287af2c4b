"""bench/run.py's analysis and summary: medians over rounds, paired ratios with 95 %
bootstrap intervals (bench/stats.py), the per-question targets and their verdicts, and the
markdown summary. Pure functions of the rounds' rows; no I/O.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers
import stats
from lineup import REDIS_TARGET

Rows = list[dict[str, object]]

MEDIAN_KEYS = (
    "qps",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "cpu_us_per_q",
    "store_cpu_us_per_q",
    "disk_written_kib",
)
PACED_KEYS = ("p50_us", "p90_us", "p99_us")
PEER = "greylistd"
#: The per-question targets (issue 18): which figure, which rows, the limit.
QPS16_SQLITE = stats.Target(
    "q/s at 16 askers, policyd (SQLite) ÷ greylistd", 0.6, at_most=False, unit="×"
)
P99_1_SQLITE = stats.Target(
    "p99 at 1 asker, policyd (SQLite) ÷ greylistd", 2.0, at_most=True, unit="×"
)
QPS16_REDIS = stats.Target(
    f"q/s at 16 askers, {REDIS_TARGET} ÷ greylistd", 0.75, at_most=False, unit="×"
)
PACED_P50 = stats.Target(
    "paced questions 5 ms apart, p50, policyd ÷ floor", 1.5, at_most=True, unit="×"
)


def column(rows: Rows, key: str) -> list[float | None]:
    """One figure of every round, None where a round has none."""
    return [None if r.get(key) is None else float(r[key]) for r in rows]  # type: ignore[arg-type]


def medians(rows: Rows, keys: tuple[str, ...] = MEDIAN_KEYS) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in keys:
        m = stats.median([v for v in column(rows, key) if v is not None])
        out[key] = None if m is None else round(m, 1)
    return out


def totals(rows: Rows, key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        for k, v in r[key].items():  # type: ignore[attr-defined]
            out[k] = out.get(k, 0) + v
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _paired(a: Rows, b: Rows, key: str) -> dict[str, float | int] | None:
    est = stats.paired_ratio(column(a, key), column(b, key))
    return est.to_dict() if est else None


def compare(a: Rows, b: Rows) -> dict[str, object]:
    """``a`` ÷ ``b``: ratios of the medians, and for q/s and p99 the median of the paired
    per-round ratios with its 95 % interval (q/s: higher is better for ``a``; p50, p99,
    CPU/q: lower is)."""
    ma, mb = medians(a), medians(b)
    return {
        "qps": _ratio(ma["qps"], mb["qps"]),
        "qps_paired": _paired(a, b, "qps"),
        "p50": _ratio(ma["p50_us"], mb["p50_us"]),
        "p99": _ratio(ma["p99_us"], mb["p99_us"]),
        "p99_paired": _paired(a, b, "p99_us"),
        "cpu_per_q": _ratio(ma["cpu_us_per_q"], mb["cpu_us_per_q"]),
    }


def analyse_concurrency(rows: dict[str, Rows], daemons: list[str]) -> dict[str, object]:
    """One concurrency: medians per target, every target ÷ the floor, each daemon ÷ each
    peer (``vs_peers[daemon][peer]``)."""
    entry: dict[str, object] = {
        name: {"median": medians(rs), "rounds": rs} for name, rs in rows.items()
    }
    entry["to_floor"] = {
        name: compare(rs, rows["floor"]) for name, rs in rows.items() if name != "floor"
    }
    peers = [n for n in rows if n != "floor" and n not in daemons and n != REDIS_TARGET]
    entry["vs_peers"] = {
        d: {p: compare(rows[d], rows[p]) for p in peers} for d in daemons if d in rows
    }
    return entry


def analyse_paced(rows: dict[str, Rows]) -> dict[str, object]:
    """Paced rounds: medians per target and each target's p50 ÷ the floor's, paired."""
    out: dict[str, object] = {
        name: {"median": medians(rs, PACED_KEYS), "rounds": rs} for name, rs in rows.items()
    }
    if "floor" in rows:
        out["to_floor"] = {
            name: {"p50_paired": _paired(rs, rows["floor"], "p50_us")}
            for name, rs in rows.items()
            if name != "floor"
        }
    return out


def _estimate(
    rows: dict[str, dict[str, Rows]], where: str, a: str, b: str, key: str
) -> stats.Estimate | None:
    per = rows.get(where, {})
    if a not in per or b not in per:
        return None
    return stats.paired_ratio(column(per[a], key), column(per[b], key))


def judge_targets(
    closed: dict[str, dict[str, Rows]], paced: dict[str, Rows], name_b: str
) -> list[dict[str, object]]:
    """The per-question targets with their paired estimates and verdicts."""
    paced_by = {"paced": paced}
    checks: list[tuple[stats.Target, Callable[[], stats.Estimate | None]]] = [
        (QPS16_SQLITE, lambda: _estimate(closed, "16", name_b, PEER, "qps")),
        (P99_1_SQLITE, lambda: _estimate(closed, "1", name_b, PEER, "p99_us")),
        (QPS16_REDIS, lambda: _estimate(closed, "16", REDIS_TARGET, PEER, "qps")),
        (PACED_P50, lambda: _estimate(paced_by, "paced", name_b, "floor", "p50_us")),
    ]
    return [target.judge(get()) for target, get in checks]


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: object, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _est(d: object, spec: str = ".2f") -> str:
    """An estimate dict as ``1.23 [1.10, 1.31]``."""
    if not isinstance(d, dict):
        return "n/a"
    return f"{d['value']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}]"


def _interpreters(meta: dict) -> str:
    """Which Python ran the servers and the clients."""
    server, client = meta["server_python"], meta["client_python"]
    if server == client:
        return f"servers and clients on Python {servers.describe(server)}"
    return (
        f"servers on Python {servers.describe(server)}, clients on Python "
        f"{servers.describe(client)}"
    )


def _header(meta: dict) -> list[str]:
    paced = (
        f"; then {meta['paced_rounds']} paired rounds of {meta['paced_count']} questions "
        f"{meta['paced_gap_ms']:g} ms apart, one asker"
        if meta.get("paced_rounds")
        else ""
    )
    return [
        f"# bench/run.py — {meta['mode']} mode",
        "",
        f"{meta['date']}, git {meta['git']}, {meta['cpus']} CPUs (shared: other tenants' "
        f"load shows up in every figure); {_interpreters(meta)}; policyd configured with "
        f"{meta['policyd_config']}; client engine `{meta['engine']}`, {meta['rounds']} "
        f"rounds × {meta['duration_s']} s per concurrency, targets in rotating order "
        f"({', '.join(meta['targets'])}){paced}; work directory on {meta['workdir_fs']}. "
        "Medians over rounds; ratios are medians of the per-round (paired) ratios with "
        "their 95 % bootstrap interval in brackets. CPU/q = server CPU per question (µs). "
        "Connection per question unless labelled persistent.",
        "",
    ]


def _concurrency_md(c: str, entry: dict, targets: list[str]) -> list[str]:
    lines = [
        f"## {c} asker{'s' if c != '1' else ''}",
        "",
        "| target | q/s | q/s ÷ floor | p50 / p99 / p99.9 µs | CPU/q µs | disk writeback KiB |",
        "|---|---|---|---|---|---|",
    ]
    for name in targets:
        if name not in entry:
            continue
        m = entry[name]["median"]
        ratio = "—" if name == "floor" else _est(entry["to_floor"][name]["qps_paired"])
        lines.append(
            f"| {name} | {_fmt(m['qps'], ',.0f')} | {ratio} "
            f"| {_fmt(m['p50_us'])} / {_fmt(m['p99_us'])} / {_fmt(m['p999_us'])} "
            f"| {_fmt(m['cpu_us_per_q'], '.1f')} | {_fmt(m['disk_written_kib'], ',.0f')} |"
        )
    rows = [(d, p, r) for d, per in entry["vs_peers"].items() for p, r in per.items()]
    if rows:
        lines += [
            "",
            "| daemon ÷ peer | q/s | p50 | p99 | CPU/q |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {d} ÷ {p} | {_est(r['qps_paired'])} | {_fmt(r['p50'], '.2f')} "
            f"| {_est(r['p99_paired'])} | {_fmt(r['cpu_per_q'], '.2f')} |"
            for d, p, r in rows
        ]
    return [*lines, ""]


def _paced_md(paced: dict, gap_ms: float) -> list[str]:
    lines = [
        f"## Paced: one asker, questions {gap_ms:g} ms apart",
        "",
        "| target | p50 / p90 / p99 µs | p50 ÷ floor |",
        "|---|---|---|",
    ]
    to_floor = paced.get("to_floor", {})
    for name, entry in paced.items():
        if name == "to_floor":
            continue
        m = entry["median"]
        ratio = "—" if name == "floor" else _est(to_floor.get(name, {}).get("p50_paired"))
        lines.append(
            f"| {name} | {_fmt(m['p50_us'])} / {_fmt(m['p90_us'])} / {_fmt(m['p99_us'])} "
            f"| {ratio} |"
        )
    return [*lines, ""]


def _redis_md(report: dict) -> list[str]:
    """The policyd-redis lines: RSS of the daemon, the redis-server's CPU/q and RSS."""
    info = report.get("redis") or {}
    if info.get("status") != "measured":
        return [f"{REDIS_TARGET}: **{info.get('note', 'not measured')}**"] if info else []
    mem, rmem = info.get("memory_kib", {}), info.get("redis_server_memory_kib", {})
    per_c = ", ".join(
        f"c={c} {_fmt(entry[REDIS_TARGET]['median'].get('store_cpu_us_per_q'), '.1f')} µs"
        for c, entry in report["results"].items()
        if REDIS_TARGET in entry
    )
    return [
        f"{REDIS_TARGET} (redis-server {info.get('version')}, Unix socket, no persistence): "
        f"daemon RSS at the end {mem.get('VmRSS', 0) / 1024:.1f} MiB "
        f"(peak {mem.get('VmHWM', 0) / 1024:.1f} MiB); redis-server CPU/q (not in the "
        f"table's CPU/q) {per_c}; redis-server RSS {rmem.get('VmRSS', 0) / 1024:.1f} MiB; "
        f"answers {info.get('answers')}; errors {info.get('errors') or 'none'}.",
    ]


def _peers_md(report: dict) -> list[str]:
    lines = []
    for name, info in (report.get("peers") or {}).items():
        if info.get("status") == "measured":
            rss = info.get("memory_kib", {}).get("VmRSS", 0) / 1024
            lines.append(
                f"- {name} {info.get('version')}: RSS {rss:.1f} MiB; answers "
                f"{info.get('answers')}; errors {info.get('errors') or 'none'}"
            )
        else:
            lines.append(f"- {name}: **{info.get('note')}**")
    return ["Peers:", "", *lines] if lines else []


def _profile_md(report: dict) -> list[str]:
    prof = report.get("profile")
    if not prof or "self_pct" not in prof:
        return []
    return [
        "",
        f"py-spy of {prof['target']}, {prof['samples']} samples at c=16, most self time:",
        "",
        *(f"- {pct}% {name}" for name, pct in prof["self_pct"][:12]),
    ]


def summary_markdown(report: dict) -> str:
    meta = report["meta"]
    b = meta["target_b"]
    lines = [*_header(meta), "## Targets", "", *stats.targets_markdown(report["targets"]), ""]
    for c, entry in report["results"].items():
        lines += _concurrency_md(c, entry, meta["targets"])
    if report.get("paced"):
        lines += _paced_md(report["paced"], meta["paced_gap_ms"])
    mem = report["memory_kib"]
    lines += [
        f"{b} RSS at the end: {mem.get('VmRSS', 0) / 1024:.1f} MiB "
        f"(peak {mem.get('VmHWM', 0) / 1024:.1f} MiB, {mem.get('Threads', '?')} threads); "
        f"answers {report['answers']}; errors {report['errors'] or 'none'}.",
        "",
        *_redis_md(report),
        "",
        *_peers_md(report),
        *_profile_md(report),
    ]
    return "\n".join(lines) + "\n"

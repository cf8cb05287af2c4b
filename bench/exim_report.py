"""bench/exim_msg.py's analysis and summary: medians per configuration, the time each
configuration adds per message over no check (paired by round, 95 % bootstrap intervals,
bench/stats.py), the per-message targets with a verdict each, and the markdown summary.
Pure functions of the batches' rows; no I/O.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stats

Rows = list[dict[str, object]]

MEDIAN_KEYS = (
    "smtp_ms_p50",
    "smtp_ms_mean",
    "deliver_ms_p50",
    "total_ms_p50",
    "attempts_mean",
    "cpu_ms_per_msg",
    "exim_cpu_ms_per_msg",
    "policy_cpu_ms_per_msg",
    "msgs_per_s",
)
BASE = "nocheck"
#: The per-message targets (issue 18): steady state, through real Exim, added SMTP time per
#: message of one configuration minus another's, paired by round.
TARGETS = (
    (stats.Target("added SMTP ms per message, policyd − greylistd", 1.0, True, " ms"),
     "policyd", "greylistd"),
    (stats.Target("added SMTP ms per message, floor behind our fragments − greylistd", 0.5,
                  True, " ms"), "floor", "greylistd"),
)  # fmt: skip


def column(rows: Rows, key: str) -> list[float | None]:
    return [None if r.get(key) is None else float(r[key]) for r in rows]  # type: ignore[arg-type]


def medians(rows: Rows) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in MEDIAN_KEYS:
        m = stats.median([v for v in column(rows, key) if v is not None])
        out[key] = None if m is None else round(m, 2)
    return out


def _difference(a: Rows, b: Rows, key: str) -> dict[str, float | int] | None:
    est = stats.paired_difference(column(a, key), column(b, key))
    return est.to_dict() if est else None


def analyse_phase(rows: dict[str, Rows]) -> dict[str, object]:
    """Medians per configuration and, for each one that asks, what it adds per message over
    no check: SMTP ms and CPU ms, medians of the paired per-round differences."""
    out: dict[str, object] = {k: {"median": medians(rs), "rounds": rs} for k, rs in rows.items()}
    if BASE in rows:
        out["added_over_nocheck"] = {
            k: {
                "smtp_ms": _difference(rs, rows[BASE], "smtp_ms_p50"),
                "cpu_ms_per_msg": _difference(rs, rows[BASE], "cpu_ms_per_msg"),
            }
            for k, rs in rows.items()
            if k != BASE
        }
    return out


def judge_targets(steady: dict[str, Rows]) -> list[dict[str, object]]:
    """policyd − greylistd and floor − greylistd, paired by round, against their limits.
    (The difference of the two added times over no check is the difference of the SMTP
    times: the no-check round cancels.)"""
    out = []
    for target, a, b in TARGETS:
        est = None
        if a in steady and b in steady:
            est = stats.paired_difference(
                column(steady[a], "smtp_ms_p50"), column(steady[b], "smtp_ms_p50")
            )
        out.append(target.judge(est))
    return out


def headline(steady: dict[str, object]) -> dict[str, float | None]:
    """What each configuration's questions add to the SMTP time, in % of Exim's own time
    per message (no-check SMTP time + accepted → delivered)."""
    base = steady[BASE]["median"]  # type: ignore[index]
    own = (base["smtp_ms_p50"] or 0) + (base["deliver_ms_p50"] or 0)
    out: dict[str, float | None] = {"exim_own_ms": round(own, 2)}
    for kind, added in steady.get("added_over_nocheck", {}).items():  # type: ignore[attr-defined]
        smtp = added["smtp_ms"]
        out[f"{kind}_added_pct"] = round(smtp["value"] / own * 100, 1) if smtp and own else None
    return out


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(v: object, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def _est(d: object, spec: str = ".2f") -> str:
    if not isinstance(d, dict):
        return "—"
    return f"{d['value']:+{spec}} [{d['low']:+{spec}}, {d['high']:+{spec}}]"


def _phase_md(title: str, res: dict, configs: list[str]) -> list[str]:
    added = res.get("added_over_nocheck", {})
    lines = [
        f"## {title}",
        "",
        "| config | SMTP ms | added SMTP ms vs no check | accepted→delivered ms | attempts "
        "| CPU ms/msg (Exim + policy server) | added CPU ms/msg | msgs/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in configs:
        m = res[kind]["median"]
        a = added.get(kind, {})
        lines.append(
            f"| {kind} | {_fmt(m['smtp_ms_p50'], '.2f')} | {_est(a.get('smtp_ms'))} "
            f"| {_fmt(m['deliver_ms_p50'])} | {_fmt(m['attempts_mean'], '.2f')} "
            f"| {_fmt(m['cpu_ms_per_msg'], '.2f')} ({_fmt(m['exim_cpu_ms_per_msg'], '.2f')} "
            f"+ {_fmt(m['policy_cpu_ms_per_msg'], '.2f')}) | {_est(a.get('cpu_ms_per_msg'))} "
            f"| {_fmt(m['msgs_per_s'])} |"
        )
    return [*lines, ""]


def summary_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# bench/exim_msg.py — {meta['mode']} mode",
        "",
        f"{meta['date']}, Exim {meta['exim_version']}, git {meta['git']}, {meta['cpus']} "
        "CPUs (shared: other tenants' load shows up in every figure). "
        f"{meta['steady_rounds']} steady-state rounds and {meta['greylist_rounds']} "
        f"greylisting rounds; in each, every configuration ({', '.join(meta['configs'])}; "
        "the order rotates) sends a batch of "
        f"{meta['messages']} messages × {meta['rcpts']} recipients from {meta['senders']} "
        "concurrent senders. Per batch the median over its messages; per configuration the "
        "median over rounds; differences are medians of the per-round (paired) differences "
        "with their 95 % bootstrap interval in brackets. SMTP = connect → answer to the end "
        "of DATA (or to the refused RCPTs), summed over a message's attempts; QUIT is sent "
        "without waiting for the reply, as Postfix does. `floor` = our fragments asking a "
        "server that answers `ok` at once.",
        "",
        "## Targets (steady state)",
        "",
        *stats.targets_markdown(report["targets"]),
        "",
    ]
    for phase, title in (
        ("steady", "Steady state (known triplets: every recipient asked, nothing deferred)"),
        ("greylist", "Greylisting with retries (new triplets; retry after 1.2 s, then 0.5 s)"),
    ):
        if report["results"].get(phase):
            lines += _phase_md(title, report["results"][phase], meta["configs"])
    h = report["headline"]
    shares = ", ".join(
        f"{k.removesuffix('_added_pct')} {_fmt(v)} %" for k, v in h.items() if k != "exim_own_ms"
    )
    lines.append(
        "Steady state, the SMTP time the questions add in % of Exim's own time per message "
        f"(no-check SMTP + accepted→delivered, {_fmt(h['exim_own_ms'], '.2f')} ms): {shares}."
    )
    for kind, note in report.get("skipped", {}).items():
        lines.append(f"\n{kind}: **{note}**")
    if any(report.get("fail_open", {}).values()):
        lines.append(f"\n**Questions without a usable answer (fail-open)**: {report['fail_open']}")
    if report.get("errors"):
        lines.append(f"\nErrors: {report['errors']}")
    return "\n".join(lines) + "\n"

"""bench/stats.py: paired figures, bootstrap intervals and target verdicts (the benches'
reports rest on them, and a wrong verdict would misreport a target)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import stats


def test_paired_figures_skip_rounds_without_both_sides() -> None:
    a = [2.0, None, 6.0, 8.0]
    b = [1.0, 3.0, 0.0, 4.0]
    assert stats.paired_ratios(a, b) == [2.0, 2.0]  # None and a zero divisor left out
    assert stats.paired_differences(a, b) == [1.0, 6.0, 4.0]


def test_bootstrap_interval_holds_the_median_and_is_reproducible() -> None:
    values = [1.0, 1.2, 0.9, 1.1, 1.3, 1.05, 0.95, 1.15]
    est = stats.bootstrap(values)
    assert est is not None
    assert est.value == pytest.approx(1.075)
    assert min(values) <= est.low <= est.value <= est.high <= max(values)
    assert stats.bootstrap(values) == est  # fixed seed: same rounds, same interval
    assert est.rounds == len(values)


def test_bootstrap_of_identical_rounds_has_no_width() -> None:
    est = stats.paired_difference([5.0] * 6, [4.0] * 6)
    assert est == stats.Estimate(1.0, 1.0, 1.0, 6)


def test_more_rounds_narrow_the_interval() -> None:
    few = stats.bootstrap([1.0, 3.0, 2.0, 4.0, 0.0])
    many = stats.bootstrap([1.0, 3.0, 2.0, 4.0, 0.0] * 8)
    assert few is not None and many is not None
    assert many.high - many.low < few.high - few.low


def test_nothing_to_estimate() -> None:
    assert stats.bootstrap([]) is None
    assert stats.paired_ratio([None], [1.0]) is None
    assert stats.median([]) is None


@pytest.mark.parametrize(
    ("low", "high", "at_most", "verdict"),
    [
        (0.2, 0.9, True, stats.MET),  # the whole interval under the limit
        (0.8, 1.4, True, stats.INCONCLUSIVE),  # straddles it
        (1.1, 1.4, True, stats.NOT_MET),  # all above
        (1.0, 1.4, False, stats.MET),  # at least: the limit itself is met
        (0.8, 1.4, False, stats.INCONCLUSIVE),
        (0.2, 0.9, False, stats.NOT_MET),
    ],
)
def test_verdict_reads_the_interval(low: float, high: float, at_most: bool, verdict: str) -> None:
    target = stats.Target("figure", 1.0, at_most)
    assert target.verdict(stats.Estimate((low + high) / 2, low, high, 8)) == verdict


def test_a_missing_figure_is_not_measured() -> None:
    row = stats.Target("q/s ratio", 0.6, at_most=False, unit="×").judge(None)
    assert row == {
        "target": "q/s ratio",
        "wanted": "≥ 0.6×",
        "estimate": None,
        "text": "n/a",
        "verdict": stats.NOT_MEASURED,
    }


def test_judged_row_and_table() -> None:
    row = stats.Target("p99 ratio", 2.0, at_most=True, unit="×").judge(
        stats.Estimate(2.5, 2.1, 3.0, 8)
    )
    assert row["text"] == "2.50 [2.10, 3.00]×"
    assert row["verdict"] == stats.NOT_MET
    table = stats.targets_markdown([row])
    assert table[-1] == "| p99 ratio | ≤ 2× | 2.50 [2.10, 3.00]× | **not met** |"

"""The benches' statistics: medians, paired rounds, bootstrap intervals, target verdicts.

A shared, noisy machine drifts between rounds (other tenants, page-cache writeback), so the
benches compare configurations *paired by round*: round ``i`` of A and round ``i`` of B run
back to back, and the figure quoted is the median over rounds of the per-round ratio (or
difference), which the drift affects least. Its 95 % interval comes from a percentile
bootstrap over the rounds (resample the pairs with replacement, take the median again), with
a fixed seed so that the same rounds give the same interval.

A target verdict reads the interval, not the point: ``met`` when the whole interval is on
the right side of the limit, ``not met`` when it is all on the wrong side, ``inconclusive``
when it straddles the limit (more rounds, or a quieter machine, would decide).

Used by run.py, exim_msg.py and ab.py; pure functions, no I/O.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

#: Bootstrap resamples: the interval's ends move by well under 1 % of its width from one
#: seed to another at this count (Efron & Tibshirani, "An Introduction to the Bootstrap",
#: ch. 13: 1,000-2,000 for percentile intervals).
RESAMPLES = 2000
#: Two-sided 95 % interval.
CONFIDENCE = 0.95
SEED = 1

MET, NOT_MET, INCONCLUSIVE, NOT_MEASURED = "met", "not met", "inconclusive", "not measured"


@dataclass(frozen=True)
class Estimate:
    """A paired figure: the median over rounds and its bootstrap interval."""

    value: float
    low: float
    high: float
    rounds: int

    def to_dict(self, digits: int = 3) -> dict[str, float | int]:
        return {
            k: (round(v, digits) if isinstance(v, float) else v) for k, v in asdict(self).items()
        }

    def text(self, spec: str = ".2f") -> str:
        """``1.23 [1.10, 1.31]`` (a single measurement: ``1.23``)."""
        if self.rounds == 1:
            return f"{self.value:{spec}}"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def median(values: Sequence[float]) -> float | None:
    """The median, or None when there is nothing to take it of."""
    return statistics.median(values) if values else None


def bootstrap(
    values: Sequence[float],
    statistic: Callable[[Sequence[float]], float] = statistics.median,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> Estimate | None:
    """``statistic`` of ``values`` and its percentile-bootstrap interval; None when empty."""
    if not values:
        return None
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(statistic(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = stats[int(tail * resamples)]
    high = stats[min(resamples - 1, int((1 - tail) * resamples))]
    return Estimate(float(statistic(values)), float(low), float(high), n)


def paired_ratios(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """a[i] / b[i] for the rounds where both exist and b[i] is not zero."""
    return [x / y for x, y in zip(a, b, strict=True) if x is not None and y]


def paired_differences(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """a[i] - b[i] for the rounds where both exist."""
    return [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]


def paired_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> Estimate | None:
    """Median over rounds of a÷b and its 95 % interval."""
    return bootstrap(paired_ratios(a, b))


def paired_difference(a: Sequence[float | None], b: Sequence[float | None]) -> Estimate | None:
    """Median over rounds of a−b and its 95 % interval."""
    return bootstrap(paired_differences(a, b))


@dataclass(frozen=True)
class Target:
    """A figure with a limit: ``at_most`` (value ≤ limit) or at least (value ≥ limit)."""

    name: str
    limit: float
    at_most: bool
    unit: str = ""

    @property
    def wanted(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.limit:g}{self.unit}"

    def verdict(self, estimate: Estimate | None) -> str:
        """met / not met / inconclusive (the interval straddles the limit) / not measured."""
        if estimate is None:
            return NOT_MEASURED
        good, bad = (
            (estimate.high <= self.limit, estimate.low > self.limit)
            if self.at_most
            else (estimate.low >= self.limit, estimate.high < self.limit)
        )
        return MET if good else NOT_MET if bad else INCONCLUSIVE

    def judge(self, estimate: Estimate | None, spec: str = ".2f") -> dict[str, object]:
        """The JSON row of a target: its limit, the estimate with interval, the verdict."""
        return {
            "target": self.name,
            "wanted": self.wanted,
            "estimate": estimate.to_dict() if estimate else None,
            "text": f"{estimate.text(spec)}{self.unit}" if estimate else "n/a",
            "verdict": self.verdict(estimate),
        }


def targets_markdown(
    rows: Sequence[dict[str, object]],
    measured: str = "measured: median of paired rounds [95 % interval]",
) -> list[str]:
    """The target table: figure, wanted, the estimate, verdict."""
    lines = [
        f"| target | wanted | {measured} | verdict |",
        "|---|---|---|---|",
    ]
    for row in rows:
        verdict = f"**{row['verdict']}**" if row["verdict"] != MET else str(row["verdict"])
        lines.append(f"| {row['target']} | {row['wanted']} | {row['text']} | {verdict} |")
    return lines

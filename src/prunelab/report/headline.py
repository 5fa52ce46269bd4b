"""The headline: how far each method prunes each model within a tolerated loss, and what that buys.

The rule (also printed in the report, `RULE`):

* Every benchmark value carries its 95 % interval (`report.intervals`); dense has one too.
* A sparsity is **within t** of dense when the pessimistic end of its interval — the lower end
  for higher-is-better metrics, the upper end for lower-is-better ones — is no more than
  t·|dense| worse than dense's point estimate d: low ≥ d − t·|d|, or high ≤ d + t·|d|. The
  loss is demonstrated to be at most t, not just estimated to be.
* A sparsity is **not distinguishable from dense** when its interval overlaps dense's interval:
  the data cannot tell the two apart, whatever the point estimates say.
* A method **reaches** sparsity s at tolerance t when s and every lower sparsity tested for
  that method are within t (a noisy good point above a failure does not count). The headline
  gives that s, and — when larger — the largest s that is within t *or* not distinguishable from
  dense at every tested sparsity up to it, marked "within noise". "none" when even the lowest
  tested sparsity fails. Without an interval (no recorded units), the point estimate stands in
  for both ends, so the rule falls back to comparing point estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunelab.report.intervals import Interval

TOLERANCES = (0.01, 0.05, 0.10)
RULE = (
    "How to read it: a sparsity is within t of dense when the pessimistic end of its 95 % interval (the lower "
    "end for accuracies and cosines, the upper end for perplexities and WER) is at most t × |dense| worse than "
    "dense's value; a method reaches sparsity s when s and every lower tested sparsity are within t. "
    "\"(≤ s′ within noise)\" adds the largest s′ up to which every tested sparsity is within t or has an interval "
    "overlapping dense's (not distinguishable from dense with this much data). \"none\": even the lowest tested "
    "sparsity is neither. Intervals: Wilson for accuracies, a seeded bootstrap over the scored units for "
    "perplexity, WER and cosine (see the summary table)."
)


@dataclass(frozen=True)
class Measure:
    """A benchmark value and its interval (None: the point estimate stands in for both ends)."""

    value: float
    interval: Interval | None = None

    @property
    def low(self) -> float:
        return self.interval.low if self.interval is not None else self.value

    @property
    def high(self) -> float:
        return self.interval.high if self.interval is not None else self.value


def within(point: Measure, dense: Measure, tolerance: float, higher_is_better: bool) -> bool:
    """The pessimistic end of `point`'s interval is at most tolerance·|dense| worse than dense's value."""
    slack = tolerance * abs(dense.value)
    if higher_is_better:
        return point.low >= dense.value - slack
    return point.high <= dense.value + slack


def indistinguishable(point: Measure, dense: Measure) -> bool:
    """The two intervals overlap: the data cannot tell the pruned model from dense."""
    return point.low <= dense.high and dense.low <= point.high


@dataclass(frozen=True)
class Reach:
    """How far a method gets at one tolerance: demonstrated, and including points within noise."""

    strict: float | None
    noise: float | None

    def text(self) -> str:
        base = "none" if self.strict is None else f"{self.strict:g}"
        if self.noise is not None and (self.strict is None or self.noise > self.strict):
            return f"{base} (≤ {self.noise:g} within noise)"
        return base

    def sparsities(self) -> list[float]:
        return [s for s in (self.strict, self.noise) if s is not None]


def reach(points: dict[float, Measure | None], dense: Measure, tolerance: float, higher_is_better: bool) -> Reach:
    """Largest sparsity s such that every tested sparsity ≤ s qualifies (a missing value stops the walk)."""
    strict = noise = None
    strict_ok = noise_ok = True
    for s in sorted(points):
        m = points[s]
        ok = m is not None and within(m, dense, tolerance, higher_is_better)
        strict_ok = strict_ok and ok
        noise_ok = noise_ok and (ok or (m is not None and indistinguishable(m, dense)))
        if strict_ok:
            strict = s
        if noise_ok:
            noise = s
        if not noise_ok:
            break
    return Reach(strict, noise)

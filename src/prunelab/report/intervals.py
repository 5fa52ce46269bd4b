"""95 % confidence intervals for the numbers a study reports, from what the benchmarks recorded.

The benchmarks store the raw units of their statistic in `details["interval_data"]` (never the
interval itself), so how an interval is drawn is decided — and stated — in one place:

* accuracies (`kind: binomial`, correct of n): the Wilson score interval, closed form. It stays
  inside [0, 1] and keeps sensible coverage for small n and for accuracies near 0 or 1, where
  the textbook p ± z·sqrt(p(1-p)/n) interval does not.
* ratio statistics (`kind: ratio`: perplexity = exp(ΣNLL / Σtokens) over windows' token blocks,
  sentences or examples; WER = Σerrors / Σwords over clips): a seeded percentile bootstrap over
  the units (2000 resamples). Resampling whole units keeps the dependence between tokens of one
  unit, and a ratio of sums is resampled as such, not as a mean of per-unit ratios.
* means (`kind: mean`, e.g. cosine per sentence): the same bootstrap over the values.
* means of several tasks' accuracies with their standard errors (`kind: normal_mean`, lm-eval's
  zero-shot numbers): mean ± z·sqrt(Σ se²) / k (tasks scored on disjoint data are independent).

Everything here is NumPy only, so the report does not pull in SciPy or statsmodels for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal
RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A two-sided 95 % interval and how it was obtained (said next to every table that shows it)."""

    low: float
    high: float
    method: str

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion correct/n.

    centre = (p + z²/2n) / (1 + z²/n), half-width = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    """
    if n <= 0:
        raise ValueError("a Wilson interval needs at least one trial")
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} is not between 0 and n={n}")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], *, transform: str | None = None,
                    resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap of sum(num)/sum(den) (then exp, with transform="exp") over resampled units.

    Resample b draws n unit indices with replacement: `rng.integers(0, n, size=(resamples, n))[b]`
    with `rng = np.random.default_rng(seed)`, so the interval is reproducible.
    """
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError("a bootstrap needs at least two units with a numerator and a denominator each")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    dens = b[idx].sum(axis=1)
    stats = np.divide(a[idx].sum(axis=1), dens, out=np.full(resamples, np.nan), where=dens > 0)
    stats = stats[np.isfinite(stats)]
    if transform == "exp":
        stats = np.exp(stats)
    elif transform is not None:
        raise ValueError(f"unknown transform {transform!r}")
    return _percentiles(stats, level)


def bootstrap_mean(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap of the mean of `values` (the ratio bootstrap with unit denominators)."""
    return bootstrap_ratio(values, [1.0] * len(values), resamples=resamples, seed=seed, level=level)


def normal_mean(value: float, stderrs: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """value ± z·sqrt(Σ se²)/k: the interval of a mean of k independent estimates with standard errors."""
    se = math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)
    return value - z * se, value + z * se


def interval_of(data: Mapping[str, Any] | None) -> Interval | None:
    """The 95 % interval a benchmark's `interval_data` supports, or None (missing, too few units)."""
    if not data:
        return None
    kind, units = data.get("kind"), data.get("units", "units")
    try:
        if kind == "binomial":
            lo, hi = wilson(int(data["correct"]), int(data["n"]))
            return Interval(lo, hi, f"Wilson 95 % ({data['correct']}/{data['n']} {units})")
        if kind == "ratio":
            lo, hi = bootstrap_ratio(data["num"], data["den"], transform=data.get("transform"))
            return Interval(lo, hi, f"bootstrap 95 % over {len(data['num'])} {units} ({RESAMPLES} resamples, "
                                    f"seed {SEED})")
        if kind == "mean":
            lo, hi = bootstrap_mean(data["values"])
            return Interval(lo, hi, f"bootstrap 95 % over {len(data['values'])} {units} ({RESAMPLES} resamples, "
                                    f"seed {SEED})")
        if kind == "normal_mean":
            lo, hi = normal_mean(float(data["value"]), [float(s) for s in data["stderr"]])
            return Interval(lo, hi, f"normal 95 % from {len(data['stderr'])} tasks' standard errors (lm-eval)")
    except (KeyError, TypeError, ValueError):
        return None
    return None


def spread(runs: Sequence[float]) -> tuple[float, float] | None:
    """(min, max) over repeated timings: what the speed numbers show as their spread (None for < 2 runs)."""
    xs = [float(x) for x in runs if x is not None and math.isfinite(float(x))]
    return (min(xs), max(xs)) if len(xs) >= 2 else None

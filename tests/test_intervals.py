"""Interval code against independent computations: hand-worked Wilson numbers, a direct bootstrap loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunelab.report.intervals import (
    Interval,
    bootstrap_mean,
    bootstrap_ratio,
    interval_of,
    normal_mean,
    spread,
    wilson,
)


@pytest.mark.parametrize(("correct", "n", "low", "high"), [
    # worked by hand from (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96
    (8, 10, 0.4902, 0.9433),
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
    (39, 64, 0.4869, 0.7194),
])
def test_wilson_matches_hand_numbers(correct, n, low, high):
    lo, hi = wilson(correct, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def _percentile_type7(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (NumPy's default), written out."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    i = math.floor(pos)
    return s[i] if i + 1 >= len(s) else s[i] + (s[i + 1] - s[i]) * (pos - i)


def test_bootstrap_ratio_equals_a_direct_loop():
    rng = np.random.default_rng(7)
    nll = rng.uniform(200, 600, size=9).tolist()
    tokens = rng.integers(100, 129, size=9).tolist()
    lo, hi = bootstrap_ratio(nll, tokens, transform="exp", resamples=500, seed=3)
    draws = np.random.default_rng(3).integers(0, 9, size=(500, 9))
    stats = []
    for row in draws.tolist():  # plain Python: sum the resampled units, then exp of the ratio
        num = sum(nll[i] for i in row)
        den = sum(tokens[i] for i in row)
        stats.append(math.exp(num / den))
    assert lo == pytest.approx(_percentile_type7(stats, 0.025), rel=1e-12)
    assert hi == pytest.approx(_percentile_type7(stats, 0.975), rel=1e-12)
    point = math.exp(sum(nll) / sum(tokens))
    assert lo < point < hi


def test_bootstrap_is_seeded_and_mean_is_a_ratio_with_unit_denominators():
    values = [0.91, 0.95, 0.88, 0.97, 0.93, 0.90]
    assert bootstrap_mean(values, seed=1) == bootstrap_mean(values, seed=1)
    assert bootstrap_mean(values, seed=1) == bootstrap_ratio(values, [1] * 6, seed=1)
    assert bootstrap_mean(values, seed=1) != bootstrap_mean(values, seed=2)
    lo, hi = bootstrap_mean(values)
    assert min(values) <= lo < np.mean(values) < hi <= max(values)


def test_normal_mean_of_task_stderrs():
    lo, hi = normal_mean(0.5, [0.03, 0.04])  # se of the mean: sqrt(0.0009 + 0.0016) / 2 = 0.025
    assert (lo, hi) == pytest.approx((0.5 - 1.959964 * 0.025, 0.5 + 1.959964 * 0.025), abs=1e-6)


def test_interval_of_dispatches_and_states_its_method():
    acc = interval_of({"kind": "binomial", "units": "examples", "correct": 8, "n": 10})
    assert isinstance(acc, Interval) and acc.low == pytest.approx(0.4902, abs=5e-5)
    assert "Wilson" in acc.method and "8/10" in acc.method
    ppl = interval_of({"kind": "ratio", "units": "blocks", "transform": "exp", "num": [300.0, 320.0, 280.0],
                       "den": [100, 100, 100]})
    assert ppl is not None and "bootstrap" in ppl.method and ppl.contains(math.exp(3.0))
    assert interval_of({"kind": "ratio", "num": [1.0], "den": [2]}) is None  # one unit: nothing to resample
    assert interval_of(None) is None and interval_of({"kind": "other"}) is None


def test_spread_over_repeats():
    assert spread([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert spread([1.0]) is None


def test_benchmarks_record_units_that_reproduce_their_value(tiny_dirs):
    """ppl's token blocks (sliced and full head) and embed's per-sentence cosines sum back to the metric."""
    import torch

    from prunelab.evaluation import EvalOptions, evaluate
    from prunelab.evaluation.common import BLOCK_TOKENS, CausalScorer, summed_nll
    from prunelab.storage import load

    lm = load(str(tiny_dirs["gpt2"]))
    res = evaluate(lm, "ppl", EvalOptions(max_tokens=3 * 128))
    data = res.details["interval_data"]
    assert data["kind"] == "ratio" and data["transform"] == "exp"
    assert sum(data["den"]) == res.n_tokens and len(data["num"]) == 3 * math.ceil(127 / BLOCK_TOKENS)
    assert sum(data["num"]) / sum(data["den"]) == pytest.approx(res.metrics["nll_per_token"], rel=1e-5)
    assert interval_of(data).contains(res.value)
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    for sliced in (True, False):  # slices of 7 tokens straddle the windows: blocks are still per window
        scorer, blocks = CausalScorer(lm.model, chunk_tokens=7), []
        scorer.sliced = sliced
        total, n = scorer.window_nll(ids, blocks)
        assert sum(b for _, b in blocks) == n == 2 * 39 and sum(a for a, _ in blocks) == pytest.approx(total, 1e-5)
    logits, targets = torch.randn(50, 300), torch.randint(0, 300, (50,))
    targets[:3] = -100
    per_token: list = []
    # the metric's sum is bitwise the cross-entropy it always was; the per-token values come for free
    assert summed_nll(logits, targets, per_token) == float(torch.nn.functional.cross_entropy(
        logits, targets, ignore_index=-100, reduction="sum"))
    assert per_token[0].shape == (50,) and float(per_token[0][:3].abs().sum()) == 0.0
    enc = load(str(tiny_dirs["bert"]))
    emb = evaluate(enc, "embed", EvalOptions(max_examples=16, reference=enc))
    values = emb.details["interval_data"]["values"]
    assert len(values) == 16 and np.mean(values) == pytest.approx(emb.value, abs=1e-6)

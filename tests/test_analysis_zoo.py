"""`analyze` on the real offline models, checked against numpy matrix by matrix (slow)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from safetensors import safe_open

from prunelab.analysis import EDGES, QUANTILES, THRESHOLDS, analyze
from prunelab.storage import load

MAX_BIN_LOG10 = float(np.diff(np.log10(EDGES)).max()) + 1e-12

pytestmark = pytest.mark.slow


def _reference(stats: dict, *, quantiles: bool) -> None:
    """Counts exact, fractions <= 1e-9, mean/std/max, quantiles within one bin: per matrix and per group."""
    source = stats["source"]
    groups: dict[str, dict[str, float]] = {}
    seen = 0
    import glob

    for path in sorted(glob.glob(f"{source}/*.safetensors")):
        with safe_open(path, "pt") as fh:
            for key in fh.keys():
                if key not in stats["matrices"]:
                    continue
                seen += 1
                got = stats["matrices"][key]
                a = np.abs(fh.get_tensor(key).double().numpy().reshape(-1))
                ref = {"params": a.size, "zeros": int((a == 0).sum()), "sum": float(a.sum()), "max": float(a.max())}
                for t, v in THRESHOLDS.items():
                    ref[t] = int((a < v).sum())
                assert got["params"] == ref["params"] and got["zeros"] == ref["zeros"], key
                for t in THRESHOLDS:
                    assert got["below"][t] == ref[t], (key, t)
                    assert abs(got["fraction_below"][t] - ref[t] / a.size) <= 1e-9, (key, t)
                assert math.isclose(got["mean"], ref["sum"] / a.size, rel_tol=1e-9), key
                assert math.isclose(got["std"], float(a.std()), rel_tol=1e-7), key
                assert got["max"] == ref["max"], key
                if quantiles:
                    for qk, q in QUANTILES.items():
                        exact = float(np.quantile(a, q))
                        assert abs(math.log10(got["quantiles"][qk] / exact)) <= MAX_BIN_LOG10, (key, qk)
                block = "outside" if got["block"] is None else f"{got['stack']}.{got['block']}"
                for gk in ("overall", f"t:{got['module_type']}", f"b:{block}"):
                    g = groups.setdefault(gk, {})
                    for k, v in ref.items():
                        g[k] = max(g.get(k, 0.0), v) if k == "max" else g.get(k, 0) + v
    assert seen == len(stats["matrices"])
    for gk, ref in groups.items():
        got = (stats["overall"] if gk == "overall" else
               stats["by_module_type"][gk[2:]] if gk.startswith("t:") else stats["by_block"][gk[2:]])
        assert got["params"] == ref["params"] and got["zeros"] == ref["zeros"], gk
        for t in THRESHOLDS:
            assert abs(got["fraction_below"][t] - ref[t] / ref["params"]) <= 1e-9, (gk, t)
        assert math.isclose(got["mean"], ref["sum"] / ref["params"], rel_tol=1e-9), gk
        assert got["max"] == ref["max"], gk


@pytest.mark.parametrize("spec", ["zoo:minilm", "zoo:smollm2"])
def test_zoo_analyze_matches_numpy(spec, tmp_path):
    t0 = time.perf_counter()
    stats = analyze(spec, tmp_path / "out")
    elapsed = time.perf_counter() - t0
    assert elapsed < 120, f"analyze took {elapsed:.0f} s"  # seconds on a quiet machine; generous for CI
    lm = load(spec)
    assert len(stats["matrices"]) == len(lm.prunable)
    assert stats["family"] == lm.family
    _reference(stats, quantiles=(spec == "zoo:minilm"))
    for name in ("hist_abs_log.png", "cdf_abs.png", "cdf_by_block.png", "heatmap_below_1e-2.png", "stats.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_zoo_minilm_all_scope(tmp_path):
    stats = analyze("zoo:minilm", tmp_path / "out", include_all=True, plots=False)
    assert stats["overall"]["params"] == 22_713_216  # every float tensor of all-MiniLM-L6-v2
    assert {"embedding", "norm", "bias"} <= set(stats["by_module_type"])
    _reference(stats, quantiles=False)

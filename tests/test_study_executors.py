"""Executors: a process pool and Ray give the same rows as the sequential local run.

Marked slow: starting Ray and spawning workers (each imports torch + transformers) takes
30-40 s on a busy 2-core machine, although the grid itself runs in a few seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from prunelab.study import Store, run_study


def small_grid(tiny_dirs, small_text) -> dict:
    """1 tiny decoder × magnitude/wanda × 2 sparsities × ppl, plus size: 11 cells."""
    return {
        "models": [str(tiny_dirs["gpt2"])],
        "methods": ["magnitude", "wanda"],
        "sparsities": [0.5, 0.9],
        "benchmarks": ["ppl"],
        "analyze": False,
        "size": {"methods": ["magnitude"]},
        "speed": False,
        "calibration": {"nsamples": 4, "seqlen": 64, "calib": str(small_text)},
        "eval": {"ppl": {"seqlen": 64, "max_tokens": 1024, "data": str(small_text)}},
        "resources": {"num_cpus": 1},
        "threads": 1,  # identical thread count in every executor: identical float reductions
    }


def rows_by_hash(out: Path) -> dict[str, dict]:
    with Store(out) as store:
        return {r.hash: {"status": r.status, "kind": r.kind, "value": r.metrics.get("value"),
                         "achieved": r.metrics.get("achieved_sparsity_prunable"),
                         "sparse_bytes": r.sizes.sparse_bytes, "pid": r.pid}
                for r in store.rows()}


def assert_same_results(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for h in a:
        assert a[h]["status"] == b[h]["status"] == "done", (a[h], b[h])
        for key in ("value", "achieved", "sparse_bytes"):
            if a[h][key] is None:
                assert b[h][key] is None
            else:
                assert b[h][key] == pytest.approx(a[h][key], rel=1e-6), (key, a[h], b[h])


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory, tiny_dirs, small_text) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("local") / "study"
    summary = run_study(small_grid(tiny_dirs, small_text), out, progress=False)
    assert summary.failed == 0, summary.failures
    return rows_by_hash(out)


@pytest.mark.slow
def test_process_pool_matches_local(tmp_path, tiny_dirs, small_text, local_rows):
    summary = run_study(small_grid(tiny_dirs, small_text), tmp_path / "pool", jobs=2, progress=False)
    assert summary.failed == 0, summary.failures
    pooled = rows_by_hash(tmp_path / "pool")
    assert_same_results(local_rows, pooled)
    assert len({r["pid"] for r in pooled.values()}) >= 2  # really ran in two workers


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, tiny_dirs, small_text, local_rows):
    import ray  # a hard dependency (pyproject), so no skip

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        summary = run_study(small_grid(tiny_dirs, small_text), tmp_path / "ray", executor="ray", progress=False)
        assert ray.is_initialized()  # a session the caller started is left running
    finally:
        ray.shutdown()
    assert summary.failed == 0, summary.failures
    assert summary.executor == "ray"
    assert_same_results(local_rows, rows_by_hash(tmp_path / "ray"))
    with Store(tmp_path / "ray") as store:
        assert store.get_meta("executor") == "ray"
    assert time.perf_counter() - t0 < 180

"""Report: zero-shot cells give one figure per model with a panel per task and one for the mean (no model run)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from prunelab.report import build_report
from prunelab.report.intervals import Z95
from prunelab.report.zeroshot import zeroshot_panels
from prunelab.study import Cell, CellResult, Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = {"rte": ("validation", "validation", 0.5), "arc_easy": ("validation", "test", 0.25)}


def _zeroshot_metrics(accs: dict[str, float], limit: int) -> dict:
    """What `evaluate_zeroshot` stores for a cell (the keys the report reads), with made-up accuracies."""
    tasks = {t: {"acc": a, "acc_stderr": 0.05, "acc_norm": a, "acc_norm_stderr": 0.05, "n": limit,
                 "chance": TASKS[t][2], "split": TASKS[t][0], "lm_eval_split": TASKS[t][1], "sha256": "0" * 64}
             for t, a in accs.items()}
    mean = sum(accs.values()) / len(accs)
    return {"value": mean, "primary": "mean_acc", "higher_is_better": True, "status": "ok", "bench": "zeroshot",
            "metrics": {"mean_acc": mean, "mean_acc_norm": mean, "mean_chance": 0.375,
                        **{f"{t}_acc": a for t, a in accs.items()}},
            "details": {"tasks": tasks, "mean_over": list(accs), "limit": limit,
                        "split_used": {t: TASKS[t][0] for t in accs}}}


def zeroshot_study(out: Path) -> list[Cell]:
    """One decoder: dense and magnitude/wanda at 0.5 and 0.9, zero-shot on rte and arc_easy."""
    cells = []
    with Store(out) as store:
        def put(cell: Cell, **res: object) -> None:
            cells.append(cell)
            store.mark_running(cell)
            store.finish(cell, CellResult("done", wall_s=1.0, **res))

        put(Cell("bench", "zoo:dec", bench="zeroshot"), metrics=_zeroshot_metrics({"rte": 0.6, "arc_easy": 0.7}, 3))
        for method, drop in (("magnitude", 0.3), ("wanda", 0.1)):
            for s in (0.5, 0.9):
                put(Cell("prune", "zoo:dec", method=method, sparsity=s), metrics={"achieved_sparsity_prunable": s})
                accs = {"rte": 0.6 - drop * s, "arc_easy": 0.7 - 2 * drop * s}
                put(Cell("bench", "zoo:dec", method=method, sparsity=s, bench="zeroshot"),
                    metrics=_zeroshot_metrics(accs, 3))
        store.set_meta(config={"preset": "quick", "models": ["zoo:dec"]}, plan=[c.hash for c in cells],
                       executor="local")
    return cells


def test_zeroshot_panels_per_task_and_mean(tmp_path):
    zeroshot_study(tmp_path)
    with Store(tmp_path) as store:
        rows = store.plan_rows()
    panels = {p.title: p for p in zeroshot_panels(rows)}
    assert list(panels) == ["rte", "arc_easy", "mean over tasks"]
    rte = panels["rte"]
    assert rte.dense == pytest.approx((0.6, Z95 * 0.05)) and rte.chance == 0.5
    assert sorted(rte.series) == ["magnitude", "wanda"]
    flat = [v for point in sorted(rte.series["wanda"]) for v in point]
    assert flat == pytest.approx([0.5, 0.55, Z95 * 0.05, 0.9, 0.51, Z95 * 0.05])
    mean = panels["mean over tasks"]
    # the mean's bar: 1.96 * sqrt(0.05² + 0.05²) / 2, as in the summary table's interval
    assert mean.dense == pytest.approx((0.65, Z95 * (2 * 0.05**2) ** 0.5 / 2)) and mean.chance == 0.375
    assert panels["arc_easy"].chance == 0.25


def test_report_draws_zeroshot_tasks_and_states_the_splits(tmp_path):
    zeroshot_study(tmp_path)
    paths = build_report(tmp_path)
    md, html = paths["markdown"].read_text(), paths["html"].read_text()
    figure = tmp_path / "report_files" / "m0-zeroshot-tasks.png"
    assert figure.is_file() and figure.read_bytes().startswith(PNG_MAGIC)
    assert "](report_files/m0-zeroshot-tasks.png)" in md
    assert "one panel per task and one for their mean" in md and "±1.96·stderr" in md
    note = "arc_easy on its validation split (lm-eval scores it on test, which does not ship offline)"
    assert note in md and note in html
    assert "rte on the split lm-eval uses (validation)" in md
    assert "first 3 documents per task" in md
    # the per-task figure replaces the mean-only one; every image is embedded
    assert "m0-bench-zeroshot.png" not in md
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(uris) == paths["figures"] and all(base64.b64decode(u).startswith(PNG_MAGIC) for u in uris)
    assert any("one panel per task" in alt for alt in re.findall(r"<img alt='([^']*)'", html))

"""Zero-shot accuracy per task vs sparsity: one panel per task and one for their mean, per model.

The mean over the seven tasks is what the papers' tables report, but it hides which tasks a pruned
model loses first and which sit near chance even dense (a small model's ARC-challenge does), so the
report draws every task next to the mean, with dense and chance marked.

Error bars are ±1.96·stderr: for a task, lm-eval's `acc_stderr` (the standard error of the mean of
the per-document 0/1 scores); for the mean, the tasks' standard errors combined
(`intervals.normal_mean`, the same interval the summary table prints). Chance is what uniform
guessing scores on the documents used (mean of 1 / number of choices), as the bench recorded it.
The bench also records the split each task was scored on; the caption says where it differs from
lm-eval's own (ARC-easy, ARC-challenge and OpenBookQA: validation here, test in lm-eval).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prunelab.report.document import Figure
from prunelab.report.extract import measure_of, short
from prunelab.report.figures import AccuracyPanel, accuracy_panels
from prunelab.report.intervals import Z95
from prunelab.study.cells import DENSE
from prunelab.study.results import finite
from prunelab.study.store import Row

ZEROSHOT = "zeroshot"
MEAN = "mean"
Point = tuple[float, float | None]  # (accuracy, half-width of its 95 % error bar)


@dataclass
class _Panel:
    dense: Point | None = None
    chance: float | None = None
    series: dict[str, list[tuple[float, float, float | None]]] = field(default_factory=dict)


def is_zeroshot(bench: str) -> bool:
    """`zeroshot` and its `zeroshot:task,...` form."""
    return bench.partition(":")[0] == ZEROSHOT


def _task_point(task: Mapping[str, Any]) -> Point | None:
    acc, se = finite(task.get("acc")), finite(task.get("acc_stderr"))
    return None if acc is None else (acc, Z95 * se if se is not None else None)


def _mean_point(row: Row) -> Point | None:
    m = measure_of(row)
    if m is None:
        return None
    return m.value, (m.interval.high - m.value) if m.interval else None


def _row_points(row: Row) -> dict[str, tuple[Point | None, float | None]]:
    """Panel name -> (this row's point, chance level) for every task the row scored, and the mean."""
    tasks = (row.metrics.get("details") or {}).get("tasks") or {}
    out = {name: (_task_point(t), finite(t.get("chance"))) for name, t in tasks.items() if isinstance(t, dict)}
    out[MEAN] = (_mean_point(row), finite((row.metrics.get("metrics") or {}).get("mean_chance")))
    return out


def zeroshot_panels(mrows: list[Row]) -> list[AccuracyPanel]:
    """One model's finished zero-shot cells as panels: its tasks in the bench's order, then the mean."""
    rows = [r for r in mrows if r.kind == "bench" and is_zeroshot(r.bench) and r.status == "done"
            and r.bench_outcome().applicable]
    panels: dict[str, _Panel] = {}
    for r in rows:
        for name, (point, chance) in _row_points(r).items():
            p = panels.setdefault(name, _Panel())
            p.chance = p.chance if p.chance is not None else chance
            if point is None:
                continue
            if r.method == DENSE:
                p.dense = point
            else:
                p.series.setdefault(r.method_label, []).append((r.sparsity, *point))
    # the bench's task order (`mean_over`; the stored JSON has its keys sorted), then the mean
    ran = [t for r in rows for t in (r.metrics.get("details") or {}).get("mean_over") or [] if t in panels]
    order = list(dict.fromkeys([*ran, *(t for t in panels if t != MEAN), MEAN]))
    return [AccuracyPanel("mean over tasks" if name == MEAN else name, panels[name].series, panels[name].dense,
                          panels[name].chance) for name in order]


def split_note(mrows: list[Row]) -> str:
    """Which split each task was scored on, and where that is not the split lm-eval itself uses."""
    used: dict[str, tuple[str, str]] = {}
    for r in mrows:
        if r.kind == "bench" and is_zeroshot(r.bench) and r.status == "done":
            for name, t in ((r.metrics.get("details") or {}).get("tasks") or {}).items():
                if isinstance(t, dict) and t.get("split"):
                    used.setdefault(name, (str(t["split"]), str(t.get("lm_eval_split") or t["split"])))
    if not used:
        return ""
    moved = {name: s for name, s in used.items() if s[0] != s[1]}
    same = [name for name in used if name not in moved]
    parts = [f"{name} on its {s[0]} split (lm-eval scores it on {s[1]}, which does not ship offline)"
             for name, s in moved.items()]
    if same:
        parts.append(f"{', '.join(same)} on the split lm-eval uses ({', '.join(sorted({used[n][0] for n in same}))})")
    return "Splits: " + "; ".join(parts) + "."


def _limit_text(mrows: list[Row]) -> str:
    limits = {(r.metrics.get("details") or {}).get("limit") for r in mrows
              if r.kind == "bench" and is_zeroshot(r.bench) and r.status == "done"}
    if limits == {None}:
        return "all documents of each split"
    return "first " + "/".join(str(n) for n in sorted(x for x in limits if x is not None)) + " documents per task"


def zeroshot_figure(model: str, tag: str, mrows: list[Row]) -> Figure | None:
    """Accuracy vs sparsity per task and for the mean (None when the model has no finished zero-shot cell)."""
    png = accuracy_panels(zeroshot_panels(mrows), title=f"{short(model)}: zero-shot accuracy vs sparsity",
                          xlabel="sparsity", ylabel="accuracy (lm-eval acc)")
    if png is None:
        return None
    caption = (f"{model}: zero-shot accuracy (lm-eval acc, {_limit_text(mrows)}) vs sparsity, one panel per task "
               "and one for their mean, one line per method; error bars ±1.96·stderr (lm-eval's acc_stderr; for "
               "the mean the tasks' standard errors combined); dashed: dense, shaded ±1.96·stderr; dotted: chance "
               f"(1 / number of choices, averaged over the documents). {split_note(mrows)}")
    return Figure(f"{tag}-zeroshot-tasks.png", caption.strip(), png=png)

"""Numbers the report takes from the results store: values with intervals, sizes, timings.

Shared by the summary table, the headline and the figures, so that they all read a row the same
way (one place decides which size is "the size" and which speed cell times a point).
"""

from __future__ import annotations

import statistics
from typing import Any

from prunelab.report.headline import Measure
from prunelab.report.intervals import interval_of, spread
from prunelab.study.cells import DENSE
from prunelab.study.results import SpeedOutcome, finite
from prunelab.study.store import Row


def short(model: str) -> str:
    return model.rstrip("/").split("/")[-1]


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def size_numbers(row: Row) -> dict[str, float | None]:
    """Bytes on disk of a size cell: dense HF checkpoint, sparse format, entropy and bitmask bounds."""
    s = row.sizes
    return {"dense": finite(s.dense_bytes), "sparse": finite(s.sparse_bytes), "bound": finite(s.entropy_bound_bytes),
            "bitmask": finite(s.bitmask_bound_bytes)}


def measure_of(row: Row) -> Measure | None:
    """A finished bench row's value and 95 % interval (None when it has no value)."""
    if row.status != "done":
        return None
    o = row.bench_outcome()
    if o.value is None:
        return None
    return Measure(o.value, interval_of(o.interval_data))


def fmt_measure(m: Measure | None) -> str:
    """`0.61 [0.49, 0.72]`: the value and its 95 % interval (the value alone when there is none)."""
    if m is None:
        return "–"
    if m.interval is None:
        return fmt(m.value)
    return f"{fmt(m.value)} [{fmt(m.interval.low)}, {fmt(m.interval.high)}]"


def point_key(r: Row) -> str:
    """How tables and figures name a point's method (dense for the reference)."""
    return DENSE if r.method == DENSE else r.method_label


def speed_for(mrows: list[Row], method_label: str, sparsity: float, pattern: str) -> tuple[Row, SpeedOutcome] | None:
    """The speed cell timing this point: its own, else another method's at the same sparsity and pattern.

    Speed depends on how many and which shape of weights are zero, not on how the mask was chosen,
    so the study times one method per (sparsity, pattern); the caller says whose mask was timed.
    """
    done = [r for r in mrows if r.kind == "speed" and r.status == "done" and r.pattern == pattern
            and abs(r.sparsity - sparsity) < 1e-9 and r.speed_outcome().sparse is not None]
    done.sort(key=lambda r: r.method_label != method_label)
    return (done[0], done[0].speed_outcome()) if done else None


def dense_speed(mrows: list[Row]) -> tuple[float | None, tuple[float, ...]]:
    """Median of the dense timings of all speed cells of a model, and all their runs."""
    outs = [r.speed_outcome() for r in mrows if r.kind == "speed" and r.status == "done"]
    values = [o.dense for o in outs if o.dense is not None]
    runs = tuple(x for o in outs for x in o.dense_runs)
    return (statistics.median(values) if values else None), runs


def fmt_speed(value: float | None, runs: tuple[float, ...], unit: str) -> str:
    """`12.3 ms/tok (11.9–13.0, 3 runs)`: a median and its spread over the timed repeats."""
    if value is None:
        return "not measured"
    rng = spread(runs)
    extra = f" ({rng[0]:.3g}–{rng[1]:.3g}, {len(runs)} runs)" if rng else ""
    return f"{value:.3g}{' ' + unit if unit else ''}{extra}"


def speed_unit(o: SpeedOutcome) -> str:
    return "ms/tok" if o.is_decode else "tok/s prefill"


def size_for(mrows: list[Row], method_label: str, sparsity: float) -> dict[str, float | None] | None:
    """The size cell of this point, if the study measured one."""
    for r in mrows:
        if (r.kind == "size" and r.status == "done" and r.method_label == method_label
                and abs(r.sparsity - sparsity) < 1e-9):
            return size_numbers(r)
    return None


def dense_bytes(mrows: list[Row]) -> float | None:
    """The dense checkpoint's bytes (every size cell measures the same dense-tensor checkpoint)."""
    return next((n["dense"] for r in mrows if r.kind == "size" and r.status == "done"
                 for n in [size_numbers(r)] if n["dense"] is not None), None)


def accuracy_baselines(rows: list[Row]) -> dict[str, float]:
    """Majority-class and chance accuracy of the dev examples one benchmark's done cells used
    (the same for every cell of a bench), so figures can draw what "no skill" scores."""
    out: dict[str, float] = {}
    for r in rows:
        if r.kind != "bench" or r.status != "done":
            continue
        o = r.bench_outcome()
        if o.majority is not None:
            out.setdefault("majority class", o.majority)
        if o.chance is not None:
            out.setdefault("chance", o.chance)
    return out

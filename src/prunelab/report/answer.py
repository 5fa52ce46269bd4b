"""The report's first section: the headline table (how far each method prunes within 1/5/10 %) and
what those sparsities buy (size on disk, memory, decode speed), built from the results store.

The rule itself lives in `report.headline` (pure, tested on hand-built numbers); this module
only collects the measures per (model, benchmark, method) and formats the two tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prunelab.report.document import Heading, Part, Table, Text
from prunelab.report.extract import (
    dense_bytes,
    dense_speed,
    fmt_measure,
    fmt_speed,
    measure_of,
    short,
    size_for,
    speed_for,
    speed_unit,
)
from prunelab.report.headline import RULE, TOLERANCES, Measure, reach
from prunelab.study.cells import DENSE
from prunelab.study.store import Row

Point = tuple[str, float, str]  # (method label, sparsity, pattern)


@dataclass
class BenchCurves:
    """One benchmark of one model: dense's measure and each method's measure per sparsity."""

    dense: Measure | None = None
    higher_is_better: bool | None = None
    methods: dict[str, dict[float, Measure | None]] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)


def bench_curves(mrows: list[Row]) -> dict[str, BenchCurves]:
    """Per benchmark of one model's rows: dense and every method's measures (None for a cell not done)."""
    out: dict[str, BenchCurves] = {}
    for r in mrows:
        if r.kind != "bench":
            continue
        c = out.setdefault(r.bench, BenchCurves())
        m = measure_of(r)
        if r.status == "done" and r.bench_outcome().higher_is_better is not None:
            c.higher_is_better = r.bench_outcome().higher_is_better
        if r.method == DENSE:
            c.dense = m
        else:
            c.methods.setdefault(r.method_label, {})[r.sparsity] = m
            c.patterns[r.method_label] = r.pattern
    return out


def headline_table(rows: list[Row], models: list[str]) -> tuple[list[str], list[list[str]], dict[str, set[Point]]]:
    """One line per (model, benchmark, method): dense's value and the sparsity reached at each tolerance.

    Also returns, per model, the points the table names (for the "what it buys" table).
    """
    header = ["model", "method", "benchmark", "dense [95 % CI]", *(f"within {t:.0%}" for t in TOLERANCES)]
    body: list[list[str]] = []
    named: dict[str, set[Point]] = {}
    for model in models:
        mrows = [r for r in rows if r.model == model]
        for bench, c in sorted(bench_curves(mrows).items()):
            if c.dense is None or c.higher_is_better is None:
                if c.methods:
                    body.append([short(model), "all", bench, "not measured", *("no dense value",) * len(TOLERANCES)])
                continue
            for method, points in sorted(c.methods.items()):
                reaches = [reach(points, c.dense, t, c.higher_is_better) for t in TOLERANCES]
                body.append([short(model), method, bench, fmt_measure(c.dense), *(x.text() for x in reaches)])
                named.setdefault(model, set()).update(
                    (method, s, c.patterns[method]) for x in reaches for s in x.sparsities())
    return header, body, named


def buys_table(rows: list[Row], models: list[str], named: dict[str, set[Point]]) -> tuple[list[str], list[list[str]]]:
    """Size on disk, memory and speed of dense and of every point the headline names."""
    header = ["model", "method", "sparsity", "size on disk", "vs dense checkpoint", "memory", "speed (pruned)",
              "speed (dense, same cell)"]
    body: list[list[str]] = []
    for model in models:
        if model not in named:
            continue
        mrows = [r for r in rows if r.model == model]
        dense_b = dense_bytes(mrows)
        d_speed, d_runs = dense_speed(mrows)
        any_speed = next((r.speed_outcome() for r in mrows if r.kind == "speed" and r.status == "done"), None)
        unit = speed_unit(any_speed) if any_speed else ""
        d_mem = any_speed.dense_memory_bytes if any_speed else None
        body.append([short(model), DENSE, "0", _mb(dense_b), "1×" if dense_b else "–",
                     _mem(d_mem, any_speed.memory_what if any_speed else ""), fmt_speed(d_speed, d_runs, unit),
                     "–"])
        for method, sparsity, pattern in sorted(named[model]):
            body.append([short(model), method, f"{sparsity:g}", *_buys(mrows, method, sparsity, pattern, dense_b)])
    return header, body


def _buys(mrows: list[Row], method: str, sparsity: float, pattern: str, dense_b: float | None) -> list[str]:
    """The size, memory and speed columns of one point ("not measured" where the study has no cell)."""
    size = size_for(mrows, method, sparsity)
    sparse_b = size["sparse"] if size else None
    ratio = f"{sparse_b / dense_b:.2f}×" if sparse_b and dense_b else "–"
    timed = speed_for(mrows, method, sparsity, pattern)
    if timed is None:
        return [_mb(sparse_b), ratio, "not measured", "not measured", "–"]
    row, o = timed
    whose = "" if row.method_label == method else f" [{row.method_label}'s mask]"
    unit = speed_unit(o)
    return [_mb(sparse_b), ratio, _mem(o.memory_bytes, o.memory_what),
            fmt_speed(o.sparse, o.sparse_runs, unit) + whose, fmt_speed(o.dense, o.dense_runs, unit)]


def _mb(n: float | None) -> str:
    return "not measured" if n is None else f"{n / 1e6:.1f} MB"


def _mem(n: float | None, what: str) -> str:
    return "not measured" if n is None else f"{n / 1e6:.1f} MB ({what})"


def headline_parts(rows: list[Row], models: list[str]) -> list[Part]:
    """The Headline section: the rule, the reach table, and what the named sparsities buy."""
    header, body, named = headline_table(rows, models)
    if not body:
        return [Heading("Headline"), Text(["No benchmark has both a dense and a pruned value yet."])]
    parts: list[Part] = [
        Heading("Headline"),
        Text(["Largest sparsity each method reaches while every benchmark stays within 1 %, 5 % and 10 % of the "
              "dense model, taking each value's 95 % interval into account.", RULE]),
        Table(header, body),
    ]
    b_header, b_body = buys_table(rows, models, named)
    if b_body:
        parts += [Text(["What those sparsities buy: bytes on disk of the sparse format (vs the dense checkpoint), "
                        "memory of the sparse runtime and its speed (median, with min–max over the timed repeats), "
                        "timed in the same cell as the dense model. Speed is timed for one method per sparsity "
                        "and pattern; another method's mask is named when it stands in."]),
                  Table(b_header, b_body)]
    return parts

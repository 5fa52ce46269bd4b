"""Trade-off figures: quality against bytes on disk and against decode latency, the Pareto front marked.

The picture a user chooses from: each point is one (method, sparsity, pattern) of the study, with
its benchmark value (and 95 % interval) on y and what it costs on x; dense is the reference star.
A point is on the front when no other point is both cheaper and better.
"""

from __future__ import annotations

from collections.abc import Callable

from prunelab.report.answer import BenchCurves, bench_curves
from prunelab.report.document import Figure
from prunelab.report.extract import accuracy_baselines, dense_bytes, dense_speed, short, size_for, speed_for
from prunelab.report.figures import TradeoffPanel, TradeoffPoint, tradeoff
from prunelab.report.headline import Measure
from prunelab.study.store import Row

LOG_Y_BENCHES = {"ppl", "seq2seq-ppl", "pppl"}
LEGEND = "Pareto front circled; dotted: majority class and chance (accuracy panels)"
Cost = Callable[[str, float, str], float | None]  # (method, sparsity, pattern) -> x, or None when not measured


def _point(label: str, tag: str, x: float, m: Measure) -> TradeoffPoint:
    return TradeoffPoint(label, tag, x, m.value, m.interval.low if m.interval else None,
                         m.interval.high if m.interval else None)


def _panels(curves: dict[str, BenchCurves], cost: Cost, dense_x: float | None,
            mrows: list[Row]) -> list[TradeoffPanel]:
    """One panel per benchmark with a direction: every point whose cost was measured, and the
    majority-class / chance levels of accuracy benchmarks (a point sitting on them shows no skill)."""
    panels = []
    for bench, c in sorted(curves.items()):
        if c.higher_is_better is None:
            continue
        points = [_point(method, f"{s:g}", x, m) for method, pts in sorted(c.methods.items())
                  for s, m in sorted(pts.items())
                  if m is not None and (x := cost(method, s, c.patterns[method])) is not None]
        dense = _point("dense", "dense", dense_x, c.dense) if c.dense is not None and dense_x is not None else None
        if points:
            base = accuracy_baselines([r for r in mrows if r.bench == bench])
            panels.append(TradeoffPanel(bench, bench, c.higher_is_better, points, dense, log_y=bench in LOG_Y_BENCHES,
                                        baselines=base))
    return panels


def tradeoff_figures(model: str, tag: str, mrows: list[Row]) -> tuple[list[Figure], list[str]]:
    """Quality vs bytes on disk (size cells) and quality vs speed (speed cells) for one model."""
    curves = bench_curves(mrows)
    figures: list[Figure] = []
    notes: list[str] = []

    def size_cost(method: str, sparsity: float, _pattern: str) -> float | None:
        n = size_for(mrows, method, sparsity)
        return n["sparse"] / 1e6 if n and n["sparse"] is not None else None

    d_bytes = dense_bytes(mrows)
    png = tradeoff(_panels(curves, size_cost, d_bytes / 1e6 if d_bytes else None, mrows),
                   title=f"{short(model)}: quality vs size on disk", xlabel="sparse format on disk (MB)")
    if png:
        figures.append(Figure(f"{tag}-tradeoff-size.png", f"{model}: quality vs bytes on disk per (method, sparsity), "
                              f"error bars 95 % intervals, dense ★, {LEGEND}", png=png))
    elif curves:
        notes.append("trade-off vs size: no point has both a benchmark value and a size cell")

    timed = next((r.speed_outcome() for r in mrows if r.kind == "speed" and r.status == "done"), None)
    if timed is None:
        notes.append("trade-off vs speed: no speed cell for this model")
        return figures, notes

    def speed_cost(method: str, sparsity: float, pattern: str) -> float | None:
        found = speed_for(mrows, method, sparsity, pattern)
        return found[1].sparse if found else None

    what = ("decode latency (ms/token, median)" if timed.is_decode
            else "prefill throughput (tokens/s, median; an encoder does not decode)")
    png = tradeoff(_panels(curves, speed_cost, dense_speed(mrows)[0], mrows), title=f"{short(model)}: quality vs speed",
                   xlabel=what, x_lower_is_better=timed.is_decode)
    if png:
        figures.append(Figure(f"{tag}-tradeoff-speed.png",
                              f"{model}: quality vs {what.split(' (')[0]} per (method, sparsity); speed of a "
                              "sparsity is timed on one method's mask (it depends on the pattern, not the method), "
                              f"dense ★ at its median timing, {LEGEND}", png=png))
    return figures, notes

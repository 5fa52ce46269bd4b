"""Study figures (matplotlib, Agg backend): each function returns PNG bytes, or None if no data.

Inputs are plain series extracted from the results store by `report.py`, so the figures can be
tested without a study: `{label: [(x, y), ...]}` plus an optional dense reference value.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

Series = Mapping[str, Sequence[tuple[float, float]]]
Bands = Mapping[str, Sequence[tuple[float, float, float]]]  # label -> (x, low, high)
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _png(fig: matplotlib.figure.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _finite(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return sorted((float(x), float(y)) for x, y in points
                  if x is not None and y is not None and math.isfinite(float(y)))


def _band(ax: matplotlib.axes.Axes, band: Sequence[tuple[float, float, float]] | None, color: str,
          log_y: bool) -> None:
    """Shade a 95 % interval along a curve (points without an interval are skipped)."""
    pts = sorted((float(x), float(lo), float(hi)) for x, lo, hi in band or []
                 if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi))
    if not pts:
        return
    xs, los, his = zip(*pts, strict=True)
    if log_y:
        los, his = tuple(max(v, 1e-12) for v in los), tuple(max(v, 1e-12) for v in his)
    if len(xs) == 1:
        ax.errorbar(xs, [(los[0] + his[0]) / 2], yerr=[(his[0] - los[0]) / 2], color=color, capsize=3, fmt="none")
    else:
        ax.fill_between(xs, los, his, color=color, alpha=0.18, linewidth=0)


def metric_vs_sparsity(
    series: Series,
    *,
    title: str,
    ylabel: str,
    dense: float | None = None,
    log_y: bool = False,
    bands: Bands | None = None,
    dense_band: tuple[float, float] | None = None,
    baselines: Mapping[str, float] | None = None,
) -> bytes | None:
    """One line per method; the dense model as a dashed horizontal reference line.

    `bands` (label -> (x, low, high)) shade each method's 95 % interval, `dense_band` dense's;
    `baselines` (e.g. majority class, chance) are dotted grey lines, so a curve that "rises" to
    the majority-class accuracy is seen for what it is.
    """
    cleaned = {k: _finite(v) for k, v in series.items()}
    cleaned = {k: v for k, v in cleaned.items() if v}
    if not cleaned and dense is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, pts) in enumerate(sorted(cleaned.items())):
        xs, ys = zip(*pts, strict=True)
        if log_y:
            ys = tuple(max(y, 1e-12) for y in ys)
        line = ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], label=label)[0]
        _band(ax, (bands or {}).get(label), line.get_color(), log_y)
    if dense is not None and math.isfinite(dense):
        ax.axhline(max(dense, 1e-12) if log_y else dense, color="black", linestyle="--", linewidth=1,
                   label=f"dense ({dense:.4g})")
        if dense_band is not None:
            ax.axhspan(*dense_band, color="black", alpha=0.08, label="dense 95 % interval")
    for j, (name, level) in enumerate(sorted((baselines or {}).items())):
        ax.axhline(level, color="grey", linestyle=(0, (1, 2 + j)), linewidth=1.2, label=f"{name} ({level:.3g})")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of prunable weights set to zero)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def size_vs_sparsity(
    series: Series,
    *,
    title: str,
    dense_bytes: float | None = None,
) -> bytes | None:
    """Bytes on disk: dense checkpoint (reference), sparse format, and the information bound."""
    cleaned = {k: _finite(v) for k, v in series.items()}
    cleaned = {k: v for k, v in cleaned.items() if v}
    if not cleaned:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, pts) in enumerate(sorted(cleaned.items())):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, [y / 1e6 for y in ys], marker=_MARKERS[i % len(_MARKERS)], label=label)
    if dense_bytes:
        ax.axhline(dense_bytes / 1e6, color="black", linestyle="--", linewidth=1,
                   label=f"dense ({dense_bytes / 1e6:.1f} MB)")
    ax.set_xlabel("sparsity (fraction of prunable weights set to zero)")
    ax.set_ylabel("size on disk (MB, 10^6 bytes)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def speed_vs_sparsity(series: Series, *, title: str, ylabel: str, dense: float | None = None,
                      bands: Bands | None = None) -> bytes | None:
    """Decode latency per token (or any speed number) for the sparse runtime, dense as reference.

    `bands` shade the min–max over the timed repeats.
    """
    return metric_vs_sparsity(series, title=title, ylabel=ylabel, dense=dense, log_y=False, bands=bands)


@dataclass(frozen=True)
class TradeoffPoint:
    """One (method, sparsity, pattern) point: its cost on x, its quality on y with a 95 % interval."""

    label: str  # the method (colour and legend)
    tag: str  # written next to the point, e.g. the sparsity
    x: float
    y: float
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class TradeoffPanel:
    """One benchmark of a trade-off figure; `dense` is drawn as the reference star."""

    title: str
    ylabel: str
    higher_is_better: bool
    points: list[TradeoffPoint]
    dense: TradeoffPoint | None = None
    log_y: bool = False
    baselines: Mapping[str, float] = field(default_factory=dict)  # e.g. majority class, chance


def pareto_front(points: Sequence[tuple[float, float]], *, x_lower_is_better: bool = True,
                 y_higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both axes (ties on one axis count as not worse)."""
    def better_or_equal(a: tuple[float, float], b: tuple[float, float]) -> bool:
        x_ok = a[0] <= b[0] if x_lower_is_better else a[0] >= b[0]
        y_ok = a[1] >= b[1] if y_higher_is_better else a[1] <= b[1]
        return x_ok and y_ok

    return [i for i, p in enumerate(points)
            if not any(j != i and better_or_equal(q, p) and q != p for j, q in enumerate(points))]


def _tradeoff_axes(ax: matplotlib.axes.Axes, panel: TradeoffPanel, colors: dict[str, str],
                   x_lower_is_better: bool) -> None:
    everything = panel.points + ([panel.dense] if panel.dense else [])
    for p in panel.points:
        err = None
        if p.low is not None and p.high is not None:
            err = [[max(0.0, p.y - p.low)], [max(0.0, p.high - p.y)]]
        ax.errorbar([p.x], [p.y], yerr=err, fmt="o", color=colors[p.label], markersize=5, capsize=2, alpha=0.85)
        ax.annotate(p.tag, (p.x, p.y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if panel.dense is not None:
        d = panel.dense
        ax.plot([d.x], [d.y], marker="*", color="black", markersize=12, linestyle="none")
        if d.low is not None and d.high is not None:
            ax.axhspan(d.low, d.high, color="black", alpha=0.06)
    front = pareto_front([(p.x, p.y) for p in everything], x_lower_is_better=x_lower_is_better,
                         y_higher_is_better=panel.higher_is_better)
    pts = sorted((everything[i].x, everything[i].y) for i in front)
    if pts:
        xs, ys = zip(*pts, strict=True)
        # the best quality available at each cost: flat until the next cheaper-or-better point
        ax.step(xs, ys, where="post" if x_lower_is_better else "pre", color="black", linewidth=1, alpha=0.6)
        ax.plot(xs, ys, "o", markerfacecolor="none", markeredgecolor="black", markersize=9)
    for j, (name, level) in enumerate(sorted(panel.baselines.items())):
        ax.axhline(level, color="grey", linestyle=(0, (1, 2 + j)), linewidth=1.2)
        ax.annotate(f"{name} {level:.3g}", (0.01, level), xycoords=("axes fraction", "data"), fontsize=6,
                    color="grey", xytext=(0, 2), textcoords="offset points")
    if panel.log_y:
        ax.set_yscale("log")
    direction = "higher" if panel.higher_is_better else "lower"
    ax.set_title(panel.title, fontsize=9)
    ax.set_ylabel(f"{panel.ylabel} ({direction} is better)", fontsize=8)
    ax.grid(True, alpha=0.3, which="both")


def tradeoff(panels: Sequence[TradeoffPanel], *, title: str, xlabel: str,
             x_lower_is_better: bool = True) -> bytes | None:
    """Quality against a cost, one panel per benchmark: points per method, dense (★) as reference,
    the Pareto front (points nothing else beats on both axes) circled and joined."""
    panels = [p for p in panels if p.points or p.dense]
    if not panels:
        return None
    labels = sorted({p.label for panel in panels for p in panel.points})
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _tradeoff_axes(ax, panel, colors, x_lower_is_better)
        ax.set_xlabel(xlabel, fontsize=8)
    handles = [Line2D([], [], marker="o", color=colors[label], linestyle="none", label=label) for label in labels]
    handles += [Line2D([], [], marker="*", color="black", markersize=10, linestyle="none", label="dense"),
                Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="black", color="black",
                       label="Pareto front")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _png(fig)


def block_sparsity(panels: Mapping[str, Mapping[str, Sequence[float]]], blocks: Sequence[str], *,
                   title: str) -> bytes | None:
    """Achieved sparsity per block: one panel per requested sparsity, one line per method."""
    panels = {k: v for k, v in panels.items() if v}
    if not panels or not blocks:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False, sharey=True)
    xs = list(range(len(blocks)))
    for ax, (name, lines) in zip(axes[0], panels.items(), strict=True):
        for i, (label, ys) in enumerate(sorted(lines.items())):
            ax.plot(xs[: len(ys)], ys, marker=_MARKERS[i % len(_MARKERS)], markersize=3, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("block (execution order)", fontsize=8)
        step = max(1, len(blocks) // 6)
        ax.set_xticks(xs[::step], [blocks[i] for i in xs[::step]], fontsize=6, rotation=45)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("achieved sparsity of the block", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


Curves = Mapping[str, Sequence[float]]  # block -> CDF at each edge


def block_cdfs(panels: Mapping[str, tuple[Sequence[float], Curves, Curves]], *, title: str) -> bytes | None:
    """CDF of |w| per block before (dashed) and after (solid) pruning; colour runs from first to last block.

    Each panel is (edges, before, after) with block -> CDF at each edge; zeros sit at the left edge, so
    the after-curves start at the block's achieved sparsity.
    """
    panels = {k: v for k, v in panels.items() if v[2]}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (name, (edges, before, after)) in zip(axes[0], panels.items(), strict=True):
        n = max(1, len(after) - 1)
        for i, block in enumerate(after):
            color = cmap(i / n)
            if block in before:
                ax.plot(edges, before[block], color=color, linestyle="--", linewidth=0.7, alpha=0.6)
            ax.plot(edges, after[block], color=color, linewidth=1.0)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("|w| (zeros counted at the left edge)", fontsize=8)
        ax.grid(True, alpha=0.3, which="both")
    axes[0][0].set_ylabel("fraction of the block's weights ≤ |w|", fontsize=8)
    handles = [Line2D([], [], color="grey", linestyle="--", label="before pruning"),
               Line2D([], [], color="grey", label="after pruning"),
               Line2D([], [], color=cmap(0.0), label="first block"),
               Line2D([], [], color=cmap(1.0), label="last block")]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


@dataclass(frozen=True)
class AccuracyPanel:
    """One task of a small-multiples figure: per method (x, accuracy, half-width of its error bar or None)."""

    title: str
    series: Mapping[str, Sequence[tuple[float, float, float | None]]]
    dense: tuple[float, float | None] | None = None  # (accuracy, half-width)
    chance: float | None = None


def _accuracy_axes(ax: matplotlib.axes.Axes, panel: AccuracyPanel, styles: dict[str, tuple[str, str]]) -> None:
    for label, pts in sorted(panel.series.items()):
        pts = sorted(p for p in pts if p[1] is not None and math.isfinite(p[1]))
        if not pts:
            continue
        xs, ys, errs = zip(*pts, strict=True)
        yerr = [e if e is not None and math.isfinite(e) else 0.0 for e in errs]
        color, marker = styles[label]
        ax.errorbar(xs, ys, yerr=yerr, color=color, marker=marker, markersize=3, linewidth=1, capsize=2)
    if panel.dense is not None:
        acc, half = panel.dense
        ax.axhline(acc, color="black", linestyle="--", linewidth=1)
        if half:
            ax.axhspan(acc - half, acc + half, color="black", alpha=0.08, linewidth=0)
    if panel.chance is not None:
        ax.axhline(panel.chance, color="grey", linestyle=":", linewidth=1.3)
    ax.set_title(panel.title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def accuracy_panels(panels: Sequence[AccuracyPanel], *, title: str, xlabel: str, ylabel: str,
                    ncols: int = 4) -> bytes | None:
    """Small multiples: one panel per task (same colours per method across panels), dense dashed with its
    error band, chance dotted; a task is read on its own scale, so the y axes are not shared."""
    panels = [p for p in panels if any(p.series.values()) or p.dense is not None]
    if not panels:
        return None
    labels = sorted({label for p in panels for label, pts in p.series.items() if pts})
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {label: (cycle[i % len(cycle)], _MARKERS[i % len(_MARKERS)]) for i, label in enumerate(labels)}
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.7 * nrows + 0.8), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        _accuracy_axes(ax, panels[k], styles)
        if k % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if k + ncols >= len(panels):
            ax.set_xlabel(xlabel, fontsize=8)
    handles = [Line2D([], [], color=styles[label][0], marker=styles[label][1], label=label) for label in labels]
    handles += [Line2D([], [], color="black", linestyle="--", label="dense"),
                Line2D([], [], color="grey", linestyle=":", label="chance")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    legend_in = 0.15 + 0.25 * math.ceil(len(handles) / 6)  # the legend's height in inches, below the panels
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    return _png(fig)

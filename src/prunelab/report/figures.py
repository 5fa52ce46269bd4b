"""Study figures (matplotlib, Agg backend): each function returns PNG bytes, or None if no data.

Inputs are plain series extracted from the results store by `report.py`, so the figures can be
tested without a study: `{label: [(x, y), ...]}` plus an optional dense reference value.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

Series = Mapping[str, Sequence[tuple[float, float]]]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _png(fig: matplotlib.figure.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _finite(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return sorted((float(x), float(y)) for x, y in points
                  if x is not None and y is not None and math.isfinite(float(y)))


def metric_vs_sparsity(
    series: Series,
    *,
    title: str,
    ylabel: str,
    dense: float | None = None,
    log_y: bool = False,
) -> bytes | None:
    """One line per method; the dense model as a dashed horizontal reference line."""
    cleaned = {k: _finite(v) for k, v in series.items()}
    cleaned = {k: v for k, v in cleaned.items() if v}
    if not cleaned and dense is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, pts) in enumerate(sorted(cleaned.items())):
        xs, ys = zip(*pts, strict=True)
        if log_y:
            ys = tuple(max(y, 1e-12) for y in ys)
        ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], label=label)
    if dense is not None and math.isfinite(dense):
        ax.axhline(max(dense, 1e-12) if log_y else dense, color="black", linestyle="--", linewidth=1,
                   label=f"dense ({dense:.4g})")
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


def speed_vs_sparsity(series: Series, *, title: str, ylabel: str, dense: float | None = None) -> bytes | None:
    """Decode latency per token (or any speed number) for the sparse runtime, dense as reference."""
    return metric_vs_sparsity(series, title=title, ylabel=ylabel, dense=dense, log_y=False)

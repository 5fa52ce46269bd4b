"""The four analysis figures, drawn from the stats.json content alone (headless, Agg backend).

Drawing from the statistics — not from the weights — means the figures can be redrawn
from a saved stats.json, and that every curve is exactly the merged histogram the numbers
come from. Each figure says in its title what model, which tensors and what quantity it shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prunelab.analysis.naming import ordered_types as _ordered_types

TYPE_LABELS = {"q": "q (query)", "k": "k (key)", "v": "v (value)", "o": "o (attn out)", "qkv": "qkv (fused)",
               "gate": "gate (MLP)", "up": "up (MLP)", "down": "down (MLP)"}
THRESHOLD_KEYS = ["1e-4", "1e-3", "1e-2", "1e-1", "1"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _edges(stats: dict[str, Any]) -> np.ndarray:
    return 10.0 ** np.asarray(stats["histogram"]["edges_log10"], dtype=np.float64)


def _scope_text(stats: dict[str, Any]) -> str:
    return "prunable matrices" if stats.get("scope") == "prunable" else "all float tensors"


def _xlim(stats: dict[str, Any], edges: np.ndarray) -> tuple[float, float]:
    hist = np.asarray(stats["overall"]["hist"])
    inner = np.flatnonzero(hist[1:-1])
    if inner.size == 0:
        return 1e-6, 10.0
    total = hist.sum()
    cum = np.cumsum(hist[1:-1]) / max(total, 1)
    lo_i = int(np.searchsorted(cum, 1e-5))  # skip the extreme tails (0.001 %) so the bulk is readable
    hi_i = int(np.searchsorted(cum, 1 - 1e-5))
    lo = edges[max(lo_i - 2, 0)]
    hi = max(edges[min(hi_i + 3, len(edges) - 1)], 1.2 * float(stats["overall"]["max"]))  # show the max
    hi = min(hi, edges[-1])
    return lo, max(hi, lo * 100)


def _cdf(group: dict[str, Any]) -> np.ndarray:
    """P(|w| < edge) at each edge: zeros + underflow + bins below, over all params."""
    hist = np.asarray(group["hist"], dtype=np.float64)
    params = max(group["params"], 1)
    return (group["zeros"] + np.cumsum(hist[:-1])) / params


def _mark_thresholds(ax: Any, lo: float, hi: float) -> None:
    for key in THRESHOLD_KEYS:
        t = float(key)
        if lo < t < hi:
            ax.axvline(t, color="0.55", lw=0.8, ls=":", zorder=0)


def _cdf_axes(ax: Any, lo: float, hi: float, ylabel: str) -> None:
    """The axes both CDF plots share: threshold marks, log x over [lo, hi], percent y, grid."""
    from matplotlib.ticker import PercentFormatter

    _mark_thresholds(ax, lo, hi)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("threshold x on |w| (log scale)")
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(True, alpha=0.3)


def plot_hist(stats: dict[str, Any], path: Path) -> None:
    """Share of weights per log-spaced |w| bin: the whole scope filled, each module type as a line."""
    plt = _plt()
    edges = _edges(stats)
    lo, hi = _xlim(stats, edges)
    widths_dec = np.diff(np.log10(edges))
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=120)
    overall = stats["overall"]
    hist = np.asarray(overall["hist"], dtype=np.float64)[1:-1]
    density = hist / max(overall["params"], 1) / widths_dec  # share of weights per decade of |w|
    ax.stairs(density, edges, fill=True, color="#9ecae1", alpha=0.85, label=f"all ({_scope_text(stats)})")
    ax.stairs(density, edges, color="#3182bd", lw=1.2)
    types = _ordered_types(list(stats["by_module_type"]))
    colors = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    if len(types) > 1:
        for i, t in enumerate(types):
            g = stats["by_module_type"][t]
            d = np.asarray(g["hist"], dtype=np.float64)[1:-1] / max(g["params"], 1) / widths_dec
            ax.stairs(d, edges, color=colors(i % colors.N), lw=1.0, label=TYPE_LABELS.get(t, t))
    _mark_thresholds(ax, lo, hi)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("|w| (absolute weight value, log scale)")
    ax.set_ylabel("share of weights per decade of |w|")
    zeros = overall["zeros"]
    ax.set_title(
        f"{stats['model']}: distribution of |w| over {_scope_text(stats)}\n"
        f"{overall['params']:,} weights; exact zeros: {zeros:,} ({overall['zero_fraction']:.2%}, not on the log axis); "
        f"dotted lines at 1e-4 … 1",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=2, frameon=False, loc="upper left")
    ax.grid(True, which="major", axis="x", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cdf(stats: dict[str, Any], path: Path) -> None:
    """Fraction of weights with |w| below x: the pruning threshold a magnitude method would need."""
    plt = _plt()
    edges = _edges(stats)
    lo, hi = _xlim(stats, edges)
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=120)
    types = _ordered_types(list(stats["by_module_type"]))
    colors = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    if len(types) > 1:
        for i, t in enumerate(types):
            ax.plot(edges, _cdf(stats["by_module_type"][t]), color=colors(i % colors.N), lw=1.1,
                    label=TYPE_LABELS.get(t, t))
    overall = stats["overall"]
    ax.plot(edges, _cdf(overall), color="black", lw=2.2, label=f"all ({_scope_text(stats)})")
    for key in THRESHOLD_KEYS:
        t, f = float(key), overall["fraction_below"][key]
        if lo < t < hi:
            ax.plot([t], [f], "o", color="black", ms=4)
            high = f > 0.85
            ax.annotate(f"{f:.1%} below {key}", (t, f), textcoords="offset points",
                        xytext=(6, -14) if high else (-4, 8), fontsize=8, ha="left" if high else "right",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    _cdf_axes(ax, lo, hi, "fraction of weights with |w| < x")
    ax.set_title(f"{stats['model']}: cumulative distribution of |w| over {_scope_text(stats)}\n"
                 "(reading: a magnitude pruner removing that fraction cuts every |w| below x)", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _blocks(stats: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
    """stack -> [(block index, by_block key)] in depth order, `outside` left out."""
    stacks: dict[str, list[tuple[int, str]]] = {}
    for key in stats["by_block"]:
        if key == "outside":
            continue
        stack, idx = key.split(".")
        stacks.setdefault(stack, []).append((int(idx), key))
    return {s: sorted(v) for s, v in sorted(stacks.items(), key=lambda kv: kv[0] != "encoder")}


def plot_cdf_by_block(stats: dict[str, Any], path: Path) -> None:
    """One CDF per transformer block, coloured by depth; one panel per stack (encoder, decoder)."""
    plt = _plt()
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    edges = _edges(stats)
    lo, hi = _xlim(stats, edges)
    stacks = _blocks(stats)
    n = max(len(stacks), 1)
    fig, axes = plt.subplots(1, n, figsize=(8.5 * n if n > 1 else 9.5, 5.2), dpi=120, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (stack, blocks) in zip(axes[0], stacks.items(), strict=False):
        norm = Normalize(vmin=0, vmax=max(b for b, _ in blocks) or 1)
        for b, key in blocks:
            ax.plot(edges, _cdf(stats["by_block"][key]), color=cmap(norm(b)), lw=1.0)
        _cdf_axes(ax, lo, hi, "fraction of the block's weights with |w| < x")
        ax.set_title(f"{stack} stack: {len(blocks)} blocks", fontsize=10)
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        cb = fig.colorbar(sm, ax=ax, pad=0.01)
        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
        cb.set_label(f"{stack} block index (0 = first block after the embeddings)")
    fig.suptitle(f"{stats['model']}: cumulative distribution of |w| per transformer block "
                 f"({_scope_text(stats)} in each block)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def block_type_grid(stats: dict[str, Any], threshold: str = "1e-2") -> tuple[list[str], list[str], np.ndarray]:
    """(row keys, module types, fraction below `threshold`) for every block × module type cell (NaN if empty)."""
    rows = [key for blocks in _blocks(stats).values() for _, key in blocks]
    types = _ordered_types(sorted({m["module_type"] for m in stats["matrices"].values() if m["block"] is not None}))
    below = np.zeros((len(rows), len(types)))
    params = np.zeros((len(rows), len(types)))
    r_idx = {k: i for i, k in enumerate(rows)}
    t_idx = {t: j for j, t in enumerate(types)}
    for m in stats["matrices"].values():
        if m["block"] is None:
            continue
        i, j = r_idx[f"{m['stack']}.{m['block']}"], t_idx[m["module_type"]]
        below[i, j] += m["below"][threshold]
        params[i, j] += m["params"]
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(params > 0, below / np.maximum(params, 1), np.nan)
    return rows, types, grid


def plot_heatmap(stats: dict[str, Any], path: Path, threshold: str = "1e-2") -> None:
    """Block × module type heat map of the fraction of weights with |w| < threshold."""
    plt = _plt()
    rows, types, grid = block_type_grid(stats, threshold)
    height = min(max(4.2, 0.26 * len(rows) + 2.2), 24)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(types) + 3.2), height), dpi=120)
    cmap = plt.get_cmap("magma").with_extremes(bad="0.85")
    finite = grid[np.isfinite(grid)]
    vmax = float(finite.max()) if finite.size else 1.0
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=max(vmax, 1e-6),
                   interpolation="nearest")
    ax.set_xticks(range(len(types)), [TYPE_LABELS.get(t, t) for t in types], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 24 else 8)
    ax.set_xlabel("module type")
    ax.set_ylabel("block (stack.index; input side on top)")
    if len(rows) * len(types) <= 400:
        for i in range(len(rows)):
            for j in range(len(types)):
                v = grid[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.1%}", ha="center", va="center", fontsize=6.5,
                            color="white" if v < 0.6 * vmax else "black")
    from matplotlib.ticker import PercentFormatter

    cb = fig.colorbar(im, ax=ax, pad=0.02, format=PercentFormatter(1.0))
    cb.set_label(f"fraction of weights with |w| < {threshold}")
    ax.set_title(f"{stats['model']}: share of near-zero weights (|w| < {threshold})\n"
                 "per block and module type (grey: no such matrix)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def make_plots(stats: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the four PNGs into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / "hist_abs_log.png", out_dir / "cdf_abs.png", out_dir / "cdf_by_block.png",
             out_dir / "heatmap_below_1e-2.png"]
    plot_hist(stats, paths[0])
    plot_cdf(stats, paths[1])
    plot_cdf_by_block(stats, paths[2])
    plot_heatmap(stats, paths[3])
    return paths

"""Per-block pictures from the prune cells' block profiles (study/worker.block_profile).

Achieved sparsity per block shows where a method put the zeros — flat for per-layer-uniform
methods, shaped for OWL's outlier-weighted budgets or a global magnitude threshold — and the
per-block CDF of |w| before and after pruning shows what was cut from each block.
"""

from __future__ import annotations

from typing import Any

from prunelab.report.document import Figure
from prunelab.report.extract import short
from prunelab.report.figures import block_cdfs, block_sparsity
from prunelab.study.store import Row

MAX_CDF_PANELS = 4


def block_order(blocks: dict[str, Any]) -> list[str]:
    """`encoder.0, encoder.1, …, decoder.0, …`: execution order."""
    def key(name: str) -> tuple[int, str, int]:
        stack, _, index = name.partition(".")
        return (stack != "encoder", stack, int(index) if index.isdigit() else 0)

    return sorted(blocks, key=key)


def achieved_by_block(profile: dict[str, Any], order: list[str]) -> list[float]:
    blocks = profile["blocks"]
    return [blocks[b]["zeros"] / max(1, blocks[b]["numel"]) for b in order if b in blocks]


def cdf_by_block(profile: dict[str, Any]) -> dict[str, list[float]]:
    """Block -> fraction of its weights with |w| ≤ each edge (zeros included)."""
    out = {}
    for name in block_order(profile["blocks"]):
        b = profile["blocks"][name]
        total, running, cdf = max(1, b["numel"]), b["zeros"], []
        for count in b["hist"][: len(profile["edges"])]:  # bin k holds edges[k-1] < |w| <= edges[k]
            running += count
            cdf.append(running / total)
        out[name] = cdf
    return out


def block_figures(model: str, tag: str, mrows: list[Row]) -> tuple[list[Figure], list[str]]:
    """Achieved sparsity per block (one panel per sparsity) and |w| CDFs per block at the middle sparsity."""
    prunes = [r for r in mrows if r.kind == "prune" and r.status == "done" and r.metrics.get("block_profile")]
    if not prunes:
        return [], []
    order = block_order(prunes[0].metrics["block_profile"]["after"]["blocks"])
    panels: dict[str, dict[str, list[float]]] = {}
    for r in sorted(prunes, key=lambda r: r.sparsity):
        panels.setdefault(f"requested {r.sparsity:g}", {})[r.method_label] = achieved_by_block(
            r.metrics["block_profile"]["after"], order)
    figures = []
    png = block_sparsity(panels, order, title=f"{short(model)}: achieved sparsity per block")
    if png:
        figures.append(Figure(f"{tag}-block-sparsity.png", f"{model}: achieved sparsity per block, one panel per "
                              "requested sparsity, one line per method", png=png))
    middle = min({r.sparsity for r in prunes}, key=lambda s: (abs(s - 0.5), s))
    chosen = [r for r in prunes if r.sparsity == middle][:MAX_CDF_PANELS]
    cdf_panels = {}
    for r in chosen:
        prof = r.metrics["block_profile"]
        cdf_panels[r.method_label] = (prof["after"]["edges"], cdf_by_block(prof["before"]), cdf_by_block(prof["after"]))
    png = block_cdfs(cdf_panels, title=f"{short(model)}: CDF of |w| per block at sparsity {middle:g}")
    if png:
        figures.append(Figure(f"{tag}-block-cdf.png", f"{model}: CDF of |w| per block before (dashed) and after "
                              f"(solid) pruning to {middle:g}, one panel per method", png=png))
    return figures, []

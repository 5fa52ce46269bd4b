"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2023) for every method whose spec says `owl`.

Blocks whose Wanda scores hold more outliers (scores above `owl_m` × the block's mean score)
are pruned less. The outlier ratios come from one dense calibration pass; they are min-max
normalised to [0, 2λ], shifted so their mean density is 1 − s, so the per-block sparsities
average to the requested s and stay within s ± λ. The engine records the resulting per-block
sparsities in `PruneResult.extra["owl"]` (prune_report.json). N:M patterns have no per-block
ratio to set (every matrix is N/M), so OWL is refused with them.
"""

from __future__ import annotations

import torch

from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel
from prunelab.pruning.sequential import BlockRef, ProgressFn, run_sequential
from prunelab.pruning.types import PruneConfig

BlockKey = tuple[str, int]


def outlier_ratios(
    lm: LoadedModel, calib: list[dict[str, torch.Tensor]], m_factor: float, progress: ProgressFn | None = None
) -> dict[BlockKey, float]:
    """Fraction of Wanda scores above `m_factor` × mean, per block, from a dense sequential pass."""
    from prunelab.pruning.wanda import NormStats, wanda_scores

    ratios: dict[BlockKey, float] = {}

    def after_block(block: BlockRef, stats: dict) -> None:  # type: ignore[type-arg]
        scores = torch.cat([wanda_scores(m.weight(lm.model), stats[m.name]).reshape(-1) for m in block.matrices])
        ratios[(block.stack, block.index)] = float((scores > m_factor * scores.mean()).float().mean())

    def note(msg: str, done: int, total: int) -> None:
        if progress:
            progress(f"OWL ratios: {msg}", done, total)

    run_sequential(lm, calib, lambda m: NormStats(m.in_features), None, after_block=after_block, progress=note)
    return ratios


def owl_sparsities(ratios: dict[BlockKey, float], sparsity: float, lam: float) -> dict[BlockKey, float]:
    """OWL's mapping from outlier ratios to per-block sparsities (mean = `sparsity`)."""
    keys = list(ratios)
    r = torch.tensor([ratios[k] for k in keys], dtype=torch.float64)
    span = float(r.max() - r.min())
    density = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    density = density - density.mean() + (1 - sparsity)
    return {k: float(min(0.999, max(0.0, 1 - d))) for k, d in zip(keys, density.tolist(), strict=True)}


def block_sparsities(
    lm: LoadedModel, config: PruneConfig, calib: list[dict[str, torch.Tensor]], progress: ProgressFn | None = None
) -> dict[BlockKey, float]:
    """Per-block target sparsity: uniform, or OWL's outlier-weighted ratios with `config.owl`."""
    keys = {(m.stack, m.block) for m in lm.prunable if m.block >= 0}
    if not config.owl:
        return {k: float(config.sparsity) for k in keys}
    if config.nm is not None:  # PruneConfig.validate already refuses this; kept for direct callers
        raise ConfigError("--owl sets non-uniform unstructured sparsities: use it with --pattern unstructured")
    return owl_sparsities(outlier_ratios(lm, calib, config.owl_m, progress), config.sparsity, config.owl_lambda)

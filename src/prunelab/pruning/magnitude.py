"""Magnitude pruning: `global` (one threshold over all prunable matrices) and `magnitude-layer`.

Global magnitude is the classic recipe (`torch.nn.utils.prune.global_unstructured` with
`L1Unstructured`): every prunable weight competes with every other one, so layers with small
weights lose most. The selection here is the same ranking (prune the `round(s · n)` smallest
|w| over the concatenation of all matrices, in `lm.prunable` order) with a deterministic
tie-break by position, computed without autograd reparametrisation, and without ever
concatenating the model (a radix select over |w| bit patterns, see patterns.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from prunelab.models.types import LoadedModel
from prunelab.pruning.patterns import apply_mask, lowest_k_magnitude_masks, nm_mask, select_mask, target_count
from prunelab.pruning.registry import PruneWarning
from prunelab.pruning.sequential import ProgressFn
from prunelab.pruning.types import PruneConfig


def prune_global(
    lm: LoadedModel, config: PruneConfig, calib: Any = None, progress: ProgressFn | None = None
) -> dict[str, torch.Tensor]:
    """One global |w| ranking over all prunable matrices (N:M patterns are per group, hence local)."""
    model = lm.model
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if config.nm is not None:
            for i, m in enumerate(lm.prunable):
                w = m.weight(model)
                masks[m.name] = nm_mask(w.abs(), *config.nm)
                apply_mask(w, masks[m.name])
                if progress:
                    progress(m.name, i + 1, len(lm.prunable))
            return masks
        weights = [m.weight(model) for m in lm.prunable]
        keeps = lowest_k_magnitude_masks(weights, target_count(config.sparsity, sum(w.numel() for w in weights)))
        for i, (m, w, keep) in enumerate(zip(lm.prunable, weights, keeps, strict=True)):
            masks[m.name] = keep
            apply_mask(w, keep)
            if progress:
                progress(m.name, i + 1, len(lm.prunable))
    return masks


def prune_layerwise(
    lm: LoadedModel, config: PruneConfig, calib: Any = None, progress: ProgressFn | None = None
) -> dict[str, torch.Tensor]:
    """|w| ranked within each matrix: every matrix gets exactly the requested sparsity (its block's with OWL)."""
    from prunelab.pruning.owl import block_sparsities

    per_block = block_sparsities(lm, config, calib, progress) if config.owl else {}
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, m in enumerate(lm.prunable):
            w = m.weight(lm.model)
            sparsity = per_block.get((m.stack, m.block), config.sparsity)
            masks[m.name] = select_mask(w.detach().abs().float(), sparsity, config.nm, rowwise=False)
            apply_mask(w, masks[m.name])
            if progress:
                progress(m.name, i + 1, len(lm.prunable))
    return masks


def prune_outside_blocks(lm: LoadedModel, config: PruneConfig, masks: dict[str, torch.Tensor]) -> None:
    """Matrices outside transformer blocks (embeddings/LM head, only with include_embeddings) get
    per-matrix magnitude: calibration statistics for them are not collected."""
    extra = [m for m in lm.prunable if m.block < 0]
    if not extra:
        return
    warnings.warn(
        f"{len(extra)} matrices outside transformer blocks (embeddings / LM head) pruned by per-matrix magnitude",
        PruneWarning, stacklevel=2,
    )
    with torch.no_grad():
        for m in extra:
            w = m.weight(lm.model)
            masks[m.name] = select_mask(w.detach().abs().float(), config.sparsity, config.nm, rowwise=False)
            apply_mask(w, masks[m.name])

"""Wanda: prune by |W_ij| · ‖X_j‖₂, compared within each output row (Sun et al., 2023).

The only statistic is the squared L2 norm of every input feature over the calibration
tokens — one reduction per linear, shared by linears that read the same tensor (q/k/v,
gate/up) — so the run costs about one forward pass of the calibration set through the
blocks. No weight update.
"""

from __future__ import annotations

import torch

from prunelab.models.types import LoadedModel
from prunelab.pruning.patterns import apply_mask, select_mask
from prunelab.pruning.sequential import ProgressFn, run_sequential
from prunelab.pruning.types import PruneConfig


class NormStats:
    """Running sum of squares of every input feature (float64), and the token count."""

    def __init__(self, in_features: int) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        self.sq += torch.linalg.vector_norm(x.float(), dim=0).double().pow(2)
        self.n += x.shape[0]

    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature, normalised by the token count (scale does not change rankings)."""
        return (self.sq / max(1, self.n)).sqrt().float()


def wanda_scores(weight: torch.Tensor, stats: NormStats) -> torch.Tensor:
    """|W| · ‖X_j‖ for an (out, in) weight."""
    return weight.detach().abs().float() * stats.norms().unsqueeze(0)


def prune_wanda(
    lm: LoadedModel, config: PruneConfig, calib: list[dict[str, torch.Tensor]] | None,
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """Sequential block-by-block Wanda over the calibration set (optionally with OWL block ratios)."""
    from prunelab.pruning.magnitude import prune_outside_blocks
    from prunelab.pruning.owl import block_sparsities

    if calib is None:
        raise ValueError("wanda needs calibration inputs")
    sparsity = block_sparsities(lm, config, calib, progress)
    masks: dict[str, torch.Tensor] = {}

    def prune_one(m, stats: NormStats) -> None:  # type: ignore[no-untyped-def]
        w = m.weight(lm.model)
        mask = select_mask(wanda_scores(w, stats), sparsity[(m.stack, m.block)], config.nm, rowwise=True)
        apply_mask(w, mask)
        masks[m.name] = mask

    run_sequential(lm, calib, lambda m: NormStats(m.in_features), prune_one, progress=progress)
    prune_outside_blocks(lm, config, masks)
    return masks

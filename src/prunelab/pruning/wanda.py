"""Wanda: prune by |W_ij| · ‖X_j‖₂, compared within each output row (Sun et al., 2023).

The only statistic is the squared L2 norm of every input feature over the calibration
tokens — one reduction per linear, shared by linears that read the same tensor (q/k/v,
gate/up) — so the run costs about one forward pass of the calibration set through the
blocks. No weight update.
"""

from __future__ import annotations

import torch

from prunelab.models.types import LoadedModel, PrunableMatrix
from prunelab.pruning.layerwise import prune_layerwise
from prunelab.pruning.patterns import apply_mask, select_mask
from prunelab.pruning.sequential import ProgressFn
from prunelab.pruning.types import PruneConfig


class NormStats:
    """Running sum of squares of every input feature (float64), and the token count."""

    def __init__(self, in_features: int) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if self.sq.device != x.device:  # statistics live where the block runs (--device cuda)
            self.sq = self.sq.to(x.device)
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
    def solve(m: PrunableMatrix, w: torch.Tensor, stats: NormStats, target: float) -> torch.Tensor:
        mask = select_mask(wanda_scores(w, stats), target, config.nm, rowwise=True)
        apply_mask(w, mask)
        return mask

    return prune_layerwise(
        lm, config, calib, progress, method="wanda", make_stats=lambda m: NormStats(m.in_features), solve=solve
    )

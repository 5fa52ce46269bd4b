"""The shape every calibrated method shares, written once.

Per-block target sparsities (uniform, or OWL's with `--owl`), then each linear pruned by the
method's `solve` as its calibration inputs arrive through the already-pruned earlier linears
(the sequential runner), then the matrices outside the numbered blocks. A method supplies only
what is its own: the statistics it accumulates per linear and how it turns them into a mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from prunelab.models.types import LoadedModel, PrunableMatrix
from prunelab.pruning.magnitude import prune_outside_blocks
from prunelab.pruning.owl import block_sparsities
from prunelab.pruning.sequential import ProgressFn, run_sequential
from prunelab.pruning.types import PackedMasks, PruneConfig

# solve(matrix, its weight (out, in), its statistics, target sparsity) -> keep-mask, applied to the weight
Solve = Callable[[PrunableMatrix, torch.Tensor, Any, float], torch.Tensor]


def prune_layerwise(
    lm: LoadedModel, config: PruneConfig, calib: list[dict[str, torch.Tensor]] | None,
    progress: ProgressFn | None, *, method: str, make_stats: Callable[[PrunableMatrix], Any], solve: Solve,
) -> dict[str, torch.Tensor]:
    """Keep-masks by matrix name for a calibrated method, every mask already applied."""
    if calib is None:
        raise ValueError(f"{method} needs calibration inputs")
    targets = block_sparsities(lm, config, calib, progress)
    masks: dict[str, torch.Tensor] = PackedMasks() if lm.offload is not None else {}

    def prune_one(m: PrunableMatrix, stats: Any) -> None:
        masks[m.name] = solve(m, m.weight(lm.model), stats, targets[(m.stack, m.block)])

    run_sequential(lm, calib, make_stats, prune_one, progress=progress)
    prune_outside_blocks(lm, config, masks)
    return masks

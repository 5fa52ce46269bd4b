"""Keeping a mask fixed while training: pruned weights stay exactly zero after every step.

Two guards, because either alone can leak: the gradient of every pruned entry is zeroed before each
optimizer step (so Adam's moments never see it), and the weight is multiplied by its mask after every optimizer
step (so nothing — weight decay, a numerical accident, a resumed optimizer — can refill a zero).
`MaskGuard.check` counts the pruned entries that are not zero; recovery calls it after every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.models.types import LoadedModel, PrunableMatrix


class MaskError(PrunelabError):
    """A pruned weight is no longer zero (a bug: recovery must never refill the mask)."""


def masks_from_zeros(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """Keep-masks read from a checkpoint's zeros: `True` where the prunable weight is non-zero.

    What `prunelab recover` does with a model pruned elsewhere: the zeros *are* the mask.
    Orientation is `PrunableMatrix.weight`'s logical (out, in), as `PruneResult.masks`.
    """
    with torch.no_grad():
        return {m.name: m.weight(lm.model).ne(0).detach().cpu().clone() for m in lm.prunable}


def _param_mask(m: PrunableMatrix, mask: torch.Tensor) -> torch.Tensor:
    """A logical (out, in) mask in the stored parameter's own orientation (GPT-2's Conv1D is (in, out))."""
    return mask.t().contiguous() if m.transposed else mask


@dataclass
class MaskGuard:
    """Masks bound to one model's parameters: gradient masking, re-masking after a step, and a check."""

    lm: LoadedModel
    masks: dict[str, torch.Tensor]
    _bound: list[tuple[str, nn.Parameter, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for m in self.lm.prunable:
            mask = self.masks.get(m.name)
            if mask is None:
                raise MaskError(f"no mask for {m.name}: pass the masks of every prunable matrix")
            param = m.module(self.lm.model).weight
            pm = _param_mask(m, mask.bool()).to(param.device)
            if tuple(pm.shape) != tuple(param.shape):
                raise MaskError(f"mask for {m.name} has shape {tuple(mask.shape)}, the weight {tuple(param.shape)}")
            self._bound.append((m.name, param, pm))

    def parameters(self, names: set[str] | None = None) -> list[nn.Parameter]:
        """The masked weights (all, or those of the named matrices)."""
        return [p for name, p, _ in self._bound if names is None or name in names]

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradient of every pruned entry (before each optimizer step: Adam never sees them)."""
        for _, param, mask in self._bound:
            if param.grad is not None:
                param.grad.mul_(mask)

    @torch.no_grad()
    def apply(self) -> None:
        """Multiply every weight by its mask (after each optimizer step)."""
        for _, param, mask in self._bound:
            param.mul_(mask)

    @torch.no_grad()
    def nonzero_pruned(self) -> int:
        """How many pruned entries are not exactly zero (0 unless something is wrong)."""
        return sum(int(param[~mask].ne(0).sum()) for _, param, mask in self._bound)

    @torch.no_grad()
    def pruned_count(self) -> int:
        return sum(int((~mask).sum()) for _, _, mask in self._bound)

    def check(self, where: str) -> None:
        leaked = self.nonzero_pruned()
        if leaked:
            raise MaskError(f"{leaked} pruned weights are no longer zero after {where} (internal error)")


def zero_counts(lm: LoadedModel) -> dict[str, int]:
    """Exact zeros per prunable matrix: recovery reports them before and after (they must be equal)."""
    with torch.no_grad():
        return {m.name: int(m.weight(lm.model).eq(0).sum()) for m in lm.prunable}

"""A complete pruning-method plug-in in one file: the method, its options, one registration call.

Rule ("toy-half"): in every row of every prunable matrix, rank the weights by |w| and keep
every `keep_every`-th of them (ranks 0, k, 2k, ...), zeroing the rest — half the weights for
the default k = 2, whatever `--sparsity` says (hence `exact_counts=False`). Importing this
module registers the method; a study lists it under `plugins: [toy_method]` so that its
worker processes import it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.errors import ConfigError
from prunelab.pruning.registry import MethodSpec, register_method


@dataclass(frozen=True)
class ToyOptions:
    keep_every: int = 2  # keep one weight in every `keep_every`, by |w| rank within its row

    def __post_init__(self) -> None:
        if not isinstance(self.keep_every, int) or self.keep_every < 1:
            raise ConfigError(f"toy-half: keep_every must be a positive integer, got {self.keep_every!r}")


def prune_toy(lm, config, calib, progress=None) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Keep ranks 0, k, 2k, ... of |w| in each row; masks applied in place, as the registry contract says."""
    k = config.options.keep_every
    masks: dict[str, torch.Tensor] = {}
    for i, m in enumerate(lm.prunable):
        w = m.weight(lm.model)
        order = w.detach().abs().float().argsort(dim=1, descending=True, stable=True)
        keep = torch.zeros(w.shape, dtype=torch.bool)
        keep.scatter_(1, order[:, ::k], True)
        w.masked_fill_(~keep, 0)
        masks[m.name] = keep
        if progress:
            progress(m.name, i + 1, len(lm.prunable))
    return masks


register_method(MethodSpec(
    "toy-half", "toy_method:prune_toy", description="toy: keep every other weight of each row by |w| rank",
    patterns=("unstructured",), exact_counts=False, options=ToyOptions,
))

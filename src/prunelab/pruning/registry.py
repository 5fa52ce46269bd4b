"""Method name → implementation, imported lazily so `prunelab --help` stays fast.

A method is a function `fn(lm, config, calib, progress) -> dict[str, torch.Tensor]`:

- `lm`: the `LoadedModel` to prune in place; `config`: the `PruneConfig`;
- `calib`: the calibration batches (`list[dict[str, Tensor]]`, model-ready forward kwargs,
  batch 1 each) when `config.needs_calibration`, else None;
- `progress`: None or `progress(message, done, total)`;
- returns keep-masks (bool, (out, in), True = kept) by `PrunableMatrix.name`, **already applied**
  to the model's weights (methods that update weights, like SparseGPT, must do so themselves).

Warnings the user should see (e.g. a raised dampening) are issued with
`warnings.warn(msg, PruneWarning)`; `prune()` records them in `PruneResult.warnings`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from prunelab.errors import ConfigError

METHOD_REGISTRY: dict[str, str] = {
    "magnitude": "prunelab.pruning.magnitude:prune_global",
    "magnitude-layer": "prunelab.pruning.magnitude:prune_layerwise",
    "wanda": "prunelab.pruning.wanda:prune_wanda",
    "sparsegpt": "prunelab.pruning.sparsegpt:prune_sparsegpt",
    "structured": "prunelab.pruning.structured:prune_structured",
}


class PruneWarning(UserWarning):
    """Something the user should know about a finished pruning run (recorded in the report)."""


def get_method(name: str) -> Callable[..., Any]:
    """The function registered for `name`, imported on first use."""
    target = METHOD_REGISTRY.get(name)
    if target is None:
        raise ConfigError(f"method '{name}' is not available: choose one of {', '.join(METHOD_REGISTRY)}")
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)

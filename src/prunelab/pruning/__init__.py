"""Pruning: one small module per method behind `prune(lm, config) -> PruneResult`.

- `magnitude` (global |w| ranking), `magnitude-layer` (per-matrix |w|) — magnitude.py
- `wanda` (|W|·‖X‖ per output row) — wanda.py; `sparsegpt` (OBS reconstruction) — sparsegpt.py
- `structured` (remove neurons / heads, a smaller dense model) — structured.py
- `alps` (ADMM layer reconstruction + PCG on the support) — alps.py; row-swap mask refinement — refine.py
- N:M and exact-k mask selection — patterns.py; OWL per-block ratios — owl.py
- the block-by-block calibration runner shared by calibrated methods — sequential.py
- the method registry (`MethodSpec`, `METHODS`, `register_method`) — registry.py

Names are imported on first use (PEP 562), so `import prunelab.pruning.registry` (the CLI's
`--method` help) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prune": "engine", "save_pruned": "engine", "peak_rss_bytes": "engine",
    "METHODS": "registry", "MethodOutput": "registry", "MethodSpec": "registry", "NoOptions": "registry",
    "PruneWarning": "registry", "get_method": "registry", "get_method_spec": "registry",
    "method_option_names": "registry", "register_method": "registry",
    "MatrixReport": "types", "PruneConfig": "types", "PruneResult": "types", "PruningError": "types",
    "parse_pattern": "types",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prunelab.pruning' has no attribute '{name}'")
    return getattr(importlib.import_module(f"prunelab.pruning.{module}"), name)

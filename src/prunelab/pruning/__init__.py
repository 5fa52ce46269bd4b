"""Pruning: one small module per method behind `prune(lm, config) -> PruneResult`.

- `magnitude` (global |w| ranking), `magnitude-layer` (per-matrix |w|) — magnitude.py
- `wanda` (|W|·‖X‖ per output row) — wanda.py; `sparsegpt` (OBS reconstruction) — sparsegpt.py
- N:M and exact-k mask selection — patterns.py; OWL per-block ratios — owl.py
- the block-by-block calibration runner shared by calibrated methods — sequential.py
- method registry (name → "module:function", lazy) — registry.py
"""

from prunelab.pruning.engine import peak_rss_bytes, prune, save_pruned
from prunelab.pruning.registry import METHOD_REGISTRY, PruneWarning, get_method
from prunelab.pruning.types import METHODS, MatrixReport, PruneConfig, PruneResult, PruningError, parse_pattern

__all__ = [
    "METHODS", "METHOD_REGISTRY", "MatrixReport", "PruneConfig", "PruneResult", "PruneWarning", "PruningError",
    "get_method", "parse_pattern", "peak_rss_bytes", "prune", "save_pruned",
]

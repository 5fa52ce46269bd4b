"""`prunelab recover PRUNED --teacher DENSE --out DIR`: recovery for a checkpoint pruned anywhere.

The mask is read from the checkpoint's zeros; everything is checked before any training (same
architecture, vocabulary and shapes, a float checkpoint, a recovery text that is no evaluation
split), and the output is written atomically with a `prune_report.json` that carries the recovery.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prunelab.data.calibration import calibration_set
from prunelab.errors import ConfigError
from prunelab.pruning.engine import recount, save_pruned
from prunelab.pruning.quantize import gptq_on_masks
from prunelab.pruning.sequential import ProgressFn
from prunelab.pruning.types import PruneConfig, PruneResult
from prunelab.recovery.api import check_pair, recover
from prunelab.recovery.config import RecoveryConfig
from prunelab.recovery.data import check_recovery_texts
from prunelab.recovery.masks import masks_from_zeros


def _prior_report(path: str) -> dict[str, Any]:
    report = Path(path) / "prune_report.json"
    return json.loads(report.read_text()) if report.is_file() else {}


def recover_checkpoint(pruned: str, teacher: str, config: RecoveryConfig, out_dir: str | Path, *,
                       state_dir: Path | None = None, quant: str | None = None, group_size: int | None = None,
                       format: str = "hf", progress: ProgressFn | None = None) -> PruneResult:
    """Load both models, recover, optionally quantize (GPTQ on the mask), save; the result."""
    from prunelab.storage import load

    if format not in ("hf", "sparse"):
        raise ConfigError(f"unknown --format '{format}': use hf or sparse")
    config.validate()
    check_recovery_texts(config)  # a refused text: nothing loaded, nothing written
    t0 = time.perf_counter()
    student = load(pruned)
    dense = load(teacher)
    check_pair(student, dense)
    masks = masks_from_zeros(student)
    if not any((~m).any() for m in masks.values()):
        raise ConfigError(f"{pruned} has no zeros in its prunable matrices: prune it first (prunelab prune)")
    prior = _prior_report(pruned)
    pconfig = PruneConfig(method=(prior.get("config") or {}).get("method", "magnitude"), sparsity=0.0,
                          calib=config.calib, calib_column=config.calib_column, nsamples=config.nsamples,
                          seqlen=config.seqlen, seed=config.seed, quant=quant, group_size=group_size)
    rec = recover(student, dense, config, masks=masks, state_dir=state_dir, progress=progress)
    del dense
    result = PruneResult(config=pconfig, masks=masks)
    result.extra["recovery"] = rec.to_dict() | {"pruned_checkpoint": str(pruned), "teacher": str(teacher)}
    result.extra["pruned_with"] = prior.get("config")
    result.timings["recovery"] = rec.wall_s
    if quant is not None:
        t1 = time.perf_counter()
        calib = calibration_set(student, pconfig).inputs
        result.extra["quantization"] = gptq_on_masks(student, pconfig, masks, calib, progress)
        result.timings["quantize"] = time.perf_counter() - t1
    recount(student, result)
    result.timings["total"] = time.perf_counter() - t0
    result.peak_rss_bytes = rec.peak_rss_bytes
    save_pruned(student, result, out_dir, format=format, extra={"wall_time_s": time.perf_counter() - t0})
    return result

"""Prune, recover, then quantize: the order `prune --recover … --quant …` runs in.

Recovery trains float weights, so a quantized run prunes in float first, recovers, and only then
puts the recovered kept weights on the integer grid with the same joint GPTQ step the
reconstructing methods use (`gptq_on_masks`). Everything lands in one `PruneResult`, whose
`recovery` section says what recovery did.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from prunelab.data.calibration import calibration_set
from prunelab.models.types import LoadedModel
from prunelab.pruning.engine import peak_rss_bytes, prune, recount
from prunelab.pruning.quantize import gptq_on_masks
from prunelab.pruning.sequential import ProgressFn
from prunelab.pruning.types import PruneConfig, PruneResult
from prunelab.recovery.api import recover
from prunelab.recovery.config import RecoveryConfig


def recovery_for(config: PruneConfig, recovery: RecoveryConfig) -> RecoveryConfig:
    """The recovery recipe calibrated on the prune's own windows (same source, count, length and seed)."""
    return dataclasses.replace(recovery, calib=config.calib, calib_column=config.calib_column,
                               nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed)


def prune_and_recover(lm: LoadedModel, config: PruneConfig, recovery: RecoveryConfig,
                      load_teacher: Callable[[], LoadedModel], *, state_dir: str | Path | None = None,
                      progress: ProgressFn | None = None) -> PruneResult:
    """Prune `lm` in place with `config`, recover it against `load_teacher()`, then quantize if asked."""
    float_config = dataclasses.replace(config, quant=None, group_size=None)
    result = prune(lm, float_config, progress=progress)
    recovery = recovery_for(config, recovery)
    teacher = load_teacher()
    rec = recover(lm, teacher, recovery, masks=result.masks, state_dir=state_dir, progress=progress)
    del teacher
    result.extra["recovery"] = rec.to_dict()
    result.timings["recovery"] = rec.wall_s
    result.config = config
    if config.quant is not None:
        t0 = time.perf_counter()
        calib = calibration_set(lm, config).inputs
        result.extra["quantization"] = gptq_on_masks(lm, config, result.masks, calib, progress)
        result.extra["quantization"]["after_recovery"] = True
        result.timings["quantize"] = time.perf_counter() - t0
    recount(lm, result)
    result.timings["total"] = sum(v for k, v in result.timings.items() if k != "total")
    result.peak_rss_bytes = peak_rss_bytes()
    return result

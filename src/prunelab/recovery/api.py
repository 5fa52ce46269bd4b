"""`recover()`: train a pruned model's kept weights against its dense teacher, mask fixed.

Stages run in the order `block`, then `distill` (`RecoveryConfig.mode`). With a `state_dir` every
finished stage and every distillation checkpoint is kept there, so a killed run started again with
the same arguments continues where it stopped (and ends with the same weights). The pruned entries
are counted before and after: recovery never refills a zero.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from prunelab.data.calibration import calibration_set
from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel
from prunelab.pruning.engine import peak_rss_bytes
from prunelab.pruning.sequential import ProgressFn
from prunelab.recovery.block import reconstruct_blocks
from prunelab.recovery.config import RecoveryConfig
from prunelab.recovery.data import check_recovery_texts, recovery_windows
from prunelab.recovery.distill import DistillState, distill, trainable_named
from prunelab.recovery.masks import MaskGuard, masks_from_zeros, zero_counts
from prunelab.recovery.state import read_state, write_state


@dataclass
class RecoveryResult:
    """What recovery did; `to_dict()` is the `recovery` section of `prune_report.json`."""

    config: RecoveryConfig
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    pruned_entries: int = 0
    zeros_before: int = 0
    zeros_after: int = 0
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    resumed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "stages": self.stages, "data": self.data,
            "pruned_entries": self.pruned_entries, "zeros_before": self.zeros_before,
            "zeros_after": self.zeros_after, "wall_s": self.wall_s, "peak_rss_bytes": self.peak_rss_bytes,
            "resumed": self.resumed,
        }


def check_pair(student: LoadedModel, teacher: LoadedModel) -> None:
    """Teacher and student must be the same architecture with the same vocabulary and shapes."""
    s_cfg, t_cfg = student.config, teacher.config
    if type(student.model) is not type(teacher.model) or s_cfg.model_type != t_cfg.model_type:
        raise ConfigError(f"teacher {teacher.name} ({t_cfg.model_type}) and student {student.name} "
                          f"({s_cfg.model_type}) are different architectures: pass the dense model the student "
                          "was pruned from")
    s_vocab, t_vocab = getattr(s_cfg, "vocab_size", None), getattr(t_cfg, "vocab_size", None)
    if s_vocab != t_vocab:
        raise ConfigError(f"teacher vocabulary {t_vocab} ≠ student vocabulary {s_vocab}: pass the dense model "
                          "the student was pruned from")
    t_shapes = {m.name: (m.out_features, m.in_features) for m in teacher.prunable}
    for m in student.prunable:
        if t_shapes.get(m.name) != (m.out_features, m.in_features):
            raise ConfigError(f"teacher has no matrix {m.name} of shape ({m.out_features}, {m.in_features}): "
                              "pass the dense model the student was pruned from (structured pruning changes shapes)")
    if student.quant:
        raise ConfigError(f"{student.name} is quantized: recover the float checkpoint, then quantize")
    if student.offload is not None or teacher.offload is not None:
        raise ConfigError("recovery needs both models in memory: load them with --offload none")


def _fingerprint(config: RecoveryConfig, masks: dict[str, torch.Tensor], teacher: LoadedModel) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(teacher.source).encode())
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].numpy().reshape(-1)).tobytes())
    return h.hexdigest()


def recover(student: LoadedModel, teacher: LoadedModel, config: RecoveryConfig, *,
            masks: dict[str, torch.Tensor] | None = None, state_dir: str | Path | None = None,
            progress: ProgressFn | None = None) -> RecoveryResult:
    """Recover `student` in place against `teacher`; `masks` default to the student's zeros."""
    config.validate()
    check_pair(student, teacher)
    if student.processor is None:  # speech models calibrate on synthesized audio, not on a text source
        check_recovery_texts(config)
    if "distill" in config.stages and student.family == "encoder-decoder":
        raise ConfigError("--recover distill covers decoder and encoder models; use --recover block for "
                          "encoder-decoder models")
    t0 = time.perf_counter()
    masks = masks if masks is not None else masks_from_zeros(student)
    result = RecoveryResult(config=config)
    before = zero_counts(student)
    result.zeros_before = sum(before.values())
    guard = MaskGuard(student, masks)
    result.pruned_entries = guard.pruned_count()
    guard.apply()
    guard.check("loading")
    fp = _fingerprint(config, masks, teacher)
    state = Path(state_dir) if state_dir is not None else None
    grads = {id(p): p.requires_grad for p in student.model.parameters()}
    for p in student.model.parameters():
        p.requires_grad_(False)
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    try:
        if "block" in config.stages:
            result.stages["block"] = _block_stage(student, teacher, guard, config, state, fp, result, progress)
        if "distill" in config.stages:
            result.stages["distill"] = _distill_stage(student, teacher, guard, config, state, fp, result, progress)
    finally:
        for p in student.model.parameters():
            p.requires_grad_(grads.get(id(p), False))
    guard.check("recovery")
    after = zero_counts(student)
    result.zeros_after = sum(after.values())
    result.wall_s = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _block_stage(student: LoadedModel, teacher: LoadedModel, guard: MaskGuard, config: RecoveryConfig,
                 state: Path | None, fp: str, result: RecoveryResult, progress: ProgressFn | None) -> dict[str, Any]:
    params = trainable_named(student, guard, config.train_norms)
    for p in params.values():
        p.requires_grad_(False)
    if state is not None and (done := read_state(state / "block", params, fp)) is not None:
        result.resumed.append("block")
        return dict(done["report"])
    cs = calibration_set(student, config)
    for p in params.values():
        p.requires_grad_(True)
    report = reconstruct_blocks(student, teacher, guard, cs.inputs, config, progress)
    for p in params.values():
        p.requires_grad_(False)
    report["calibration"] = cs.info
    if state is not None:
        write_state(state / "block", params, {"report": report}, fp)
    return report


def _distill_stage(student: LoadedModel, teacher: LoadedModel, guard: MaskGuard, config: RecoveryConfig,
                   state: Path | None, fp: str, result: RecoveryResult, progress: ProgressFn | None) -> dict[str, Any]:
    if progress is not None:
        progress(f"distill: preparing {config.data} text", 0, 1)
    windows, info = _cached_windows(teacher, config, state, fp)
    result.data = info
    encoder = student.family == "encoder"  # no LM head: match the embeddings themselves
    report = distill(student, teacher, guard, windows, config,
                     state=DistillState(state / "distill" if state is not None else None, fp),
                     progress=progress, forward=_encoder_forward if encoder else None,
                     objective="mse" if encoder else "kl")
    if report["resumed_at_steps"]:
        result.resumed.append(f"distill@{report['resumed_at_steps'][-1]}")
    return report


def _cached_windows(teacher: LoadedModel, config: RecoveryConfig, state: Path | None,
                    fp: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Recovery text, kept in the state folder: generated text is not sampled twice across a resume."""
    path = state / "windows.safetensors" if state is not None else None
    if path is not None and path.is_file():
        meta = json.loads((state / "windows.json").read_text())  # type: ignore[operator]
        if meta.get("fingerprint") == fp:
            return load_file(str(path))["windows"], meta["info"]
    windows, info = recovery_windows(teacher, config, config.calib, config.calib_column)
    if path is not None and state is not None:
        state.mkdir(parents=True, exist_ok=True)
        save_file({"windows": windows.contiguous()}, str(path))
        (state / "windows.json").write_text(json.dumps({"fingerprint": fp, "info": info}))
    return windows, info


class _EncoderOut:
    """An encoder's last hidden state in the place of logits (compared by MSE, not KL)."""

    def __init__(self, out: Any) -> None:
        self.hidden_states = out.hidden_states
        self.logits = out.hidden_states[-1]  # the last hidden state, with or without an MLM head on top


def _encoder_forward(lm: LoadedModel, ids: torch.Tensor, hidden: bool) -> Any:
    return _EncoderOut(lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True))

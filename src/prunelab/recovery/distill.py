"""Distillation with the mask fixed: the dense model teaches the sparse one end to end.

The loss is the KL divergence from the teacher's next-token distribution to the student's, at a
temperature `T` (scaled by T², Hinton et al.), plus optionally SquareHead's per-block normalised
hidden-state MSE (Kurtic et al., arXiv 2310.06927). Only the teacher's outputs are targets — never
the text's own next tokens — so a dense model trained the same way would not move: no part of the
gain can be domain adaptation to the text.

Only the kept weights of the prunable matrices (and, optionally, norms and biases) are trained;
embeddings and the head stay as they are. The order of the windows is a function of (seed, epoch)
and there is no other randomness, so a run that is killed and resumed from its last checkpoint
(every `checkpoint_every_s` seconds: the trained tensors, Adam's state and the loss curve, written
atomically) ends with exactly the weights of a run that was never interrupted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.models.blocks import block_prefix
from prunelab.models.types import LoadedModel
from prunelab.pruning.sequential import ProgressFn
from prunelab.recovery.config import RecoveryConfig
from prunelab.recovery.masks import MaskGuard
from prunelab.recovery.state import read_state, write_state


def trainable_named(lm: LoadedModel, guard: MaskGuard, train_norms: bool) -> dict[str, nn.Parameter]:
    """Name → parameter of everything distillation trains (masked weights, plus 1-D block parameters)."""
    masked = {id(p) for p in guard.parameters()}
    out: dict[str, nn.Parameter] = {}
    block_prefixes = {block_prefix(m.name) for m in lm.prunable}
    for name, p in lm.model.named_parameters():
        if id(p) in masked:
            out[name] = p
        elif train_norms and p.dim() == 1 and any(name.startswith(pre + ".") for pre in block_prefixes):
            out[name] = p
    for p in lm.model.parameters():
        p.requires_grad_(False)  # no gradient for the embeddings and head: a third of the backward saved
    for p in out.values():
        p.requires_grad_(True)
    return out


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) at temperature T, times T²."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)
    return kl.mean() * t * t


def hidden_nmse(student_h: tuple[torch.Tensor, ...], teacher_h: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """SquareHead: mean over blocks of ‖h_s − h_t‖² / ‖h_t‖² (embedding output excluded)."""
    terms = [(s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student_h[1:], teacher_h[1:], strict=True)]
    return torch.stack(terms).mean()


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 0."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def batch_order(n_windows: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Window indices of every step: a fresh seeded permutation per pass over the windows."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order += torch.randperm(n_windows, generator=gen).tolist()
        epoch += 1
    return [order[i * batch : (i + 1) * batch] for i in range(steps)]


class DistillState:
    """The checkpoint folder of one distillation run (None: no checkpoints) and its fingerprint."""

    def __init__(self, folder: Path | None, fingerprint: str) -> None:
        self.folder, self.fingerprint = folder, fingerprint

    def load(self, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict[str, Any] | None:
        return read_state(self.folder, params, self.fingerprint, opt)

    def save(self, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
        if self.folder is not None:
            write_state(self.folder, params, meta, self.fingerprint, opt)


def _forward_kwargs(lm: LoadedModel, ids: torch.Tensor) -> dict[str, Any]:
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if lm.family == "decoder":
        kw["use_cache"] = False
    return kw


def distill(student: LoadedModel, teacher: LoadedModel, guard: MaskGuard, windows: torch.Tensor,
            config: RecoveryConfig, *, state: DistillState | None = None, progress: ProgressFn | None = None,
            forward: Callable[[LoadedModel, torch.Tensor, bool], Any] | None = None,
            objective: str = "kl") -> dict[str, Any]:
    """Train `student` to match `teacher` on `windows` (n, seqlen) token ids for `config.tokens` tokens.

    `forward(lm, ids, hidden)` returns an object with `.logits` (and `.hidden_states` when `hidden`);
    the default runs a decoder-only LM. `objective` "kl" compares next-token distributions; "mse" the
    outputs themselves (an encoder's embeddings). Resumes from `state` when it holds this run's checkpoint.
    """
    forward = forward or (lambda lm, ids, hidden: lm.model(**_forward_kwargs(lm, ids), output_hidden_states=hidden))
    state = state or DistillState(None, "")
    t0 = time.perf_counter()
    seqlen = int(windows.shape[1])
    steps = max(1, math.ceil(config.tokens / (config.distill_batch * seqlen)))
    order = batch_order(int(windows.shape[0]), config.distill_batch, steps, config.seed)
    params = trainable_named(student, guard, config.train_norms)
    opt = torch.optim.Adam(list(params.values()), lr=config.distill_lr)
    meta = state.load(params, opt) or {"step": 0, "curve": [], "wall_s": 0.0, "resumed_at": []}
    if meta["step"]:
        meta["resumed_at"].append(meta["step"])
    if config.grad_checkpointing and hasattr(student.model, "gradient_checkpointing_enable"):
        student.model.gradient_checkpointing_enable()
    student.model.eval()  # no dropout: the run must be a function of (seed, step)
    teacher.model.eval()
    hidden = config.hidden_mse > 0
    last_save, running = time.perf_counter(), None
    wall_before = float(meta["wall_s"])
    for step in range(int(meta["step"]), steps):
        ids = windows[order[step]]
        with torch.no_grad(), config.autocast():
            t_out = forward(teacher, ids, hidden)
        with config.autocast():
            s_out = forward(student, ids, hidden)
        if objective == "kl":
            loss = kl_loss(s_out.logits, t_out.logits, config.temperature)
        else:
            loss = (s_out.logits - t_out.logits).pow(2).mean() / t_out.logits.pow(2).mean().clamp_min(1e-12)
        if hidden:
            loss = loss + config.hidden_mse * hidden_nmse(s_out.hidden_states, t_out.hidden_states)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, config.distill_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        guard.mask_grads()
        opt.step()
        guard.apply()
        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        meta["curve"].append([(step + 1) * ids.numel(), value])
        meta["step"] = step + 1
        elapsed = wall_before + time.perf_counter() - t0
        meta["wall_s"] = elapsed
        if progress is not None:
            done_tokens = (step + 1) * ids.numel()
            rate = (done_tokens - int(meta["resumed_at"][-1] if meta["resumed_at"] else 0) * ids.numel()) / max(
                1e-9, time.perf_counter() - t0)
            progress(f"distill: loss {running:.4f}, {rate:,.0f} tokens/s", step + 1, steps)
        if time.perf_counter() - last_save >= config.checkpoint_every_s and step + 1 < steps:
            state.save(params, opt, meta)
            last_save = time.perf_counter()
    if config.grad_checkpointing and hasattr(student.model, "gradient_checkpointing_disable"):
        student.model.gradient_checkpointing_disable()
    for p in params.values():
        p.requires_grad_(False)
    guard.check("distillation")
    return {
        "tokens": steps * config.distill_batch * seqlen, "steps": steps, "batch": config.distill_batch,
        "seqlen": seqlen, "lr": config.distill_lr, "temperature": config.temperature,
        "hidden_mse": config.hidden_mse, "objective": objective, "windows": int(windows.shape[0]),
        "loss_curve": meta["curve"], "resumed_at_steps": meta["resumed_at"],
        "wall_s": float(meta["wall_s"]), "trained_tensors": len(params),
    }

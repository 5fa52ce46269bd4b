"""Block-wise reconstruction: train each pruned block's kept weights to reproduce the dense block.

Pruning methods (sparsegpt, alps) reconstruct one matrix at a time; the error they leave compounds
through the nonlinearities of a block and through the blocks after it. Training the *whole block*
against the dense model's output fixes what a per-matrix solve cannot, for the cost of a few epochs
over the calibration windows (EBFT, arXiv 2402.12419).

The calibration windows are pushed through the sparse model (the student) and the dense model (the
teacher) side by side, one block at a time, with the pruning engine's own block capture
(`SequentialRunner`): for block `i`, the student's block sees the student's stream (every earlier
block already recovered), and its target is

* `dense`: the teacher's block `i` output on the teacher's own stream — the block also learns to
  undo the drift the pruned blocks before it let through (the default, it measures better);
* `local`: the teacher's block `i` applied to the student's stream — only the block's own error.

Adam on the normalised MSE ‖Y_s − Y_d‖² / ‖Y_d‖², a cosine schedule, and early stopping on
held-out windows: the best epoch's weights are kept, and a block that only got worse keeps its
starting weights. Memory is both models plus one block's activations for the calibration set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prunelab.models.blocks import (
    BlockInput,
    BlockRef,
    call_block,
    capture_block_kwargs,
    mixed_layer_types,
    stack_blocks,
)
from prunelab.models.types import LoadedModel, Stack
from prunelab.pruning.sequential import ProgressFn, SequentialRunner, batch_samples
from prunelab.recovery.config import RecoveryConfig
from prunelab.recovery.masks import MaskGuard


class _NoStats:
    def add(self, x: torch.Tensor) -> None:  # the runner's hooks are never installed here
        pass


def _stacks(lm: LoadedModel, batches: list[dict[str, Any]]) -> Iterator[tuple[list[BlockRef], list[BlockInput]]]:
    """(blocks, captured inputs per batch) per stack, in execution order; lazily, so the decoder of an
    encoder-decoder captures its inputs from the encoder as recovered by then."""
    runner = SequentialRunner(lm, lambda m: _NoStats())
    stacks = runner.stacks(batches)
    while True:
        with torch.no_grad():  # the decoder's runners run the encoder as they are built: no graph kept
            try:
                blocks, runners = next(stacks)
            except StopIteration:
                return
            inputs = runner.capture_inputs(blocks, runners)
            if mixed_layer_types(lm.config):
                per_block = [capture_block_kwargs(r, blocks) for r in runners]
                for ci, inp in enumerate(inputs):
                    inp.kwargs = {"__per_block__": per_block[ci]}
        yield blocks, inputs


def _kwargs(inp: BlockInput, index: int) -> dict[str, Any]:
    per_block = inp.kwargs.get("__per_block__")
    return dict(per_block[index]) if per_block is not None else inp.kwargs


def _forward(block: BlockRef, pos: int, inp: BlockInput, *, keep: bool = False) -> torch.Tensor:
    """Block `pos` of its stack on one batch. `keep`: let the block update shared kwargs (T5's
    position bias from block 0) for the blocks after it — only on the final, no-grad pass."""
    kwargs = _kwargs(inp, pos)
    if keep and "__per_block__" not in inp.kwargs:
        return call_block(block.module, inp)
    return call_block(block.module, BlockInput(inp.hidden, dict(kwargs)))


def nmse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖out − target‖² / ‖target‖²: comparable across blocks whose activations differ by orders of magnitude."""
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def trainable(block: BlockRef, guard: MaskGuard, train_norms: bool) -> list[nn.Parameter]:
    """The block's masked weights, plus (optionally) its 1-D parameters: norms and biases."""
    params = guard.parameters({m.name for m in block.matrices})
    if train_norms:
        ids = {id(p) for p in params}
        params += [p for p in block.module.parameters() if p.dim() == 1 and id(p) not in ids]
    return params


class _BlockTrainer:
    """Trains one block: epochs of Adam, held-out loss per epoch, best state kept."""

    def __init__(self, block: BlockRef, pos: int, params: list[nn.Parameter], guard: MaskGuard,
                 config: RecoveryConfig, gen: torch.Generator) -> None:
        self.block, self.pos, self.params, self.guard, self.config, self.gen = block, pos, params, guard, config, gen

    @torch.no_grad()
    def held_out_loss(self, inputs: list[BlockInput], targets: list[torch.Tensor]) -> float:
        losses = [float(nmse(_forward(self.block, self.pos, x), y)) for x, y in zip(inputs, targets, strict=True)]
        return sum(losses) / max(1, len(losses))

    def fit(self, train: list[tuple[BlockInput, torch.Tensor]],
            held: list[tuple[BlockInput, torch.Tensor]]) -> dict[str, Any]:
        cfg = self.config
        opt = torch.optim.Adam(self.params, lr=cfg.block_lr)
        total = cfg.block_epochs * len(train)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        held_in, held_tg = [x for x, _ in held], [y for _, y in held]
        monitor = (held_in, held_tg) if held else ([x for x, _ in train], [y for _, y in train])
        start = best = self.held_out_loss(*monitor)
        best_state = [p.detach().clone() for p in self.params]
        curve, stale, epochs, train_loss = [start], 0, 0, float("nan")
        self.block.module.train()
        for _ in range(cfg.block_epochs):
            epochs += 1
            train_losses: list[float] = []
            for i in torch.randperm(len(train), generator=self.gen).tolist():
                x, y = train[i]
                with cfg.autocast():
                    out = _forward(self.block, self.pos, x)
                loss = nmse(out.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                self.guard.mask_grads()
                opt.step()
                sched.step()
                self.guard.apply()
                train_losses.append(loss.item())
            train_loss = sum(train_losses) / max(1, len(train_losses))
            self.block.module.eval()
            val = self.held_out_loss(*monitor)
            self.block.module.train()
            curve.append(val)
            if val < best:
                best, stale = val, 0
                best_state = [p.detach().clone() for p in self.params]
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        self.block.module.eval()
        with torch.no_grad():
            for p, b in zip(self.params, best_state, strict=True):
                p.copy_(b)
        return {"loss_before": start, "loss_after": best, "epochs": epochs, "held_out_curve": curve,
                "train_loss_last_epoch": train_loss, "steps": epochs * len(train)}


def reconstruct_blocks(student: LoadedModel, teacher: LoadedModel, guard: MaskGuard,
                       calib: list[dict[str, torch.Tensor]], config: RecoveryConfig,
                       progress: ProgressFn | None = None) -> dict[str, Any]:
    """Recover every block of `student` against `teacher` in place; a report per block."""
    t0 = time.perf_counter()
    batches = batch_samples(calib, config.block_batch)
    n_held = min(len(batches) - 1, math.ceil(config.holdout / config.block_batch)) if config.holdout else 0
    gen = torch.Generator().manual_seed(config.seed)
    blocks_report: list[dict[str, Any]] = []
    student.model.eval()
    teacher.model.eval()
    total = _total_blocks(student)
    for (s_blocks, s_in), (t_blocks, t_in) in zip(_stacks(student, batches), _stacks(teacher, batches), strict=True):
        for pos, (sb, tb) in enumerate(zip(s_blocks, t_blocks, strict=True)):
            tb0 = time.perf_counter()
            with torch.no_grad():
                if config.target == "dense":
                    targets = [_forward(tb, pos, x, keep=True) for x in t_in]
                else:
                    targets = [_forward(tb, pos, x) for x in s_in]
            pairs = list(zip(s_in, targets, strict=True))
            held, train = pairs[len(pairs) - n_held:], pairs[: len(pairs) - n_held]
            trainer = _BlockTrainer(sb, pos, trainable(sb, guard, config.train_norms), guard, config, gen)
            stats = trainer.fit(train, held)
            with torch.no_grad():
                for x in s_in:
                    x.hidden = _forward(sb, pos, x, keep=True)
                if config.target == "dense":
                    for x, y in zip(t_in, targets, strict=True):
                        x.hidden = y
            stats.update(block=sb.label, seconds=time.perf_counter() - tb0)
            blocks_report.append(stats)
            if progress is not None:
                progress(f"block {sb.label}: held-out nmse {stats['loss_before']:.4f} → {stats['loss_after']:.4f}",
                         len(blocks_report), total)
    guard.check("block-wise reconstruction")
    return {
        "target": config.target, "epochs": config.block_epochs, "lr": config.block_lr, "batch": config.block_batch,
        "holdout_windows": n_held * config.block_batch, "train_norms": config.train_norms,
        "windows": len(calib), "blocks": blocks_report, "wall_s": time.perf_counter() - t0,
        "loss_curve": [b["loss_after"] for b in blocks_report],
    }


def _total_blocks(lm: LoadedModel) -> int:
    stacks: tuple[Stack, ...] = ("encoder", "decoder") if lm.family == "encoder-decoder" else (
        ("encoder",) if lm.family == "encoder" else ("decoder",))
    return sum(len(stack_blocks(lm, s)) for s in stacks)

"""Mask-preserving fine-tuning of a sequence classifier built from a (pruned) model.

The failure this prevents: fine-tuning after pruning refills the zeros, so the accuracy that
gets reported belongs to a dense model. Before training we record mask = (w != 0) for every
prunable matrix; after every backward pass the gradients of pruned weights are zeroed, and
after every optimizer step the mask is re-applied (AdamW's weight decay and moment estimates
cannot move a weight whose mask is False). Sparsity is measured before and after, and any
difference raises `MaskViolationError` rather than returning a number.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prunelab.data.glue import GlueSplit
from prunelab.evaluation.common import backbone, encode_texts, length_batches, pad_batch, pad_id_of
from prunelab.evaluation.types import EvalOptions
from prunelab.models.discovery import find_prunable
from prunelab.models.types import LoadedModel

Seqs = list[list[int]]  # token ids per example


class MaskViolationError(RuntimeError):
    """Pruned weights became non-zero during fine-tuning: a bug, never a user error."""


@dataclass
class MaskedParam:
    name: str
    param: torch.nn.Parameter
    mask: torch.Tensor  # bool, same layout as `param` (True = kept)
    pruned: torch.Tensor  # ~mask, kept precomputed: masked_fill_ with it is the cheapest re-application


def record_masks(model: torch.nn.Module, family: str) -> list[MaskedParam]:
    """mask = (w != 0) for every prunable matrix of `model`, recorded before any training."""
    masks = []
    for m in find_prunable(model, family):  # type: ignore[arg-type]
        param = m.module(model).weight
        mask = param.detach() != 0
        masks.append(MaskedParam(m.name, param, mask, ~mask))
    return masks


@torch.no_grad()
def mask_grads(masks: list[MaskedParam]) -> None:
    for mp in masks:
        if mp.param.grad is not None:
            mp.param.grad.masked_fill_(mp.pruned, 0.0)


@torch.no_grad()
def apply_masks(masks: list[MaskedParam]) -> None:
    for mp in masks:
        mp.param.masked_fill_(mp.pruned, 0.0)


@torch.no_grad()
def zero_counts(masks: list[MaskedParam]) -> tuple[int, int]:
    """(zeros, total) over the masked matrices, counted from the weights themselves."""
    zeros = sum(int((mp.param == 0).sum()) for mp in masks)
    total = sum(mp.param.numel() for mp in masks)
    return zeros, total


@torch.no_grad()
def check_masks(masks: list[MaskedParam], zeros_before: int) -> int:
    """Raise unless every pruned weight is still exactly zero and the zero count is unchanged."""
    for mp in masks:
        leaked = int(((mp.param != 0) & mp.pruned).sum())
        if leaked:
            raise MaskViolationError(f"{leaked} pruned weights of {mp.name} became non-zero during fine-tuning")
    zeros_after, total = zero_counts(masks)
    if zeros_after != zeros_before:
        raise MaskViolationError(
            f"sparsity changed during fine-tuning: {zeros_before}/{total} zeros before, {zeros_after}/{total} after"
        )
    return zeros_after


def build_classifier(lm: LoadedModel, num_labels: int, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An HF *ForSequenceClassification of the same architecture carrying lm's (possibly pruned) weights.

    Built from the in-memory model rather than re-read from disk, so a model pruned in place
    is fine-tuned with its zeros; only the classification head (and a pooler the LM lacked)
    starts from a seeded random initialisation.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.model.config)
    config.num_labels = num_labels
    config.problem_type = "single_label_classification"
    config.pad_token_id = pad_id_of(lm.tokenizer, lm.model)
    config.architectures = None
    torch.manual_seed(seed)
    classifier = AutoModelForSequenceClassification.from_config(config)
    source_state = backbone(lm.model).state_dict()
    missing, unexpected = classifier.base_model.load_state_dict(source_state, strict=False)
    target_keys = set(classifier.base_model.state_dict())
    if len(missing) > len(target_keys) // 2:
        raise MaskViolationError(
            f"could not map {lm.name}'s weights onto {type(classifier).__name__}: {len(missing)} tensors missing"
        )
    return classifier, {"classifier_class": type(classifier).__name__, "missing_keys": list(missing),
                        "unexpected_keys": list(unexpected)}


def _end_with(seq: list[int], eos: int, max_length: int) -> list[int]:
    if seq and seq[-1] == eos:
        return seq
    return [*seq[: max_length - 1], eos]


def _encode_splits(lm: LoadedModel, train: GlueSplit, dev: GlueSplit, max_length: int) -> tuple[Seqs, Seqs]:
    """Token ids of both splits; encoder-decoders get a final </s> (their classifiers read it)."""
    tokenizer = lm.tokenizer
    train_seqs = encode_texts(tokenizer, train.texts_a, train.texts_b, max_length)
    dev_seqs = encode_texts(tokenizer, dev.texts_a, dev.texts_b, max_length)
    eos = getattr(tokenizer, "eos_token_id", None)
    if lm.family == "encoder-decoder" and eos is not None:
        # BART/T5 classifiers read the hidden state at the (single) final </s>: make sure there is one.
        train_seqs = [_end_with(s, eos, max_length) for s in train_seqs]
        dev_seqs = [_end_with(s, eos, max_length) for s in dev_seqs]
    return train_seqs, dev_seqs


def _total_steps(n_train: int, options: EvalOptions) -> int:
    steps_per_epoch = math.ceil(n_train / max(1, options.batch_size))
    steps = max(1, math.ceil(steps_per_epoch * options.finetune_epochs))
    return steps if options.finetune_max_steps is None else min(steps, options.finetune_max_steps)


def _optimizer(classifier: torch.nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with weight decay on matrices only, and a linear decay of the learning rate to zero."""
    decay = [p for n, p in classifier.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in classifier.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
    return optimizer, scheduler


def _train(classifier: torch.nn.Module, masks: list[MaskedParam], seqs: list[list[int]], labels: torch.Tensor,
           pad: int, options: EvalOptions, steps: int, on_step: Callable[[int, float], None] | None) -> list[float]:
    """`steps` optimizer steps over seeded shuffles of `seqs`, masks re-applied after every step; the losses."""
    batch_size = max(1, options.batch_size)
    optimizer, scheduler = _optimizer(classifier, options.finetune_lr, steps)
    generator = torch.Generator().manual_seed(options.seed)
    classifier.train()
    losses: list[float] = []
    while len(losses) < steps:
        order = torch.randperm(len(seqs), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            if len(losses) >= steps:
                break
            idx = order[start : start + batch_size]
            ids, attn = pad_batch([seqs[i] for i in idx], pad)
            out = classifier(input_ids=ids, attention_mask=attn, labels=labels[idx])
            out.loss.backward()
            mask_grads(masks)
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
            optimizer.step()
            apply_masks(masks)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(out.loss.item())
            if on_step is not None:
                on_step(len(losses), losses[-1])
    classifier.eval()
    return losses


@torch.inference_mode()
def _predict(classifier: torch.nn.Module, seqs: list[list[int]], pad: int) -> np.ndarray:
    preds = np.zeros(len(seqs), dtype=np.int64)
    for batch in length_batches([len(s) for s in seqs]):
        ids, attn = pad_batch([seqs[i] for i in batch], pad)
        preds[batch] = classifier(input_ids=ids, attention_mask=attn).logits.argmax(-1).numpy()
    return preds


def finetune_and_predict(
    lm: LoadedModel,
    train: GlueSplit,
    dev: GlueSplit,
    options: EvalOptions,
    *,
    max_length: int,
    num_labels: int = 2,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fine-tune a classifier on `train` with masks preserved; return dev predictions and a report."""
    classifier, info = build_classifier(lm, num_labels, options.seed)
    masks = record_masks(classifier, lm.family)
    zeros_before, total = zero_counts(masks)
    pad = pad_id_of(lm.tokenizer, lm.model)
    train_seqs, dev_seqs = _encode_splits(lm, train, dev, max_length)
    labels = torch.tensor(train.labels, dtype=torch.long)
    losses = _train(classifier, masks, train_seqs, labels, pad, options, _total_steps(len(train_seqs), options),
                    on_step)
    zeros_after = check_masks(masks, zeros_before)
    preds = _predict(classifier, dev_seqs, pad)
    report = {
        **info,
        "steps": len(losses),
        "batch_size": max(1, options.batch_size),
        "lr": options.finetune_lr,
        "epochs": options.finetune_epochs,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last_10": float(np.mean(losses[-10:])) if losses else None,
        "masked_matrices": len(masks),
        "masked_params": total,
        "sparsity_before": zeros_before / max(1, total),
        "sparsity_after": zeros_after / max(1, total),
        "zeros_before": zeros_before,
        "zeros_after": zeros_after,
    }
    return preds, report

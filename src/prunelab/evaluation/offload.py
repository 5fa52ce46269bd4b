"""Perplexity of a model larger than memory: every window through block i, then block i+1.

A model loaded out of core (`lm.offload`) would re-read every block from disk for every batch
of windows if it were called as usual. Here the batches are run block-major instead: the
embedding pass captures what the first block receives for each batch, each block is read
once, run on every batch, and released; then the last block's outputs go through the final
norm and head by the model's own forward, with the blocks replaced by stand-ins that return
what was already computed. Each batch sees the same block calls with the same inputs as an
in-memory forward, so the numbers are identical, not merely close.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from prunelab.evaluation.common import Blocks, CausalScorer
from prunelab.models.blocks import (
    BlockRef,
    capture_block_kwargs,
    capture_inputs,
    mixed_layer_types,
    stack_blocks,
    stand_ins,
)
from prunelab.models.types import LoadedModel


def _block_major(lm: LoadedModel, blocks: list[BlockRef], batches: list[torch.Tensor]) -> list[Any]:
    """The last block's raw output for each batch, every block read once."""
    offload, model = lm.offload, lm.model
    runners = [lambda b=b: model(input_ids=b, use_cache=False) for b in batches]
    with offload.outside():
        inputs = [capture_inputs(r, blocks[0].module) for r in runners]
        per_block = [capture_block_kwargs(r, blocks) for r in runners] if mixed_layer_types(lm.config) else None
    raw: list[Any] = []
    for bi, block in enumerate(blocks):
        offload.pin(block.prefix)
        raw = []
        for ci, inp in enumerate(inputs):
            kwargs = per_block[ci][bi] if per_block is not None else inp.kwargs
            out = block.module(inp.hidden, **kwargs)
            inp.hidden = out if torch.is_tensor(out) else out[0]
            raw.append(out)
        offload.release(block.prefix)
    return raw


@contextlib.contextmanager
def _identity_blocks(blocks: list[BlockRef], *, tuples: bool) -> Iterator[None]:
    """`stand_ins`, returning what the real blocks return: a tensor, or a tuple that starts with one.

    Models whose blocks return tuples (GPT-Neo, for instance) take `outputs[0]`; handed a bare
    tensor they would take its first row instead.
    """
    with stand_ins(blocks):
        if tuples:
            for b in blocks:
                b.module.forward = lambda hidden_states, *a, **k: (hidden_states,)  # type: ignore[method-assign]
        yield


def offloaded_window_nll(lm: LoadedModel, batches: list[torch.Tensor], blocks_out: Blocks) -> tuple[float, int]:
    """(sum of NLL, predicted tokens) over `batches` of windows, as `CausalScorer.window_nll` per batch."""
    blocks = stack_blocks(lm, "decoder")
    batches = [b.to(lm.offload.device) for b in batches]
    scorer = CausalScorer(lm.model)
    raw = _block_major(lm, blocks, batches)
    with lm.offload.outside(), _identity_blocks(blocks, tuples=not torch.is_tensor(raw[0])):
        if scorer.sliced is None:  # whether the head may be applied in slices depends on the head, not the blocks
            scorer.sliced = scorer._check_sliced(batches[0])
    nll_sum, count = 0.0, 0
    with lm.offload.outside():
        for batch, out in zip(batches, raw, strict=True):
            with stand_ins(blocks, last=lambda out=out: out):
                nll, n = scorer.window_nll(batch, blocks_out)
            nll_sum += nll
            count += n
    return nll_sum, count

"""Block-by-block calibration: the shared engine behind Wanda, SparseGPT and OWL.

The calibration set is pushed through the model one transformer block at a time:

1. A forward pre-hook on the first block of a stack captures what the block receives
   (hidden states plus every keyword it needs: attention mask, rotary position embeddings,
   T5 position bias, encoder hidden states...) and stops the forward there, so nothing past
   the embeddings is computed.
2. For each block, a forward pre-hook on each prunable linear accumulates the method's
   statistics from that linear's input (`x` reshaped to tokens × in_features).
3. When the whole calibration set fits in one batch (the usual case; see `plan_chunks`), the
   block runs once: each linear's hook collects its statistics and prunes the linear *before*
   it computes, so the linears after it see already-pruned inputs ("true sequential") and
   the block's output is the pruned output. Otherwise the block runs twice per chunk: a
   statistics pass, pruning, and an output pass.
4. The block's pruned outputs become the next block's inputs.

Encoder-decoder models: the encoder stack is pruned first; the pruned encoder is then run
in full (final layer norm included) and its output feeds the decoder's cross-attention while
the decoder stack is pruned the same way.

`SequentialRunner` names these steps (`capture_inputs`, `block_stats`, `prune_block`,
`propagate`); `run_sequential` is the one-call form the methods use.

Memory is the model plus one block's activations for the calibration set; nothing is ever
sized by `max_position_embeddings`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from prunelab.models.blocks import (
    BlockInput,
    BlockRef,
    block_prefix,
    call_block,
    capture_block_kwargs,
    capture_inputs,
    mixed_layer_types,
    stack_blocks,
)
from prunelab.models.types import LoadedModel, PrunableMatrix
from prunelab.pruning.types import PruningError

__all__ = ["BlockInput", "BlockRef", "ProgressFn", "SequentialRunner", "Stats", "batch_samples", "block_prefix",
           "capture_inputs", "plan_chunks", "run_sequential", "stack_blocks"]

ProgressFn = Callable[[str, int, int], None]


class Stats(Protocol):
    """A per-linear accumulator of input statistics (column norms, Hessian, ...)."""

    def add(self, x: torch.Tensor) -> None: ...


# ----------------------------------------------------------------------------------------------
# Batching the calibration set
# ----------------------------------------------------------------------------------------------


def _width(config: Any) -> int:
    names = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
             "hidden_size", "d_model", "n_embd")
    widths = [int(getattr(config, n)) for n in names if isinstance(getattr(config, n, None), int)]
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 0)
    if getattr(config, "n_inner", None) is None and getattr(config, "n_embd", None):
        widths.append(4 * int(config.n_embd))
    return max(widths + [hidden, 1])


def _heads(config: Any) -> int:
    for n in ("num_attention_heads", "encoder_attention_heads", "num_heads", "n_head"):
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    return 1


def plan_chunks(lm: LoadedModel, calib: list[dict[str, torch.Tensor]], budget_bytes: int | None = None) -> int:
    """How many calibration samples go through a block together.

    All of them when one block's activations for the whole set (MLP intermediates and
    attention scores, estimated generously) fit in `budget_bytes` (env
    `PRUNELAB_CALIB_MEMORY_MB`, default 4096 MB): then every block runs once and is pruned
    "true sequentially". Otherwise the largest chunk that fits (two passes per block).
    """
    if budget_bytes is None:
        budget_bytes = int(float(os.environ.get("PRUNELAB_CALIB_MEMORY_MB", "4096")) * 2**20)
    seq = max(int(v.shape[-1]) for v in calib[0].values() if torch.is_tensor(v) and v.dim() >= 2)
    if "input_features" in calib[0]:
        seq = max(seq, 1500)  # Whisper encoder frames
    per_sample = 4 * seq * (6 * _width(lm.config) + 2 * _heads(lm.config) * seq)
    return max(1, min(len(calib), budget_bytes // max(1, per_sample)))


def batch_samples(calib: list[dict[str, torch.Tensor]], size: int) -> list[dict[str, Any]]:
    """Stack samples into batches of `size`; samples of unequal shapes are never padded (padding
    would enter the statistics): they run one per batch instead."""
    shapes = {k: {tuple(c[k].shape) for c in calib if torch.is_tensor(c.get(k))} for k in calib[0]}
    if any(len(v) > 1 for v in shapes.values()):
        size = 1
    out = []
    for i in range(0, len(calib), size):
        group = calib[i : i + size]
        batch: dict[str, Any] = {}
        for key in group[0]:
            vals = [g[key] for g in group]
            batch[key] = torch.cat(vals, dim=0) if torch.is_tensor(vals[0]) else vals[0]
        out.append(batch)
    return out


# ----------------------------------------------------------------------------------------------
# Capturing a block's inputs
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------

MakeStats = Callable[[PrunableMatrix], Stats]
PruneOne = Callable[[PrunableMatrix, Stats], None]
AfterBlock = Callable[[BlockRef, dict[str, Stats]], None]


class ActivationSpill:
    """Calibration activations on disk instead of in memory, when they exceed the out-of-core budget.

    Out of core, the chunks' hidden states between blocks are the one thing that grows with the
    calibration set rather than with a block: above a quarter of `--max-memory` each chunk's
    output is written to a temporary file and read back when the next block runs, so memory holds
    one chunk at a time. The numbers are the same either way (a float tensor round-trips exactly).
    With no folder (the usual case) `keep` and `get` pass tensors through.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder, self.step = folder, 0

    @classmethod
    @contextlib.contextmanager
    def when_needed(cls, lm: LoadedModel, inputs: list[BlockInput]) -> Iterator[ActivationSpill]:
        budget = lm.offload.budget_bytes if lm.offload is not None else None
        size = sum(i.hidden.numel() * i.hidden.element_size() for i in inputs)
        if budget is None or size <= budget // 4:
            yield cls(None)
            return
        with tempfile.TemporaryDirectory(prefix="prunelab-activations-") as folder:
            spill = cls(Path(folder))
            for ci, inp in enumerate(inputs):
                inp.hidden = spill.keep(inp.hidden, ci)
            spill.advance()
            yield spill

    def keep(self, hidden: torch.Tensor, chunk: int) -> Any:
        if self.folder is None:
            return hidden
        if not torch.isfinite(hidden).all():
            return hidden  # the runner reports it with the block's name
        path = self.folder / f"step{self.step}-chunk{chunk}.pt"
        torch.save(hidden.cpu(), path)
        return (path, hidden.device)

    def get(self, hidden: Any) -> torch.Tensor:
        if torch.is_tensor(hidden):
            return hidden
        path, device = hidden
        return torch.load(path, weights_only=True).to(device)

    def advance(self) -> None:
        """The previous step's files are no longer needed once every chunk has moved on."""
        if self.folder is not None:
            for old in self.folder.glob(f"step{self.step - 1}-*.pt"):
                old.unlink()
        self.step += 1


class _Hooks:
    """Pre-hooks on every prunable linear of a block; inputs shared by q/k/v are accumulated once."""

    def __init__(self, lm: LoadedModel, block: BlockRef, make_stats: MakeStats, prune_one: PruneOne | None):
        self.lm, self.block, self.make_stats, self.prune_one = lm, block, make_stats, prune_one
        self.stats: dict[str, Stats] = {}
        self.pruned: set[str] = set()
        self.prune_inline = False
        self._last: tuple[Any, Stats] | None = None
        self._handles = [
            m.module(lm.model).register_forward_pre_hook(self._make_hook(m)) for m in block.matrices
        ]

    def _make_hook(self, m: PrunableMatrix) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                stats = self._last[1]  # same input tensor as the previous linear (q/k/v, gate/up)
                self.stats.setdefault(m.name, stats)
            else:
                stats = self.stats.get(m.name)
                if stats is None:
                    stats = self.stats[m.name] = self.make_stats(m)
                stats.add(x.detach().reshape(-1, x.shape[-1]))
                self._last = (x, stats)
            if self.prune_inline and self.prune_one is not None and m.name not in self.pruned:
                self.prune_one(m, stats)
                self.pruned.add(m.name)

        return hook

    def end_pass(self) -> None:
        self._last = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None


Runner = Callable[[], Any]  # one chunk's forward pass through the whole model


class SequentialRunner:
    """Pushes the calibration set through one model block by block; each step is a named method.

    Per stack (encoder, then decoder): `capture_inputs` (what the stack's first block receives,
    per chunk), then per block `block_stats` (a statistics pass: the hooks accumulate every
    linear's inputs), `prune_block` (prune its matrices from those statistics) and `propagate`
    (the block's pruned outputs become the next block's inputs). When the calibration set is a
    single chunk (or nothing is pruned), statistics, pruning and outputs happen in one pass
    (`one_pass`): each linear is pruned by its hook just before it computes ("true sequential").
    """

    def __init__(self, lm: LoadedModel, make_stats: MakeStats, prune_one: PruneOne | None = None, *,
                 after_block: AfterBlock | None = None, progress: ProgressFn | None = None) -> None:
        self.lm, self.make_stats, self.prune_one = lm, make_stats, prune_one
        self.after_block, self.progress = after_block, progress
        self.done = 0
        self.total = 0
        self.spill = ActivationSpill(None)

    def run(self, calib: list[dict[str, torch.Tensor]], chunk_size: int | None = None) -> None:
        """Calibrate (and prune) every stack of the model in execution order."""
        if not calib:
            raise PruningError("no calibration samples")
        batches = batch_samples(calib, chunk_size or plan_chunks(self.lm, calib))
        device = self.lm.offload.device if self.lm.offload is not None else next(self.lm.model.parameters()).device
        if device.type != "cpu":  # inputs go where the blocks run (a GPU, with --device)
            batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        with torch.no_grad():
            for blocks, runners in self.stacks(batches):
                self.run_stack(blocks, runners)

    def stacks(self, batches: list[dict[str, Any]]) -> Iterator[tuple[list[BlockRef], list[Runner]]]:
        """(blocks, runners) per stack. A generator on purpose: the decoder's runners are built after
        the encoder stack was pruned, so the decoder calibrates on the pruned encoder's output."""
        lm, model = self.lm, self.lm.model
        if lm.family != "encoder-decoder":
            blocks = stack_blocks(lm, "encoder" if lm.family == "encoder" else "decoder")
            if not blocks:
                raise PruningError("no transformer blocks with prunable matrices")
            self.total = len(blocks)
            kw_extra = {"use_cache": False} if lm.family == "decoder" else {}
            yield blocks, [lambda b=b: model(**b, **kw_extra) for b in batches]
            return
        enc_blocks, dec_blocks = stack_blocks(lm, "encoder"), stack_blocks(lm, "decoder")
        self.total = len(enc_blocks) + len(dec_blocks)
        encoder = model.get_encoder()
        enc_batches = [{k: v for k, v in b.items() if not k.startswith("decoder_")} for b in batches]
        if enc_blocks:
            yield enc_blocks, [lambda b=b: encoder(**b) for b in enc_batches]
        if dec_blocks:
            yield dec_blocks, self._decoder_runners(encoder, batches, enc_batches)

    def _decoder_runners(self, encoder: nn.Module, batches: list[dict[str, Any]],
                         enc_batches: list[dict[str, Any]]) -> list[Runner]:
        """Full-model passes fed with the (pruned) encoder's output, final norm included."""
        from transformers.modeling_outputs import BaseModelOutput

        model = self.lm.model
        runners: list[Runner] = []
        for b, eb in zip(batches, enc_batches, strict=True):
            with self.outside():
                enc_out = encoder(**eb).last_hidden_state
            kw = dict(b, encoder_outputs=BaseModelOutput(last_hidden_state=enc_out), use_cache=False)
            for k in ("input_ids", "input_features", "inputs_embeds"):
                kw.pop(k, None)
            runners.append(lambda kw=kw: model(**kw))
        return runners

    def outside(self) -> contextlib.AbstractContextManager[None]:
        """Out of core: embeddings, norms and head resident for a pass through the model (else nothing)."""
        return self.lm.offload.outside() if self.lm.offload is not None else contextlib.nullcontext()

    def capture_inputs(self, blocks: list[BlockRef], runners: list[Runner]) -> list[BlockInput]:
        """What the stack's first block receives, per chunk."""
        with self.outside():
            return [capture_inputs(r, blocks[0].module) for r in runners]

    def run_stack(self, blocks: list[BlockRef], runners: list[Runner]) -> None:
        inputs = self.capture_inputs(blocks, runners)
        with contextlib.ExitStack() as stack:
            self.spill = stack.enter_context(ActivationSpill.when_needed(self.lm, inputs))
            self._run_stack(blocks, runners, inputs)

    def _run_stack(self, blocks: list[BlockRef], runners: list[Runner], inputs: list[BlockInput]) -> None:
        per_block: list[list[dict[str, Any]]] | None = None
        if mixed_layer_types(self.lm.config):
            with self.outside():
                per_block = [capture_block_kwargs(r, blocks) for r in runners]  # [chunk][block]
        for bi, block in enumerate(blocks):
            if per_block is not None:
                for ci, inp in enumerate(inputs):
                    inp.kwargs = per_block[ci][bi]
            self.run_block(block, inputs)

    def run_block(self, block: BlockRef, inputs: list[BlockInput]) -> None:
        offload = self.lm.offload
        if offload is not None:
            offload.pin(block.prefix)  # read once, kept through every pass over the block
        self._run_block(block, inputs)
        if offload is not None:  # written out when it was pruned, then released
            offload.finish(block.prefix, write=self.prune_one is not None)

    def _run_block(self, block: BlockRef, inputs: list[BlockInput]) -> None:
        hooks = _Hooks(self.lm, block, self.make_stats, self.prune_one)
        try:
            if len(inputs) == 1 or self.prune_one is None:
                outs = self.one_pass(block, hooks, inputs)
            else:
                self.block_stats(block, hooks, inputs)
                hooks.remove()
                self.prune_block(block, hooks)
                outs = [self.spill.keep(self.call(block, inp), i) for i, inp in enumerate(inputs)]
        finally:
            hooks.remove()
        missing = [m.name for m in block.matrices if m.name not in hooks.stats]
        if missing:
            raise PruningError(
                f"{block.label}: calibration never reached {', '.join(missing)}; this architecture does not "
                "use those linears in its forward pass (use --method magnitude-layer)"
            )
        if self.after_block is not None:
            self.after_block(block, hooks.stats)
        self.propagate(block, inputs, outs)

    def one_pass(self, block: BlockRef, hooks: _Hooks, inputs: list[BlockInput]) -> list[torch.Tensor]:
        """Statistics, pruning (inline, in execution order) and outputs together."""
        hooks.prune_inline = True
        outs = []
        for i, inp in enumerate(inputs):
            outs.append(self.spill.keep(self.call(block, inp), i))
            hooks.end_pass()
        return outs

    def call(self, block: BlockRef, inp: BlockInput) -> torch.Tensor:
        """One chunk through one block (its hidden states read back first when they were spilled)."""
        return call_block(block.module, BlockInput(self.spill.get(inp.hidden), inp.kwargs))  # kwargs shared

    def block_stats(self, block: BlockRef, hooks: _Hooks, inputs: list[BlockInput]) -> None:
        """A statistics-only pass of every chunk through the block (outputs discarded)."""
        for inp in inputs:
            self.call(block, inp)
            hooks.end_pass()

    def prune_block(self, block: BlockRef, hooks: _Hooks) -> None:
        """Prune the block's matrices from the statistics their hooks collected."""
        prune_one = self.prune_one
        if prune_one is None:
            return
        for m in block.matrices:
            if m.name in hooks.stats:
                prune_one(m, hooks.stats[m.name])
                hooks.pruned.add(m.name)

    def propagate(self, block: BlockRef, inputs: list[BlockInput], outs: list[torch.Tensor]) -> None:
        """The block's pruned outputs become the next block's inputs."""
        for inp, out in zip(inputs, outs, strict=True):
            if torch.is_tensor(out) and not torch.isfinite(out).all():
                raise PruningError(f"{block.label}: non-finite activations after pruning; lower the sparsity")
            inp.hidden = out
        self.spill.advance()
        self.done += 1
        if self.progress is not None:
            self.progress(block.label, self.done, self.total)


def run_sequential(
    lm: LoadedModel,
    calib: list[dict[str, torch.Tensor]],
    make_stats: MakeStats,
    prune_one: PruneOne | None,
    *,
    after_block: AfterBlock | None = None,
    progress: ProgressFn | None = None,
    chunk_size: int | None = None,
) -> None:
    """Push `calib` through every block in order, collecting statistics and pruning as it goes.

    `make_stats(matrix)` creates an accumulator with `.add(x_2d)`; `prune_one(matrix, stats)`
    prunes one matrix in place (None = statistics only, e.g. OWL's dense pre-pass);
    `after_block(block, stats_by_name)` runs once per block after its matrices are done.
    """
    SequentialRunner(lm, make_stats, prune_one, after_block=after_block, progress=progress).run(calib, chunk_size)

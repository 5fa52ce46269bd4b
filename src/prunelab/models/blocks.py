"""A model's transformer blocks, and how to run one block on its own.

Pruning calibrates block by block and out-of-core evaluation runs every window through block i
before block i+1: both need the same three things, kept here below both. `stack_blocks` lists a
stack's blocks in execution order; `capture_inputs` runs a forward pass until a block is called
and keeps what it received (hidden states plus every keyword: attention mask, rotary position
embeddings, T5 position bias, encoder hidden states...); `call_block` replays a block on them.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.models.types import LoadedModel, PrunableMatrix, Stack

_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|block|blocks)\.\d+)(?:\.|$)")


class BlockError(PrunelabError):
    """A model's blocks cannot be found or replayed one at a time."""


@dataclass
class BlockRef:
    """One transformer block: its module and the prunable matrices inside it."""

    stack: Stack
    index: int
    prefix: str
    module: nn.Module
    matrices: list[PrunableMatrix] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.stack} block {self.index}"


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


def block_prefix(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` → `model.layers.3` (the block's qualified name)."""
    match = _BLOCK.match(name)
    if not match:
        raise BlockError(f"cannot find the transformer block of '{name}'")
    return match.group(1)


def stack_blocks(lm: LoadedModel, stack: Stack) -> list[BlockRef]:
    """The blocks of one stack in execution order, each with its prunable matrices."""
    refs: dict[str, BlockRef] = {}
    for m in lm.prunable:
        if m.stack != stack or m.block < 0:
            continue
        prefix = block_prefix(m.name)
        if prefix not in refs:
            refs[prefix] = BlockRef(stack, m.block, prefix, lm.model.get_submodule(prefix))
        refs[prefix].matrices.append(m)
    return sorted(refs.values(), key=lambda b: b.index)




@dataclass
class BlockInput:
    """What one block receives for one chunk: hidden states plus named keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def _normalize(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BlockInput:
    """Bind positional and keyword arguments to names so blocks can be called as block(h, **kw)."""
    sig = inspect.signature(block.forward)
    bound = sig.bind_partial(*args, **kwargs)
    named: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = sig.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise BlockError(f"{type(block).__name__} takes *args; cannot replay its inputs")
        else:
            named[key] = value
    first = next(iter(sig.parameters))
    hidden = named.pop(first, None)
    if hidden is None:  # passed as hidden_states=... keyword under another name
        hidden = named.pop("hidden_states")
    if "use_cache" in named:
        named["use_cache"] = False
    return BlockInput(hidden, named)


def capture_inputs(runner: Callable[[], Any], block: nn.Module) -> BlockInput:
    """Run `runner()` (a forward pass) until `block` is called; return what it received."""
    seen: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(_normalize(module, args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)  # before any weight loading
    try:
        runner()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise BlockError(f"the forward pass never reached {type(block).__name__}: cannot calibrate this model")
    return seen[0]


def mixed_layer_types(config: Any) -> bool:
    """Models whose blocks get different attention masks (sliding-window vs full layers)."""
    types = getattr(config, "layer_types", None) or []
    return len(set(types)) > 1


@contextlib.contextmanager
def stand_ins(blocks: list[BlockRef], last: Callable[[], Any] | None = None) -> Iterator[None]:
    """Blocks replaced by the identity (the last one by `last()` when given) for the forwards inside.

    A capture then costs an embedding pass, not a pass through every block before the one it
    needs; out of core, a block with a stand-in is not read from disk. Instance-level `forward`
    overrides that were there before come back afterwards.
    """
    saved = [b.module.__dict__.get("forward") for b in blocks]
    try:
        for b in blocks:
            b.module.forward = lambda hidden_states, *a, **k: hidden_states  # type: ignore[method-assign]
        if last is not None and blocks:
            blocks[-1].module.forward = lambda *a, **k: last()  # type: ignore[method-assign]
        yield
    finally:
        for b, fwd in zip(blocks, saved, strict=True):
            if fwd is None:
                b.module.__dict__.pop("forward", None)  # back to the class's forward
            else:
                b.module.forward = fwd  # type: ignore[method-assign]


def capture_block_kwargs(runner: Callable[[], Any], blocks: list[BlockRef]) -> list[dict[str, Any]]:
    """Keyword arguments of every block (for models whose blocks get different masks).

    For block i, blocks 0..i-1 are stand-ins (the identity); only the keywords are kept (hidden
    states come from the sequential chain). Used only for models whose blocks return plain tensors.
    """
    out = []
    for i, block in enumerate(blocks):
        with stand_ins(blocks[:i]):
            out.append(capture_inputs(runner, block.module).kwargs)
    return out


def call_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    """Run one block; keep T5's shared position biases (returned by block 0) for later blocks."""
    out = block(inp.hidden, **inp.kwargs)
    if isinstance(out, torch.Tensor):
        return out
    hidden = out[0]
    extra = list(out[1:])
    if extra and torch.is_tensor(extra[0]) and "position_bias" in inp.kwargs:
        inp.kwargs["position_bias"] = extra[0]
    if len(extra) > 1 and torch.is_tensor(extra[1]) and "encoder_decoder_position_bias" in inp.kwargs:
        inp.kwargs["encoder_decoder_position_bias"] = extra[1]
    return hidden



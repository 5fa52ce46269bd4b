"""Quantizing the kept weights of a pruned model (`prune --quant int8|int4 [--group-size G]`).

Sparsity and quantization compound: the weights a method keeps are stored as integers plus
float32 scales (`prunelab.quant` defines the grid). Two ways to put a weight on the grid:

* GPTQ, jointly with the reconstruction (SparseGPT §3.5, Frantar & Alistarh 2023): the column
  sweep that compensates each pruned weight through the inverse-Hessian Cholesky factor also
  rounds each kept weight as it reaches it, so the later columns absorb the rounding error too.
  sparsegpt does it in its own sweep; alps, whose ADMM/PCG solve is exact on its support, runs
  one such sweep on that fixed support afterwards (`gptq_on_support`).
* round-to-nearest (`quantize_rtn`) for every other method, and for any matrix a method left
  in float (`quantize_remaining`, the engine's step after the method and `--refine`).

The output head (and the token embedding when tied to it) is always stored int8: a float head
alone can outweigh the whole pruned model. Its scales are per row and group of 32 columns when 32
divides the width (`head_scheme`), else per row: GGUF checkpoints hold their embeddings as Q8_0,
symmetric int8 in blocks of 32, which that grid reproduces bit for bit (the zoo SmolLM2's tied
embedding is Q8_0), for 1/8 byte per weight of scales (per row was close too: SmolLM2 2:4 ppl 94.09
vs 94.28 with the float head). Every quantized module is recorded
in `lm.quant` (module name → scheme, scales and int4 zero points, in the logical `(out, in)`
orientation of `PrunableMatrix.weight`, i.e. transposed for GPT-2's `Conv1D`), and its weight
holds exactly the dequantized float32 `d * s` (`prunelab.quant`).

Pruned weights stay exactly 0; a kept weight that rounds to 0 only adds sparsity. The engine's
exact-count checks count the *mask* (decided before rounding), so they hold unchanged.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel
from prunelab.pruning.sparsegpt import obs_solve
from prunelab.pruning.types import PruneConfig, PruningError
from prunelab.quant import QuantInfo, QuantScheme, quantize_rtn

HEAD_GROUP = 32  # the GGUF block (Q8_0, Q4_0, Q4_1): the head's int8 scales follow it where it divides


def head_scheme(in_features: int) -> QuantScheme:
    """The output head's / tied embedding's grid: int8 per row and 32 columns, or per row if 32 does not divide."""
    return QuantScheme(8, HEAD_GROUP if in_features % HEAD_GROUP == 0 else None)


def check_quantizable(lm: LoadedModel, config: PruneConfig) -> None:
    """Everything that would stop a quantized run, checked before any work (one-line `ConfigError`s).

    An already-quantized model (`lm.quant`, e.g. a loaded quantized sparse checkpoint) may only lose
    weights to a mask (zeros stay on the grid); quantizing it again, or a method that re-solves or
    reshapes the weights (sparsegpt, alps, structured), would leave them off their stored grid.
    """
    scheme = config.quant_scheme
    spec = config.spec
    if lm.quant and (scheme is not None or spec.reconstructs or not spec.exact_counts):
        done = next(iter(lm.quant.values())).scheme.name
        raise ConfigError(f"{lm.name} is already quantized ({done}); prune the float checkpoint instead")
    if scheme is None:
        return
    for m in lm.prunable:
        config.quant_for(m.in_features, m.name)  # a group size that does not divide: the error names the matrix
        dtype = m.module(lm.model).weight.dtype
        if dtype != torch.float32:
            raise ConfigError(f"--quant needs float32 weights; {m.name} is {dtype} (load the model in float32)")


def gptq_on_support(weight: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, scheme: QuantScheme, *,
                    blocksize: int = 128, percdamp: float = 0.01, name: str = "matrix",
                    hinv_cache: dict[float, torch.Tensor] | None = None) -> tuple[torch.Tensor, QuantInfo]:
    """One GPTQ sweep over `weight` (out, in) on the fixed support `keep`: (dequantized weight, QuantInfo).

    Pruned entries end exactly 0 (their share of the propagated error is pushed on as well).
    """
    new, _, info = obs_solve(weight, H, 0.0, None, blocksize=blocksize, percdamp=percdamp, name=name,
                             hinv_cache=hinv_cache, quant=scheme, fixed=keep.bool())
    if info is None:  # obs_solve returns scales whenever `quant` is given
        raise PruningError(f"{name}: the GPTQ sweep returned no scales (internal error)")
    return new, info


def rtn_in_place(w: torch.Tensor, scheme: QuantScheme, name: str = "") -> QuantInfo:
    """Round `w` ((out, in) view; writes reach the model) to nearest on its group scales, in place."""
    q, info = quantize_rtn(w.detach(), scheme, name)
    w.copy_(info.dequantize(q))
    return info


def head_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules owning the output head's weight (with a tied token embedding: all of them)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        return []
    return [name for name, mod in model.named_modules() if getattr(mod, "weight", None) is weight]


def quantize_remaining(lm: LoadedModel, config: PruneConfig, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """RTN for every prunable matrix the method left in float, then the head int8 per row; the report.

    Masks are re-applied first so a pruned entry is exactly 0 before rounding (and stays 0).
    """
    scheme = config.quant_scheme
    if scheme is None:
        return {}
    gptq = [m.name for m in lm.prunable if m.name in lm.quant]
    rtn: list[str] = []
    with torch.no_grad():
        for m in lm.prunable:
            if m.name in lm.quant:
                continue
            w = m.weight(lm.model)
            if m.name in masks:
                w.masked_fill_(~masks[m.name], 0)
            lm.quant[m.name] = rtn_in_place(w, config.quant_for(m.in_features, m.name) or scheme, m.name)
            rtn.append(m.name)
        head = head_modules(lm.model)
        done = [n for n in head if n in lm.quant]  # a prunable tied embedding (include_embeddings) got its grid
        hs = head_scheme(lm.model.get_submodule(head[0]).weight.shape[1]) if head else head_scheme(0)
        if head:
            info = lm.quant[done[0]] if done else rtn_in_place(lm.model.get_submodule(head[0]).weight, hs, head[0])
            for name in head:  # tied: one tensor, one set of scales, recorded under every owner
                lm.quant[name] = info
    sizes = Counter(str(lm.quant[m.name].scheme.group_size or "row") for m in lm.prunable)
    return {
        **scheme.to_dict(), "scheme": scheme.name, "gptq": len(gptq), "round_to_nearest": len(rtn),
        "group_sizes": dict(sizes),  # matrices per group size (int4's default shrinks to fit narrow inputs)
        "head": {"modules": head, **hs.to_dict()},
        "count_rule": "exact counts are checked on the masks (before rounding); kept weights rounded to 0 "
                      "add to `zeros`",
    }


def gptq_on_masks(lm: LoadedModel, config: PruneConfig, masks: dict[str, torch.Tensor],
                  calib: list[dict[str, torch.Tensor]], progress: Any = None) -> dict[str, Any]:
    """GPTQ every prunable matrix on its fixed mask, block by block, then the head: `--quant` after recovery.

    The same joint step sparsegpt/alps take inside their solve, run on weights that were trained after
    pruning: each block is calibrated on the already-quantized blocks before it, pruned entries stay 0.
    """
    from prunelab.pruning.sequential import run_sequential
    from prunelab.pruning.sparsegpt import HessianStats

    model = lm.model

    def solve(m: Any, stats: HessianStats) -> None:
        w = m.weight(model)
        scheme = config.quant_for(m.in_features, m.name)
        new, info = gptq_on_support(w.detach().clone(), stats.hessian(), masks[m.name], scheme, name=m.name,
                                    hinv_cache=stats.hinv_cache)  # type: ignore[arg-type]
        w.copy_(new)
        lm.quant[m.name] = info

    with torch.no_grad():
        run_sequential(lm, calib, lambda m: HessianStats(m.in_features), solve, progress=progress)
    return quantize_remaining(lm, config, masks)

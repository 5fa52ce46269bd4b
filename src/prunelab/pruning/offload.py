"""Prune a model larger than memory: each block read from the shards, pruned, written, released.

`prune_to_disk` is `prune` + `save_pruned` for a model loaded with `storage.load(..., offload=True)`.
The method is the registered one, unchanged: the sequential runner pins each block while it is
calibrated and pruned, and hands it to this module's sink when done, which writes it as one shard
of the output checkpoint and counts its zeros; then the block's memory is released. Methods
without calibration (magnitude, per matrix or global) stream the same way without a forward pass;
global magnitude finds its threshold with the radix select reading one tensor at a time.
Masks are kept one bit per weight (`PackedMasks`). The output is a Hugging Face sharded
checkpoint written into a temporary folder renamed at the end, so a killed run leaves nothing.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.io import atomic_dir, write_json
from prunelab.models.blocks import block_prefix
from prunelab.models.types import LoadedModel, PrunableMatrix
from prunelab.pruning.engine import (
    check_exact_counts,
    owl_requested,
    peak_rss_bytes,
    report_header,
    requested_sparsity,
    validate_request,
)
from prunelab.pruning.patterns import MagnitudeCut, magnitude_cut, target_count
from prunelab.pruning.registry import MethodOutput
from prunelab.pruning.sequential import ProgressFn
from prunelab.pruning.types import MatrixReport, PackedMasks, PruneConfig, PruneResult, PruningError
from prunelab.storage.checkpoint import save_config, write_preprocessors
from prunelab.storage.stream import ShardStream

OUT_OF_CORE_METHODS = ("magnitude", "magnitude-layer", "wanda", "sparsegpt", "alps")


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def check_out_of_core(lm: LoadedModel, config: PruneConfig) -> None:
    """What the streaming engine cannot do yet, said before any work."""
    if config.method not in OUT_OF_CORE_METHODS:
        raise ConfigError(f"--offload disk supports {', '.join(OUT_OF_CORE_METHODS)}; {config.method} needs the "
                          "whole model in memory: use --offload none")
    if config.quant is not None or config.refine is not None:
        flag = "--quant" if config.quant is not None else "--refine"
        raise ConfigError(f"{flag} is not available with --offload disk yet: drop it or use --offload none")
    if config.owl and not config.spec.needs_calibration:
        raise ConfigError(f"--owl with {config.method} is not available with --offload disk: use wanda or sparsegpt")
    if any(m.block < 0 for m in lm.prunable):
        raise ConfigError("pruning embeddings / the LM head is not available with --offload disk")


class _Sink:
    """Receives finished blocks: writes each as a shard, counts zeros, times blocks."""

    def __init__(self, lm: LoadedModel, stream: ShardStream) -> None:
        self.stream, self.offload = stream, lm.offload
        self.by_param = {m.param_name: m.name for m in lm.prunable}
        self.params = {n for n, s in lm.offload.slots.items() if s.holders[0][2]}
        self.zeros: dict[str, int] = {}
        self.total_params = self.total_zeros = 0
        self.written: set[str] = set()
        self.block_seconds: list[float] = []  # per block: read, calibration pass and solve, write
        for slot in lm.offload.initialised.values():  # never written (loading initialises them again), but
            module, attr, is_param = slot.holders[0]  # parameters of the model all the same
            if is_param:
                t = getattr(module, attr)
                self.total_params += t.numel()
                self.total_zeros += t.numel() - int(torch.count_nonzero(t))

    def __call__(self, unit: str, tensors: dict[str, torch.Tensor]) -> None:
        if unit and unit in self.written:
            raise PruningError(f"{unit} was written twice (internal error)")
        self.written.add(unit)
        for name, t in tensors.items():
            if name in self.params:
                zeros = t.numel() - int(torch.count_nonzero(t))  # no int64 temporary the size of t
                self.total_params += t.numel()
                self.total_zeros += zeros
                if name in self.by_param:
                    self.zeros[self.by_param[name]] = zeros
        shard = self.stream.write(tensors)
        if unit and shard is not None:
            self.offload.repoint(shard)
            self.block_seconds.append(time.perf_counter() - self.offload.pinned_at[unit])


def prune_to_disk(lm: LoadedModel, config: PruneConfig, out_dir: str | Path, *, progress: ProgressFn | None = None,
                  extra: dict[str, Any] | None = None) -> PruneResult:
    """Prune `lm` (loaded out of core) with `config` and write the result to `out_dir` as it goes."""
    if lm.offload is None:
        raise ConfigError("prune_to_disk needs a model loaded out of core (storage.load(..., offload=True))")
    validate_request(lm, config)
    check_out_of_core(lm, config)
    offload = lm.offload
    baseline, peak_before = current_rss_bytes(), peak_rss_bytes()
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    result = PruneResult(config=config)
    with atomic_dir(out_dir) as tmp, torch.no_grad():
        sink = _Sink(lm, ShardStream(tmp))
        for name in offload.units.get("", []):  # embeddings, norms, head (never pruned here): copied first,
            sink("", {name: offload.read(name)})  # one tensor at a time, while the heap is still clean
        offload.sink = sink
        try:
            masks = _run_method(lm, config, result, progress)
            for unit in offload.blocks():  # blocks the method never touched (no prunable matrices)
                if unit not in sink.written:
                    offload.pin(unit)
                    offload.finish(unit, write=True)
        finally:
            offload.sink = None
        sink.stream.finish()
        save_config(lm.model, tmp)
        write_preprocessors(tmp, lm.tokenizer, lm.processor)
        _account(lm, config, masks, sink, result)
        check_exact_counts(config.spec, config, result)
        result.timings["total"] = time.perf_counter() - t0
        result.peak_rss_bytes = peak_rss_bytes()
        result.extra["offload"] = {
            "mode": "disk", "device": str(offload.device), "baseline_rss_bytes": baseline,
            "peak_rss_before_bytes": peak_before,
            "bytes_read": offload.bytes_read, "bytes_written": sink.stream.bytes_written,
            "block_seconds": sink.block_seconds, "model_bytes": offload.total_bytes,
            "budget_bytes": offload.budget_bytes,
            # what the checkpoint does not store, initialised in memory as from_pretrained does (not written)
            "initialised": offload.initialised_report(),
            # model name -> stored key, where transformers' loading rules rename (the output uses model names)
            "renamed": dict(offload.renamed),
        }
        write_json(tmp / "prune_report.json", _report(lm, result, extra))
    return result


def _run_method(lm: LoadedModel, config: PruneConfig, result: PruneResult,
                progress: ProgressFn | None) -> dict[str, torch.Tensor]:
    spec = config.spec
    if config.method == "magnitude" and config.nm is None:
        return _global_magnitude(lm, config, progress)
    if not spec.needs_calibration:
        return _per_block(lm, config, progress)
    from prunelab.data.calibration import calibration_set

    cs = calibration_set(lm, config)
    result.calibration = cs.info
    result.warnings.extend(cs.warnings)
    out = spec.load()(lm, config, cs.inputs, progress)
    if isinstance(out, MethodOutput):
        out, result.extra = out.masks, dict(out.extra)
    return out


def _blocks_in_order(lm: LoadedModel) -> list[tuple[str, list[PrunableMatrix]]]:
    """Prunable matrices grouped by block, in `lm.prunable` order (global ties follow that order)."""
    groups: list[tuple[str, list[PrunableMatrix]]] = []
    for m in lm.prunable:
        unit = block_prefix(m.name)
        if groups and groups[-1][0] == unit:
            groups[-1][1].append(m)
        elif any(g[0] == unit for g in groups):
            raise PruningError(f"{m.name}: matrices of {unit} are not contiguous (internal error)")
        else:
            groups.append((unit, [m]))
    return groups


def _per_block(lm: LoadedModel, config: PruneConfig, progress: ProgressFn | None) -> dict[str, torch.Tensor]:
    """A per-matrix method (magnitude-layer, N:M magnitude) run on one resident block at a time."""
    method = config.spec.load()
    masks = PackedMasks()
    groups = _blocks_in_order(lm)
    for i, (unit, matrices) in enumerate(groups):
        lm.offload.pin(unit)
        masks.update_from(method(dataclasses.replace(lm, prunable=matrices), config, None, None))
        lm.offload.finish(unit, write=True)
        if progress:
            progress(unit, i + 1, len(groups))
    return masks


def _global_magnitude(lm: LoadedModel, config: PruneConfig, progress: ProgressFn | None) -> dict[str, torch.Tensor]:
    """One |w| threshold over every prunable matrix, each read from disk on its own (two passes), then
    the masks applied block by block: the ranking of `magnitude.prune_global`, never the whole model."""
    offload = lm.offload
    n = sum(m.numel for m in lm.prunable)
    k = target_count(config.sparsity, n)
    if k <= 0:
        cut = MagnitudeCut(0, 0)
    else:
        def tensors() -> Any:
            for m in lm.prunable:
                yield offload.read(m.param_name)

        cut = magnitude_cut(tensors, min(k, n))
    masks = PackedMasks()
    groups = _blocks_in_order(lm)
    for i, (unit, matrices) in enumerate(groups):
        offload.pin(unit)
        for m in matrices:
            w = m.weight(lm.model)
            keep = cut.keep(w) if k < n else torch.zeros_like(w, dtype=torch.bool)
            w.masked_fill_(~keep, 0)
            masks[m.name] = keep
        offload.finish(unit, write=True)
        if progress:
            progress(unit, i + 1, len(groups))
    return masks


def _account(lm: LoadedModel, config: PruneConfig, masks: dict[str, torch.Tensor], sink: _Sink,
             result: PruneResult) -> None:
    """The engine's per-matrix figures, from the counts taken as each block was written."""
    requested = requested_sparsity(config)
    pruned_counts = getattr(masks, "pruned", None)
    for m in lm.prunable:
        if m.name not in masks:
            raise PruningError(f"method {config.method} returned no mask for {m.name}")
        pruned = pruned_counts[m.name] if pruned_counts is not None else int((~masks[m.name]).sum())
        zeros = sink.zeros[m.name]
        result.matrices.append(MatrixReport(name=m.name, module_type=m.module_type, stack=m.stack, block=m.block,
                                            numel=m.numel, requested=requested, achieved=zeros / m.numel,
                                            pruned=pruned, zeros=zeros))
        result.prunable_params += m.numel
        result.prunable_zeros += zeros
    result.total_params, result.total_zeros = sink.total_params, sink.total_zeros
    result.masks = masks
    owl_requested(config, result)


def _report(lm: LoadedModel, result: PruneResult, extra: dict[str, Any] | None) -> dict[str, Any]:
    report = report_header(lm, result, "hf")
    report["peak_rss_bytes"] = peak_rss_bytes()
    report.update(extra or {})
    return report

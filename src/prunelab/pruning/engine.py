"""`prune()`: run one method on a loaded model and account for what it did; `save_pruned()`.

The engine is method-agnostic: it validates the request, builds the calibration set when the
method (or OWL, or refine) needs one, calls the registered method, optionally refines its masks
(`--refine`), re-applies and verifies the returned masks, and counts zeros per matrix, over
prunable weights and over all weights.
"""

from __future__ import annotations

import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.io import atomic_dir, write_json
from prunelab.models.types import LoadedModel
from prunelab.pruning.patterns import nm_target_count, target_count
from prunelab.pruning.quantize import check_quantizable, quantize_remaining
from prunelab.pruning.registry import MethodOutput, MethodSpec, PruneWarning
from prunelab.pruning.sequential import ProgressFn
from prunelab.pruning.types import MatrixReport, PruneConfig, PruneResult, PruningError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def validate_request(lm: LoadedModel, config: PruneConfig) -> None:
    """Method, pattern, OWL and the method's options are checked by `PruneConfig.validate` (from the spec)."""
    config.validate()
    if not lm.prunable:
        raise ConfigError(f"{lm.name} has no prunable matrices (no linears inside numbered transformer blocks)")
    check_quantizable(lm, config)  # already quantized, a group size that does not divide: before any work


def _is_noop(config: PruneConfig) -> bool:
    """Nothing to prune. A reconstructing method asked to quantize still runs: at sparsity 0 it is GPTQ."""
    if config.quant is not None and config.spec.reconstructs:
        return False
    return config.nm is None and float(config.sparsity) == 0.0 and not config.owl


def prune(lm: LoadedModel, config: PruneConfig, *, progress: ProgressFn | None = None) -> PruneResult:
    """Prune `lm.model` in place with `config`; return masks and requested-vs-achieved sparsities.

    `progress(message, done, total)` is called per block (calibrated methods) or per matrix.
    Deterministic given `config.seed`. With `config.refine` the dense weights are snapshot
    before the method and its masks refined after it (`_refine`), before the counts are checked.
    With `config.quant` the kept weights end on the integer grid (`pruning.quantize`: GPTQ inside
    sparsegpt/alps, round-to-nearest after any other method or after `--refine`) and `lm.quant`
    says how; exact counts are checked on the masks, so a kept weight rounded to 0 only adds zeros.
    """
    validate_request(lm, config)
    spec = config.spec
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    result = PruneResult(config=config)
    calib = None
    if config.needs_calibration and not _is_noop(config):
        from prunelab.data.calibration import calibration_set

        if progress:
            progress("calibration data", 0, 1)
        cs = calibration_set(lm, config)
        calib = cs.inputs
        result.calibration = cs.info
        result.warnings.extend(cs.warnings)
    result.timings["calibration_data"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    was_training = lm.model.training
    lm.model.eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", PruneWarning)
        if _is_noop(config):
            masks = {m.name: torch.ones(m.out_features, m.in_features, dtype=torch.bool) for m in lm.prunable}
        else:
            masks = _run_method(lm, config, calib, result, progress)
    lm.model.train(was_training)
    result.warnings.extend(str(w.message) for w in caught if issubclass(w.category, PruneWarning))
    result.timings["pruning"] = time.perf_counter() - t1
    if config.quant is not None:
        t2 = time.perf_counter()
        result.extra["quantization"] = quantize_remaining(lm, config, masks)
        result.timings["quantize"] = time.perf_counter() - t2
    _account(lm, config, masks, result)
    check_exact_counts(spec, config, result)
    if config.owl:
        result.extra["owl"] = owl_profile(result.matrices)
    result.timings["total"] = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _run_method(lm: LoadedModel, config: PruneConfig, calib: Any, result: PruneResult,
                progress: ProgressFn | None) -> dict[str, torch.Tensor]:
    """The method's masks (its `MethodOutput.extra` into `result.extra`), refined when asked."""
    dense = None
    if config.refine is not None:
        from prunelab.pruning.refine import dense_snapshot

        dense = dense_snapshot(lm)  # refine's target: the weights before the method touched them
    out = config.spec.load()(lm, config, calib, progress)
    if isinstance(out, MethodOutput):
        out, result.extra = out.masks, dict(out.extra)
    if dense is not None:
        out = _refine(lm, config, calib, dense, out, result, progress)
    return out


def _refine(lm: LoadedModel, config: PruneConfig, calib: Any, dense: dict[str, torch.Tensor],
            masks: dict[str, torch.Tensor], result: PruneResult,
            progress: ProgressFn | None) -> dict[str, torch.Tensor]:
    """Swap refinement after the method; per-matrix layer errors before/after go to `extra["refine"]`.

    Reconstructing methods (sparsegpt, alps) get their weights re-solved on the new support.
    """
    from prunelab.pruning.refine import refine_pruned

    t0 = time.perf_counter()
    spec = config.spec

    def note(msg: str, done: int, total: int) -> None:
        if progress:
            progress(f"refine {config.refine}: {msg}", done, total)

    new_masks, errors = refine_pruned(lm, calib, dense, masks, config.nm, reconstruct=spec.reconstructs,
                                      max_swaps=config.refine_budget,
                                      percdamp=getattr(config.options, "percdamp", 0.01), progress=note)
    before = sum(b for b, _ in errors.values())
    after = sum(a for _, a in errors.values())
    result.timings["refine"] = time.perf_counter() - t0
    result.extra["refine"] = {
        "name": config.refine, "budget": config.refine_budget, "reconstruct": spec.reconstructs,
        "error_before": before, "error_after": after,
        "matrices": {name: {"before": b, "after": a} for name, (b, a) in errors.items()},
    }
    return new_masks


def owl_profile(matrices: list[MatrixReport]) -> dict[str, float]:
    """Sparsity per transformer block ("stack.block": pruned / numel over its matrices): OWL's profile."""
    pruned: dict[str, int] = {}
    numel: dict[str, int] = {}
    for r in matrices:
        if r.block < 0:
            continue
        key = f"{r.stack}.{r.block}"
        pruned[key] = pruned.get(key, 0) + r.pruned
        numel[key] = numel.get(key, 0) + r.numel
    return {k: pruned[k] / numel[k] for k in pruned}


def requested_sparsity(config: PruneConfig) -> float:
    if config.nm is not None:
        return config.nm[0] / config.nm[1]
    return float(config.sparsity)


def _account(lm: LoadedModel, config: PruneConfig, masks: dict[str, torch.Tensor], result: PruneResult) -> None:
    """Re-apply masks (idempotent), check the counts, and fill the per-matrix and overall figures."""
    model = lm.model
    pruned_ids: set[int] = set()
    with torch.no_grad():
        for m in lm.prunable:
            mask = masks.get(m.name)
            if mask is None:
                raise PruningError(f"method {config.method} returned no mask for {m.name}")
            w = m.weight(model)
            if tuple(mask.shape) != tuple(w.shape):
                raise PruningError(f"mask for {m.name} has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
            w.masked_fill_(~mask, 0)
            pruned = int((~mask).sum())
            zeros = int((w == 0).sum())
            numel = w.numel()
            result.matrices.append(MatrixReport(
                name=m.name, module_type=m.module_type, stack=m.stack, block=m.block, numel=numel,
                requested=requested_sparsity(config),
                achieved=zeros / numel, pruned=pruned, zeros=zeros,
            ))
            result.prunable_params += numel
            result.prunable_zeros += zeros
            pruned_ids.add(id(m.module(model).weight))
        seen: set[int] = set()
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            result.total_params += p.numel()
            result.total_zeros += int((p == 0).sum())
    result.masks = masks
    owl_requested(config, result)


def recount(lm: LoadedModel, result: PruneResult) -> None:
    """Every figure of `result` again from the weights as they are now (after recovery and quantization
    changed the kept weights; the masks are the same, so a kept weight rounded to 0 only adds zeros)."""
    result.matrices = []
    result.prunable_params = result.prunable_zeros = result.total_params = result.total_zeros = 0
    _account(lm, result.config, result.masks, result)


def owl_requested(config: PruneConfig, result: PruneResult) -> None:
    """With OWL each block had its own target: recover every matrix's requested sparsity from its mask counts."""
    if config.owl:
        for r in result.matrices:
            r.requested = r.pruned / r.numel


def check_exact_counts(spec: MethodSpec, config: PruneConfig, result: PruneResult) -> None:
    """A method whose spec says `exact_counts` must hit its target count exactly (per matrix, or over all
    prunable weights for `count_scope="global"`); a miss is a bug, not a user error."""
    if not spec.exact_counts:
        return
    if spec.count_scope == "global" and config.nm is None:
        got = sum(r.pruned for r in result.matrices)
        expect = target_count(config.sparsity, result.prunable_params)
        if got != expect:
            raise PruningError(f"{config.method} pruned {got} entries in all, expected {expect} (internal error)")
        return
    for r in result.matrices:
        mask = result.masks[r.name]
        if config.nm is not None:
            expect = nm_target_count(mask.shape[0], mask.shape[1], *config.nm)
        elif config.owl:
            continue
        else:
            expect = target_count(config.sparsity, r.numel)
        if r.pruned != expect:
            raise PruningError(f"{r.name}: pruned {r.pruned} entries, expected {expect} (internal error)")


def report_header(lm: LoadedModel, result: PruneResult | None, format: str) -> dict[str, Any]:
    """The model, method and outcome part of `prune_report.json` (in memory and out of core alike)."""
    report: dict[str, Any] = {
        "model": lm.spec.raw,
        "model_spec": {"raw": lm.spec.raw, "kind": lm.spec.kind, "target": lm.spec.target},
        "family": lm.family,
        "source": str(lm.source),
        "format": format,
        "method": result.config.method if result else None,
        "pattern": result.config.pattern if result else None,
    }
    if result is not None:
        report.update(result.to_dict())
    return report


def save_pruned(lm: LoadedModel, result: PruneResult | None, out_dir: str | Path, *, format: str = "hf",
                extra: dict[str, Any] | None = None) -> Path:
    """Write the pruned model atomically: checkpoint + tokenizer/processor + `prune_report.json`.

    `format="hf"`: `save_pretrained` with safetensors (loads with `AutoModel*.from_pretrained`);
    `format="sparse"`: compressed sparse formats; both written by `prunelab.storage.save`.
    """
    if format not in ("hf", "sparse"):
        raise ConfigError(f"unknown --format '{format}': use hf or sparse")
    from prunelab.storage import save as save_checkpoint
    from prunelab.storage.api import HF_DEQUANTIZED_NOTE, QuantizedAsFloatWarning

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if format == "hf" and lm.quant and result is not None and HF_DEQUANTIZED_NOTE not in result.warnings:
        result.warnings.append(HF_DEQUANTIZED_NOTE)  # said once, in the report and by the CLI
    with atomic_dir(out_dir) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedAsFloatWarning)
        save_checkpoint(lm, tmp, format=format)  # type: ignore[arg-type]  # with tokenizer/processor
        report = report_header(lm, result, format)
        report["save_time_s"] = time.perf_counter() - t0
        report["peak_rss_bytes"] = peak_rss_bytes()
        if extra:
            report.update(extra)
        write_json(tmp / "prune_report.json", report)
    return out_dir

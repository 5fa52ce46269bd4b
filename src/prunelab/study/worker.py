"""Executing one cell: what runs inside the study process, a pool worker or a Ray task.

`execute_cell(payload, study_dir)` never raises for a cell's own failure: it returns a
`CellResult` with status `failed` and the first line of the error (the traceback goes to the
cell's log file), so one broken benchmark cannot stop a study. Heavy packages (torch, the
benchmarks, the runtime) are imported inside the cell kinds, so `prunelab results` and the
driver start fast and a worker only loads what its cells use.

Pruned checkpoints live in `DIR/checkpoints/<point hash>`: written atomically with a marker
file, guarded by a file lock so concurrent workers prune a point once. A worker keeps the
last loaded models in memory so that a point's benchmarks share one load.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import platform
import random
import re
import shutil
import socket
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from prunelab.study.cells import Cell, canonical_json
from prunelab.study.results import CellResult, Sizes, error_line

if TYPE_CHECKING:  # importing models pulls in torch: a worker imports it when a cell runs
    from prunelab.models.types import LoadedModel

POINT_MARKER = "study_point.json"
SPEED_KWARGS = ("prefill_tokens", "decode_tokens", "repeats", "measure_rss", "measure_size")
_MODELS: dict[str, LoadedModel] = {}  # path -> model (this process's cache)
_MAX_CACHED = 2  # the pruned checkpoint and the dense reference
_VERSIONS: dict[str, str] | None = None
_PROGRESS: list[Any] = [None]  # progress(message, done, total) of the running cell, in-process runs only
PROFILE_EDGES = [10 ** (e / 8) for e in range(-48, 9)]  # |w| histogram edges of `block_profile`
_BEFORE: dict[str, dict[str, Any]] = {}  # model spec -> its dense block profile (this process's cache)


def set_progress_hook(hook: Any) -> None:
    """Let the in-process executor show the current cell's own progress (prune blocks, bench steps)."""
    _PROGRESS[0] = hook


def _progress(message: str, done: int, total: int) -> None:
    hook = _PROGRESS[0]
    if hook is not None:
        with contextlib.suppress(Exception):
            hook(message, done, total)


# ---------------------------------------------------------------------------------------------
# Environment facts
# ---------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions that can change a number: Python, prunelab, torch, transformers, numpy, ..."""
    global _VERSIONS
    if _VERSIONS is None:
        from importlib import metadata

        out = {"python": platform.python_version(), "platform": platform.platform(),
               "cpu_count": str(os.cpu_count())}
        for dist in ("prunelab", "torch", "transformers", "numpy", "safetensors", "scikit-learn", "scipy", "ray",
                     "numba", "jiwer"):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        _VERSIONS = out
    return dict(_VERSIONS)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading is this cell's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # pragma: no cover
        return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.@_-]+", "_", text).strip("_")[:80]


def log_path_for(cell: Cell, study_dir: Path) -> Path:
    return study_dir / "logs" / f"{slug(cell.label)}-{cell.hash[:10]}.log"


def checkpoint_dir(cell: Cell, study_dir: Path) -> Path:
    return study_dir / "checkpoints" / cell.point_hash[:16]


# ---------------------------------------------------------------------------------------------
# Logging capture
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _capture(log_path: Path) -> Iterator[io.TextIOBase]:
    """Send Python-level stdout/stderr, warnings and logging of this cell to its log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    handler = logging.StreamHandler(fh)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            yield fh
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        fh.close()


# ---------------------------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------------------------


def _load(spec: str) -> LoadedModel:
    """Load a model, reusing this process's cache."""
    if spec in _MODELS:
        return _MODELS[spec]
    from prunelab.storage import load

    lm = load(spec)
    while len(_MODELS) >= _MAX_CACHED:
        _MODELS.pop(next(iter(_MODELS)))
    _MODELS[spec] = lm
    return lm


def forget_models() -> None:
    _MODELS.clear()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def checkpoint_complete(path: Path) -> bool:
    return (path / POINT_MARKER).is_file()


def prune_config_for(cell: Cell) -> Any:
    from prunelab.pruning.registry import load_plugins
    from prunelab.pruning.types import PruneConfig

    load_plugins(cell.plugins)  # the study's plug-in methods: a fresh worker process has not registered them
    kwargs = {**cell.prune, **cell.method_options}
    kwargs.pop("recover", None)  # recovery after the method: `recovery_for`
    return PruneConfig.from_settings(cell.method, sparsity=cell.sparsity, pattern=cell.pattern, **kwargs)


def cell_recovery(cell: Cell) -> Any:
    """The cell's recovery (`recover:` axis or a method entry's `recover`), None when it has none."""
    spec = cell.method_options.get("recover")
    if spec is None:
        return None
    from prunelab.recovery.config import RecoveryConfig

    return RecoveryConfig.from_spec(spec)


def ensure_checkpoint(cell: Cell, study_dir: Path) -> Path:
    """The pruned checkpoint of `cell`'s point: reuse it, or prune the dense model and save it.

    Written into a temporary sibling and renamed (atomic); the marker file is written last
    inside it, so a directory without the marker is never trusted.
    """
    if cell.is_dense:
        from prunelab.models import resolve_source

        return resolve_source(cell.model)
    ckpt = checkpoint_dir(cell, study_dir)
    if checkpoint_complete(ckpt):
        return ckpt
    with _file_lock(ckpt.with_name(ckpt.name + ".lock")):
        if checkpoint_complete(ckpt):
            return ckpt
        from prunelab.io import atomic_dir, write_json
        from prunelab.pruning import prune, save_pruned
        from prunelab.storage import load

        config = prune_config_for(cell)
        lm = load(cell.model)
        before = _BEFORE.get(cell.model) or _BEFORE.setdefault(cell.model, block_profile(lm))
        t0 = time.perf_counter()
        recovery = cell_recovery(cell)
        if recovery is None:
            result = prune(lm, config, progress=_progress)
        else:
            from prunelab.recovery.pipeline import prune_and_recover

            result = prune_and_recover(lm, config, recovery, lambda: load(cell.model), progress=_progress,
                                       state_dir=ckpt.with_name(ckpt.name + ".recovery"))
        prune_s = time.perf_counter() - t0
        with atomic_dir(ckpt) as tmp:
            save_pruned(lm, result, tmp)
            report = result.to_dict()
            report.pop("matrices", None)
            profile = {"before": before, "after": block_profile(lm)}
            write_json(tmp / POINT_MARKER, {"point": cell.point_dict(), "prune": report, "prune_wall_s": prune_s,
                                            "block_profile": profile})
        del lm
    return ckpt


def block_profile(lm: LoadedModel) -> dict[str, Any]:
    """Per transformer block: prunable weights, exact zeros, and a histogram of the nonzero |w|.

    Bins are `PROFILE_EDGES` (8 per decade, 1e-6 to 10; one extra bin each side), so the report
    can draw a per-block CDF of |w| before and after pruning without keeping the checkpoint.
    """
    import torch

    edges = torch.tensor(PROFILE_EDGES, dtype=torch.float32)
    blocks: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for m in lm.prunable:
            w = m.weight(lm.model).detach().abs().float().flatten()
            b = blocks.setdefault(f"{m.stack}.{m.block}", {"numel": 0, "zeros": 0, "hist": [0] * (len(edges) + 1)})
            zeros = int((w == 0).sum())
            counts = torch.bincount(torch.bucketize(w, edges), minlength=len(edges) + 1).tolist()
            counts[0] -= zeros  # |w| = 0 falls in the first bin: zeros are counted apart
            b["numel"] += int(w.numel())
            b["zeros"] += zeros
            b["hist"] = [x + int(c) for x, c in zip(b["hist"], counts, strict=True)]
    return {"edges": PROFILE_EDGES, "blocks": blocks}


def _point_info(ckpt: Path) -> dict[str, Any]:
    import json

    return json.loads((ckpt / POINT_MARKER).read_text())


def _dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


# ---------------------------------------------------------------------------------------------
# The cell kinds
# ---------------------------------------------------------------------------------------------


class Measured(NamedTuple):
    """What a cell kind measured: its metrics payload and, for prune/size cells, bytes on disk."""

    metrics: dict[str, Any]
    sizes: Sizes = Sizes()


def _run_analyze(cell: Cell, study_dir: Path) -> Measured:
    from prunelab.analysis import analyze

    out = study_dir / "analysis" / slug(cell.model)
    stats = analyze(cell.model, out)
    files = {p.name: str(p.relative_to(study_dir)) for p in sorted(out.glob("*")) if p.is_file()}
    summary = {k: stats.get(k) for k in ("model", "family", "overall")}
    return Measured({**summary, "files": files, "out_dir": str(out.relative_to(study_dir))})


def _run_prune(cell: Cell, study_dir: Path) -> Measured:
    ckpt = ensure_checkpoint(cell, study_dir)
    info = _point_info(ckpt)
    report = info.get("prune", {})
    metrics = {k: report.get(k) for k in ("requested_sparsity", "achieved_sparsity_prunable",
                                           "achieved_sparsity_total", "prunable_params", "prunable_zeros",
                                           "total_params", "total_zeros", "calibration", "timings_s",
                                           "peak_rss_bytes", "warnings")}
    metrics["prune_wall_s"] = info.get("prune_wall_s")
    if info.get("block_profile"):
        metrics["block_profile"] = info["block_profile"]
    metrics["checkpoint"] = str(ckpt.relative_to(study_dir))
    return Measured(metrics, Sizes(checkpoint_bytes=_dir_bytes(ckpt)))


def _run_bench(cell: Cell, study_dir: Path) -> Measured:
    from prunelab.evaluation import evaluate
    from prunelab.evaluation.types import EvalOptions

    source = ensure_checkpoint(cell, study_dir)
    spec = cell.model if cell.is_dense else str(source)
    lm = _load(spec)
    opts = dict(cell.options)
    clamped = _clamp_seqlen(lm, opts)
    if cell.bench == "embed" and not cell.is_dense:
        opts["reference"] = _load(cell.model)
    result = evaluate(lm, cell.bench, EvalOptions(**opts))
    d = result.to_dict()
    d["model"] = cell.model  # the checkpoint path is an implementation detail
    if clamped:
        d["seqlen_clamped_to"] = clamped
    return Measured(d)


def _clamp_seqlen(lm: LoadedModel, opts: dict[str, Any]) -> int | None:
    """A preset's window (e.g. 512) may exceed a small model's context: use the context instead.

    Deterministic given the model, so the cell hash still identifies the result; recorded in
    the metrics as `seqlen_clamped_to`.
    """
    seqlen = opts.get("seqlen")
    context = lm.context_length
    if isinstance(seqlen, int) and context is not None and seqlen > context:
        opts["seqlen"] = context
        return context
    return None


def _run_size(cell: Cell, study_dir: Path) -> Measured:
    from prunelab.storage import save, size_report

    ckpt = ensure_checkpoint(cell, study_dir)
    lm = _load(str(ckpt))
    out = study_dir / "sparse" / cell.point_hash[:16]
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    save(lm, out, format="sparse")
    save_s = time.perf_counter() - t0
    report = size_report(out)
    sparse_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)  # the number is what the study keeps, not the copy
    totals = report["totals"]["all"]
    sizes = Sizes(
        dense_bytes=_dir_bytes(ckpt),  # the pruned HF checkpoint: dense tensors with zeros
        sparse_bytes=report["checkpoint"]["total_file_bytes"],
        sparse_dir_bytes=sparse_bytes,
        entropy_bound_bytes=totals["entropy_bound_bytes"],
        bitmask_bound_bytes=totals["bitmask_bound_bytes"],
        tensor_dense_bytes=totals["dense_bytes"],
        tensor_stored_bytes=totals["stored_bytes"],
        save_s=save_s,
    )
    return Measured({"size_report": {k: v for k, v in report.items() if k != "tensors"}}, sizes)


def _run_speed(cell: Cell, study_dir: Path) -> Measured:
    from prunelab.runtime import bench_model
    from prunelab.storage import load

    ckpt = ensure_checkpoint(cell, study_dir)
    lm = load(str(ckpt))  # fresh: the runtime may swap modules in place
    kwargs = {k: v for k, v in cell.options.items() if k in SPEED_KWARGS}
    kwargs.setdefault("measure_size", False)  # the size cell measures the sparse format already
    kwargs.setdefault("measure_rss", False)  # a subprocess per cell: opt in with speed.measure_rss
    result = bench_model(lm, progress=_progress, **kwargs)
    del lm
    return Measured(result)


KIND_FUNCS = {"analyze": _run_analyze, "prune": _run_prune, "bench": _run_bench, "size": _run_size,
              "speed": _run_speed}


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))

    torch.manual_seed(seed)


def execute_cell(payload: dict[str, Any], study_dir: str, threads: int | None = None) -> CellResult:
    """Run one cell and return its result (never raises for the cell's own errors)."""
    cell = Cell.from_dict(payload)
    root = Path(study_dir)
    log_path = log_path_for(cell, root)
    started = time.time()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    _reset_peak_rss()
    status, error, out = "done", None, Measured({})
    with _capture(log_path) as log:
        print(f"== {cell.label}  hash={cell.hash}  pid={os.getpid()}  {time.strftime('%Y-%m-%d %H:%M:%S')}")
        print(f"config: {canonical_json(cell.to_dict())}")
        try:
            import torch

            if threads:
                torch.set_num_threads(int(threads))
            _seed_everything(int(cell.prune.get("seed", cell.options.get("seed", 0))))
            out = KIND_FUNCS[cell.kind](cell, root)
        except Exception as exc:  # a failing cell is a result, not a crash
            status = "failed"
            error = error_line(exc)
            traceback.print_exc(file=log)
        if cell.kind == "speed":
            forget_models()
        wall = time.perf_counter() - t0
        print(f"== {status} in {wall:.2f} s" + (f": {error}" if error else ""))
    return CellResult(
        status, error=error, metrics=out.metrics, sizes=out.sizes, started_at=started, finished_at=time.time(),
        wall_s=wall, cpu_s=time.process_time() - cpu0, peak_rss_bytes=_peak_rss_bytes(),
        versions=library_versions(), log_path=str(log_path), host=socket.gethostname(), pid=os.getpid(),
    )

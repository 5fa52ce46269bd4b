"""`analyze`: weight-magnitude structure of a checkpoint, streamed from its safetensors files.

The model is never instantiated with weights: its module tree is built on the meta device to
name the tensors (naming.py), then every tensor in scope is read range by range into mergeable
summaries (stats.py: a compiled `pread` loop over 256 KiB pieces for float32/bfloat16/float16, else
reader.py's memory-mapped windows). Peak memory is a piece or a window per thread plus the
interpreter, so a model larger than RAM can be analyzed. Everything is checked
before the output directory is created, and outputs go through `atomic_dir`, so a bad input
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prunelab.analysis.naming import TensorRole, build_meta_model, classify_keys, ordered_types
from prunelab.analysis.reader import CHUNK_BYTES, IO_MODES, TensorInfo, chunk_ranges, read_header, with_chunk
from prunelab.analysis.stats import (
    BINS_PER_DECADE,
    EDGES_LOG10,
    LOG10_HI,
    LOG10_LO,
    PIECE,
    QUANTILES,
    THRESHOLDS,
    Summary,
    can_scan_file,
    merged,
    summarize_file_range,
    warm_up,
)
from prunelab.errors import CheckpointError, ModelLoadError
from prunelab.io import atomic_dir, atomic_file
from prunelab.models import detect_family, parse_spec, read_config, resolve_source, weight_files
from prunelab.models.types import Family, ModelSpec
from prunelab.storage import is_sparse_checkpoint, iter_tensors

STACK_ORDER = {"encoder": 0, "decoder": 1}
OUTPUT_FILES = ("stats.json", "stats.csv", "hist_abs_log.png", "cdf_abs.png", "cdf_by_block.png",
                "heatmap_below_1e-2.png")

DEFINITIONS = {
    "params": "number of weights in the group",
    "zeros": "number of weights exactly equal to 0 (zero_fraction = zeros / params)",
    "nonfinite": "number of NaN/inf weights (excluded from histogram, quantiles, mean, std, max)",
    "fraction_below": "fraction of the group's weights with |w| < threshold (exact count / params; zeros count)",
    "quantiles": "quantiles of |w| in percent, read from the merged histogram (within one bin of exact)",
    "mean": "mean of |w| (float64)",
    "std": "population standard deviation of |w| (float64)",
    "max": "max of |w|",
    "hist": "counts over fixed log10|w| bins shared by all groups (they add up exactly): with "
            "e = histogram.edges_log10, hist[0] counts 0 < |w| < 10**e[0], hist[i] counts e[i-1] <= log10|w| < e[i], "
            "hist[-1] counts log10|w| >= e[-1]; exact zeros are in 'zeros', NaN/inf in 'nonfinite'",
    "below": "exact counts behind fraction_below",
}


def plan(spec_or_path: str | Path | ModelSpec, *, include_all: bool = False) -> dict[str, Any]:
    """Resolve the model and name every tensor in scope, reading only headers and config.

    Raises a `PrunelabError` for every bad input (missing path, no weights, corrupt file,
    not a transformer) before anything is written.
    """
    spec = parse_spec(str(spec_or_path) if isinstance(spec_or_path, Path) else spec_or_path)
    source = resolve_source(spec)
    files = weight_files(source)
    tensors: list[TensorInfo] = []
    for f in files:
        tensors.extend(read_header(f))
    config = read_config(source)
    family = _family(config)
    model = build_meta_model(source, config, family)
    floats = [t for t in tensors if t.is_float]
    roles, unmatched, missing = classify_keys([t.name for t in floats], model, family, include_all=include_all)
    if not any(r.prunable for r in roles.values()):
        raise ModelLoadError(
            f"{spec.raw}: no prunable matrices (linears inside numbered transformer blocks) among the "
            f"{len(floats)} checkpoint tensors: is it a transformer checkpoint?"
        )
    selected = [t for t in floats if t.name in roles]
    return {
        "spec": spec, "source": source, "files": files, "family": family,
        "model_type": getattr(config, "model_type", ""), "tensors": selected, "roles": roles,
        "unmatched": unmatched, "missing": missing, "skipped_nonfloat": [t.name for t in tensors if not t.is_float],
    }


def default_workers() -> int:
    """Scan threads: the numba kernels release the GIL, so chunks of weights scan in parallel."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


#: Byte range of one scan job with the compiled pread loop: memory does not grow with it (the loop
#: reuses one 256 KiB piece), it only sets the granularity of threads and progress.
JOB_BYTES = 16 * 1024 * 1024
SCAN_MODES = ("pread", *IO_MODES)


def _scan_one(job: tuple[TensorInfo, int, int, str]) -> Summary:
    info, off, length, io = job
    if io == "pread" and can_scan_file(info.dtype):
        try:
            return summarize_file_range(info.file, off, length, info.dtype)
        except EOFError as exc:
            raise CheckpointError(f"{info.file} ended early while reading '{info.name}' (truncated?)") from exc
        except OSError:
            pass  # a failed pread (e.g. EINTR on a network file system): the Python reader retries, naming real errors
    s = Summary()
    step = CHUNK_BYTES if io == "pread" else length  # pread jobs are large: Python windows stay small
    for sub in range(off, off + length, step):
        with_chunk(info, sub, min(step, off + length - sub), s.update, io="mmap" if io == "pread" else io)
    return s


def _family(config: Any) -> Family:
    """`detect_family`, with any internal failure on an unknown config turned into the one-line error."""
    try:
        return detect_family(config)
    except (ImportError, AttributeError) as exc:  # e.g. a transformers API moved: still a one-line message
        raise ModelLoadError(
            f"cannot tell the family of model_type '{getattr(config, 'model_type', '')}': prunelab handles "
            "encoder, decoder and encoder-decoder transformers"
        ) from exc


def scan(tensors: list[TensorInfo], *, chunk_bytes: int | None = None, workers: int | None = None,
         io: str = "pread", progress: Callable[[int, int], None] | None = None) -> dict[str, Summary]:
    """Summaries per tensor, streamed range by range in file order.

    Byte ranges of tensors are independent jobs for `workers` threads. `io="pread"` (default)
    scans float32/bfloat16/float16 ranges in the compiled pread loop (one 256 KiB piece per thread in
    memory, ranges of `chunk_bytes`, default 16 MiB) and other dtypes like "mmap"; "mmap" and
    "read" hand `chunk_bytes` windows (default 2 MiB) to Python, so `workers × chunk_bytes` is
    in memory. Partial summaries are merged in range order: results do not depend on timing.
    """
    ordered = sorted(tensors, key=lambda t: (str(t.file), t.start))
    if io not in SCAN_MODES:
        raise ValueError(f"io must be one of {SCAN_MODES}")
    warm_up()
    chunk_bytes = chunk_bytes or (JOB_BYTES if io == "pread" else CHUNK_BYTES)
    jobs = [(t, off, length, io) for t in ordered for off, length in chunk_ranges(t, chunk_bytes)]
    total = sum(t.nbytes for t in ordered)
    out: dict[str, Summary] = {t.name: Summary() for t in ordered}
    workers = workers or default_workers()
    done = 0
    if workers == 1:
        results = map(_scan_one, jobs)
        for (t, _, length, _), part in zip(jobs, results, strict=True):
            out[t.name].merge(part)
            done += length
            if progress is not None:
                progress(done, total)
        return out
    return _scan_threaded(jobs, out, workers, total, progress)


def _scan_threaded(jobs: list[tuple[TensorInfo, int, int, str]], out: dict[str, Summary], workers: int, total: int,
                   progress: Callable[[int, int], None] | None) -> dict[str, Summary]:
    """Run jobs on `workers` plain threads that pull the next job index themselves.

    The scan kernels release the GIL, so what limits two threads is Python work between jobs.
    A thread pool costs a future, a submit and a wake-up of the merging thread per job, which
    measured 25 % slower than this; here the main thread only wakes every 20 ms to merge the
    finished prefix (in job order, so results do not depend on timing) and report progress.
    """
    results: list[Summary | None] = [None] * len(jobs)
    failures: dict[int, BaseException] = {}
    claim = itertools.count()  # next() on it is atomic under the GIL
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            i = next(claim)
            if i >= len(jobs):
                return
            try:
                results[i] = _scan_one(jobs[i])
            except BaseException as exc:  # re-raised by the main thread
                failures[i] = exc
                stop.set()
                return

    threads = [threading.Thread(target=work, name=f"prunelab-scan-{k}", daemon=True) for k in range(workers)]
    merged_upto = done = 0
    try:
        for th in threads:
            th.start()
        while True:
            alive = False
            for th in threads:
                th.join(timeout=0.02)
                alive = alive or th.is_alive()
            while merged_upto < len(jobs) and (part := results[merged_upto]) is not None:
                job = jobs[merged_upto]
                out[job[0].name].merge(part)
                results[merged_upto] = None
                merged_upto += 1
                done += job[2]
            if progress is not None:
                progress(done, total)
            if not alive:
                break
    finally:
        stop.set()
        for th in threads:
            th.join()
    if failures:
        raise failures[min(failures)]
    return out


def _block_sort_key(key: str) -> tuple[int, int]:
    if key == "outside":
        return (9, 0)
    stack, block = key.split(".")
    return (STACK_ORDER[stack], int(block))


def build_stats(p: dict[str, Any], summaries: dict[str, Summary], *, include_all: bool,
                seconds: float, workers: int | None = None) -> dict[str, Any]:
    """The stats.json document from per-tensor summaries (groups are exact merges)."""
    roles: dict[str, TensorRole] = p["roles"]
    infos = {t.name: t for t in p["tensors"]}
    position = {t.name: i for i, t in enumerate(p["tensors"])}  # checkpoint order within files
    order = sorted(position, key=lambda k: (_block_sort_key(roles[k].block_key), position[k]))
    by_block: dict[str, list[Summary]] = {}
    by_type: dict[str, list[Summary]] = {}
    for k in order:
        by_block.setdefault(roles[k].block_key, []).append(summaries[k])
        by_type.setdefault(roles[k].module_type, []).append(summaries[k])
    matrices: dict[str, Any] = {}
    for k in order:
        r, t = roles[k], infos[k]
        matrices[k] = {
            "module": r.module, "stack": r.stack, "block": r.block, "module_type": r.module_type,
            "prunable": r.prunable, "shape": list(t.shape), "dtype": t.dtype, "file": t.file.name,
            **summaries[k].to_dict(),
        }
    nbytes = sum(t.nbytes for t in p["tensors"])
    return {
        "model": p["spec"].raw,
        "family": p["family"],
        "model_type": p["model_type"],
        "source": str(p["source"]),
        "scope": "all" if include_all else "prunable",
        "scope_note": ("all floating-point tensors: prunable matrices plus embeddings, norms, biases, heads"
                       if include_all else "prunable matrices: linears inside transformer blocks"),
        "overall": merged(summaries[k] for k in order).to_dict(),
        "by_block": {b: merged(by_block[b]).to_dict() for b in sorted(by_block, key=_block_sort_key)},
        "by_module_type": {m: merged(by_type[m]).to_dict() for m in ordered_types(list(by_type))},
        "matrices": matrices,
        "thresholds": list(THRESHOLDS),
        "quantile_percents": list(QUANTILES),
        "histogram": {"log10_lo": LOG10_LO, "log10_hi": LOG10_HI, "bins_per_decade": BINS_PER_DECADE,
                      "edges_log10": [float(x) for x in EDGES_LOG10],
                      "note": "nominal edges 10**(k/40) snapped to float32 values with 256 steps per octave"},
        "definitions": DEFINITIONS,
        "unmatched_checkpoint_keys": p["unmatched"],
        "missing_prunable_matrices": p["missing"],
        "skipped_nonfloat_tensors": p["skipped_nonfloat"],
        "scan": {"tensors": len(order), "bytes": nbytes, "seconds": round(seconds, 4),
                 "gb_per_s": round(nbytes / seconds / 1e9, 3) if seconds > 0 else None,
                 "how": f"wall time of the streaming scan only (pread of {PIECE * 4 // 1024} KiB pieces, "
                        f"{workers or default_workers()} threads), excluding naming and plotting",
                 "machine": platform.machine()},
    }


CSV_COLUMNS = (["name", "module", "stack", "block", "module_type", "prunable", "shape", "dtype", "params", "zeros",
                "nonfinite"] + [f"frac_below_{t}" for t in THRESHOLDS] + [f"q{q}_abs" for q in QUANTILES]
               + ["mean_abs", "std_abs", "max_abs"])


def write_csv(stats: dict[str, Any], path: Path) -> None:
    """One row per matrix, for spreadsheet users (no histograms)."""
    with atomic_file(path, "w") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for name, m in stats["matrices"].items():
            w.writerow([name, m["module"], m["stack"], "" if m["block"] is None else m["block"], m["module_type"],
                        int(m["prunable"]), "x".join(map(str, m["shape"])), m["dtype"], m["params"], m["zeros"],
                        m["nonfinite"]]
                       + [repr(m["fraction_below"][t]) for t in THRESHOLDS]
                       + [repr(m["quantiles"][q]) for q in QUANTILES]
                       + [repr(m["mean"]), repr(m["std"]), repr(m["max"])])


def write_stats_json(stats: dict[str, Any], path: Path) -> None:
    """Indented JSON with number lists (histograms, edges) kept on one line each."""
    with atomic_file(path, "w") as fh:
        fh.write(_dumps(stats, 0))
        fh.write("\n")


def _dumps(obj: Any, level: int) -> str:
    import json

    pad = "  " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(obj, list | tuple) and obj and any(isinstance(v, dict | list) for v in obj):
        return "[\n" + ",\n".join(pad + _dumps(v, level + 1) for v in obj) + "\n" + "  " * level + "]"
    if isinstance(obj, Path):
        obj = str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        obj = None  # strict JSON has no NaN
    return json.dumps(obj)


@contextlib.contextmanager
def _dense_view(source: Path) -> Iterator[Path]:
    """A prunelab sparse checkpoint decoded into plain safetensors, one tensor per file.

    The streaming reader works on dense safetensors; decoding one tensor at a time into a
    temporary directory (`storage.iter_tensors`) keeps peak memory at about one dense tensor.
    """
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="prunelab-analyze-") as tmp:
        shutil.copy(source / "config.json", tmp)
        for i, (name, t) in enumerate(iter_tensors(source)):  # tied weights come once
            save_file({name: t.contiguous()}, str(Path(tmp) / f"part-{i:05d}.safetensors"))
        yield Path(tmp)


def analyze(spec_or_path: str | Path | ModelSpec, out_dir: str | Path, *, include_all: bool = False,
            plots: bool = True, progress: Callable[[int, int], None] | None = None,
            workers: int | None = None) -> dict[str, Any]:
    """Write stats.json, stats.csv and four plots about |w| of a model into `out_dir`.

    Returns the stats.json content. Default scope: prunable matrices; `include_all` adds
    embeddings, norms, biases and heads. `out_dir` appears only when everything succeeded.
    `progress(bytes_done, bytes_total)` is called during the scan; `workers` = scan threads.
    """
    spec = parse_spec(str(spec_or_path) if isinstance(spec_or_path, Path) else spec_or_path)
    source = resolve_source(spec)
    with contextlib.ExitStack() as stack:
        target: str | ModelSpec = spec
        if is_sparse_checkpoint(source):
            target = str(stack.enter_context(_dense_view(source)))
        p = plan(target, include_all=include_all)
        p["spec"], p["source"] = spec, source
        warm_up()
        t0 = time.perf_counter()
        summaries = scan(p["tensors"], progress=progress, workers=workers)
        seconds = time.perf_counter() - t0
    stats = build_stats(p, summaries, include_all=include_all, seconds=seconds, workers=workers)
    with atomic_dir(out_dir) as tmp:
        write_stats_json(stats, tmp / "stats.json")
        write_csv(stats, tmp / "stats.csv")
        if plots:
            from prunelab.analysis.plots import make_plots

            make_plots(stats, tmp)
    return stats

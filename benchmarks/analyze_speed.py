"""How fast does `prunelab analyze` stream weights, next to merely reading the same bytes?

For one model (default zoo:smollm2, prunable scope) this measures, in a fresh child process:

* **read**: `readinto` of exactly the bytes the scan visits (same files, same byte ranges) into
  one reused buffer of 256 KiB, 1 MiB and 2 MiB — the cost of touching the data at all. The
  goal's reference is the fastest of the three (the strictest choice); a 2-thread read and
  `safe_open(...).get_tensor(name).clone()` of the same tensors are printed for comparison;
* **scan**: `prunelab.analysis.scan` over those tensors (compiled pread loop → histograms,
  threshold counts, moments), with 1 thread and with the default thread count, and the
  Python memory-mapped reader (`io="mmap"`) for comparison;
* **analyze**: the whole `analyze()` call (naming on the meta device, scan, stats.json/csv,
  four plots), wall time;
* **memory**: VmRSS just before the scan (interpreter + libraries + meta model = overhead),
  and the peak (VmHWM, reset right before the scan via /proc/self/clear_refs) during it.

Reads and scans alternate, after one warm-up pass, so both see the same (warm) page cache.
Numbers are medians over `--repeats`; ratios are of medians from this one run. Wall time and
process CPU time are both reported: on a shared machine the CPU-time ratio is the stabler one
(with threads, CPU time adds up over threads, so only wall time shows the parallel gain).

    .venv/bin/python benchmarks/analyze_speed.py [--model zoo:smollm2] [--all] [--repeats 5]
        [--cast bf16|f16] [--out benchmarks/results/analyze_speed.json]

`--cast` first writes the tensors in scope, cast to that dtype, to a temporary safetensors file
and measures on it (half the bytes per weight: expect about half the read-speed ratio at the
same weights per second); `analyze()` end to end is then skipped.

Goals (issue 2): scan throughput >= 0.5 x read throughput; peak RSS below 2 x the largest
single tensor in scope plus the interpreter overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _cast_copy(tensors: list[Any], dtype: str, path: Path) -> list[Any]:
    """Write the tensors, cast to `dtype`, into one safetensors file; its TensorInfos, same names."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from prunelab.analysis.reader import read_header

    target = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    out = {}
    for t in tensors:
        with safe_open(str(t.file), "pt") as fh:
            out[t.name] = fh.get_tensor(t.name).to(target)
    save_file(out, str(path))
    return read_header(path)


def _child(args: argparse.Namespace) -> dict[str, Any]:
    from prunelab.analysis import analyze, plan, scan
    from prunelab.analysis.core import default_workers
    from prunelab.analysis.reader import iter_read_chunks
    from prunelab.analysis.stats import PIECE, warm_up

    p = plan(args.model, include_all=args.all)
    warm_up()
    tensors = p["tensors"]
    tmpdir = tempfile.TemporaryDirectory()
    if args.cast:
        tensors = _cast_copy(tensors, args.cast, Path(tmpdir.name) / f"{args.cast}.safetensors")
    nbytes = sum(t.nbytes for t in tensors)
    largest = max(tensors, key=lambda t: t.nbytes)

    def reader(buf_bytes: int, threads: int = 1) -> Callable[[], None]:
        def read(part: list[Any]) -> None:
            buf = bytearray(buf_bytes)
            for t in part:
                for _ in iter_read_chunks(t, buf):
                    pass

        def run() -> None:
            if threads == 1:
                read(tensors)
                return
            pool = [threading.Thread(target=read, args=(tensors[k::threads],)) for k in range(threads)]
            for th in pool:
                th.start()
            for th in pool:
                th.join()

        return run

    def read_safetensors() -> None:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for t in tensors:
            by_file.setdefault(t.file, []).append(t.name)
        for f, names in by_file.items():
            with safe_open(str(f), "pt") as fh:
                for name in names:
                    fh.get_tensor(name).clone()  # get_tensor alone may return an untouched mmap view

    workers = default_workers()
    # Memory of the scan alone, measured first on a clean peak.
    rss_before = _status("VmRSS")
    reset_ok = _reset_peak()
    scan(tensors, workers=workers)
    peak_scan = _status("VmHWM")
    reader(1 << 20)()  # warm-up pass, page cache now warm for all
    read_sizes = {"read_256k": 256 << 10, "read_1m": 1 << 20, "read_2m": 2 << 20}
    runs: dict[str, Any] = {k: reader(v) for k, v in read_sizes.items()}
    runs.update({
        f"read_1m_{workers}_threads": reader(1 << 20, workers),
        "safe_open_clone": read_safetensors,
        "scan_1_thread": lambda: scan(tensors, workers=1),
        f"scan_{workers}_threads": lambda: scan(tensors, workers=workers),
        f"scan_{workers}_threads_python_mmap": lambda: scan(tensors, workers=workers, io="mmap"),
    })
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    analyze_s = None
    if not args.cast:
        t0 = time.perf_counter()
        analyze(args.model, Path(tmpdir.name) / "out", include_all=args.all)
        analyze_s = time.perf_counter() - t0
    tmpdir.cleanup()
    peak_process = _status("VmHWM")
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "model": args.model, "scope": "all" if args.all else "prunable", "tensors": len(tensors),
        "dtype": args.cast or "as stored", "values": sum(t.numel for t in tensors),
        "bytes": nbytes, "largest_tensor": largest.name, "largest_tensor_bytes": largest.nbytes,
        "workers": workers, "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
        "piece_bytes": PIECE * 4, "read_variants": list(read_sizes), "repeats": args.repeats,
        "seconds": times, "cpu_seconds": cpu, "median_s": med, "median_cpu_s": med_cpu,
        "gb_per_s": {k: nbytes / v / 1e9 for k, v in med.items()},
        "gb_per_cpu_s": {k: nbytes / v / 1e9 for k, v in med_cpu.items()},
        "analyze_total_s": analyze_s,
        "rss_before_scan_bytes": rss_before, "peak_rss_during_scan_bytes": peak_scan,
        "peak_reset_ok": reset_ok, "peak_rss_process_bytes": peak_process,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo:smollm2")
    ap.add_argument("--all", action="store_true", help="include embeddings, norms, biases (analyze --all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cast", choices=["bf16", "f16"], help="measure on a temporary copy in this dtype")
    ap.add_argument("--out", default="benchmarks/results/analyze_speed.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--repeats", str(args.repeats)]
    if args.all:
        cmd.append("--all")
    if args.cast:
        cmd += ["--cast", args.cast]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    best = max(r["read_variants"], key=lambda k: r["gb_per_s"][k])
    r["read_reference"] = best
    read_gbs = r["gb_per_s"][best]
    scan_key = f"scan_{r['workers']}_threads"
    overhead = r["rss_before_scan_bytes"]
    scan_extra = r["peak_rss_during_scan_bytes"] - overhead
    r["ratio_to_read"] = {k: v / read_gbs for k, v in r["gb_per_s"].items()}
    r["ratio_to_read_cpu_time"] = {k: v / r["gb_per_cpu_s"][best] for k, v in r["gb_per_cpu_s"].items()}
    r["scan_extra_rss_bytes"] = scan_extra
    r["goals"] = {
        "throughput_ratio_at_least_0.5": r["ratio_to_read"][scan_key] >= 0.5,
        "peak_rss_below_2x_largest_plus_overhead": r["peak_rss_during_scan_bytes"]
        < 2 * r["largest_tensor_bytes"] + overhead,
    }
    r["how"] = ("medians over repeats in one child process, runs interleaved; reference = the fastest "
                "single-thread readinto of the same byte ranges (256 KiB / 1 MiB / 2 MiB buffer); "
                "RSS from /proc/self/status (VmRSS before the scan; VmHWM reset before the scan)")
    mb = 1024 * 1024
    print(f"{r['model']} ({r['scope']} scope): {r['tensors']} tensors, {r['bytes'] / 1e9:.3f} GB, "
          f"{r['cpus']} CPUs, load avg {r['load_avg_1min']:.1f}")
    read_cpu = r["gb_per_cpu_s"][best]
    print(f"{'measurement':<34}{'wall s':>8}{'GB/s':>8}{'x read':>8}{'cpu s':>8}{'GB/cpu-s':>10}{'x read':>8}")
    for k, v in r["median_s"].items():
        g, gc, c = r["gb_per_s"][k], r["gb_per_cpu_s"][k], r["median_cpu_s"][k]
        print(f"{k:<34}{v:>8.3f}{g:>8.2f}{g / read_gbs:>8.2f}{c:>8.3f}{gc:>10.2f}{gc / read_cpu:>8.2f}")
    print(f"reference read: {best} ({read_gbs:.2f} GB/s); 'x read' columns are ratios to it")
    print(f"scan, {r['workers']} threads: {r['values'] / r['median_s'][scan_key] / 1e9:.2f} G weights/s "
          f"(dtype: {r['dtype']})")
    if r["analyze_total_s"] is not None:
        print(f"{'analyze() end to end':<34}{r['analyze_total_s']:>8.2f} s  (naming + scan + stats + 4 plots)")
    print(f"largest tensor in scope: {r['largest_tensor']} = {r['largest_tensor_bytes'] / mb:.1f} MiB")
    print(f"RSS before scan (interpreter, torch, transformers, numba, meta model): {overhead / mb:.0f} MiB")
    print(f"peak RSS during scan: {r['peak_rss_during_scan_bytes'] / mb:.0f} MiB "
          f"(+{scan_extra / mb:.1f} MiB; budget 2 x largest = {2 * r['largest_tensor_bytes'] / mb:.1f} MiB)")
    print(f"goals: {r['goals']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from prunelab.io import write_json

    write_json(out, r)
    print(f"saved {out}")


if __name__ == "__main__":
    main()

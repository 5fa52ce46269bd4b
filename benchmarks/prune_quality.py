"""Pruning quality and cost on a real decoder: perplexity, wall time and peak RSS per method.

Default: zoo:smollm2 at 50 % unstructured and 2:4, methods magnitude (global), wanda and
sparsegpt, calibrated on 64 × 512-token windows of the default calibration text (MRPC
training sentences); perplexity on the first 32 × 1024 tokens of the WikiText-2 raw test set
via `prunelab.evaluation.evaluate(lm, "ppl", ...)`. Also times one dense forward pass over the
calibration set (batch 1 per window, logits included) so that "wanda pruning time ≤ 1.5× one
dense forward" can be checked.

Every method runs in its own child process so that peak RSS (ru_maxrss) is per method.

    nice .venv/bin/python benchmarks/prune_quality.py                      # the full run (heavy)
    .venv/bin/python benchmarks/prune_quality.py --nsamples 4 --seqlen 128 --eval-windows 2 --eval-seqlen 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process: dense (forward timing + ppl) or one method (prune + ppl)."""
    import torch

    from prunelab.evaluation import evaluate
    from prunelab.evaluation.types import EvalOptions
    from prunelab.pruning import PruneConfig, peak_rss_bytes, prune
    from prunelab.storage import load

    torch.manual_seed(0)
    lm = load(args.model)
    opts = EvalOptions(seqlen=args.eval_seqlen, max_tokens=args.eval_windows * args.eval_seqlen)
    row: dict[str, Any] = {"model": args.model, "method": args.child, "pattern": args.pattern}
    if args.child == "dense":
        from prunelab.data.calibration import calibration_inputs

        config = PruneConfig(method="wanda", sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                             seed=args.seed)
        calib = calibration_inputs(lm, config)
        times = []
        with torch.no_grad():
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for sample in calib:
                    lm.model(**sample, use_cache=False)
                times.append(time.perf_counter() - t0)
        row.update(dense_forward_s=statistics.median(times), dense_forward_all_s=times, sparsity_prunable=0.0)
    else:
        config = PruneConfig(method=args.child, sparsity=args.sparsity, pattern=args.pattern, nsamples=args.nsamples,
                             seqlen=args.seqlen, seed=args.seed, owl=args.owl)
        result = prune(lm, config)
        row.update(
            sparsity_prunable=result.sparsity_prunable, sparsity_total=result.sparsity_total,
            prune_s=result.timings["pruning"], calib_data_s=result.timings["calibration_data"],
            prune_total_s=result.timings["total"], warnings=result.warnings, calibration=result.calibration,
        )
    t0 = time.perf_counter()
    ev = evaluate(lm, "ppl", opts)
    row.update(ppl=ev.value, ppl_tokens=ev.n_tokens, eval_s=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo:smollm2")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--owl", action="store_true", help="OWL per-block ratios for wanda/sparsegpt")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="dense forward timing repeats (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prune_quality.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--pattern", default="unstructured", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return

    jobs = [("dense", "unstructured")] + [
        (m, p) for p in args.patterns.split(",") for m in args.methods.split(",")
    ]
    rows: list[dict[str, Any]] = []
    base = [sys.executable, __file__, "--model", args.model, "--sparsity", str(args.sparsity), "--nsamples",
            str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--eval-seqlen",
            str(args.eval_seqlen), "--eval-windows", str(args.eval_windows), "--repeats", str(args.repeats)]
    if args.owl:
        base.append("--owl")
    t_all = time.perf_counter()
    for method, pattern in jobs:
        t0 = time.perf_counter()
        proc = subprocess.run([*base, "--child", method, "--pattern", pattern], capture_output=True, text=True,
                              env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{method} {pattern}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"method": method, "pattern": pattern, "error": proc.stderr[-500:]})
            continue
        row = json.loads(line[len("RESULT "):])
        row["child_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  done {method} {pattern}: ppl {row['ppl']:.2f} ({row['child_wall_s']:.0f} s)", file=sys.stderr,
              flush=True)
        from prunelab.io import write_json

        write_json(args.out.with_suffix(".partial.json"), {"rows": rows})  # survives an interrupted run

    dense = next((r for r in rows if r["method"] == "dense" and "ppl" in r), {})
    fwd = dense.get("dense_forward_s")
    header = (f"{'method':<17}{'pattern':<13}{'sparsity':>9}{'ppl':>10}{'prune s':>9}{'×dense fwd':>11}"
              f"{'peak RSS MiB':>13}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "ppl" not in r:
            lines.append(f"{r['method']:<17}{r['pattern']:<13}  FAILED")
            continue
        prune_s = r.get("prune_s")
        ratio = f"{prune_s / fwd:.2f}" if (prune_s is not None and fwd) else "-"
        lines.append(
            f"{r['method']:<17}{r['pattern'] if r['method'] != 'dense' else '-':<13}{r['sparsity_prunable']:>9.3f}"
            f"{r['ppl']:>10.2f}{(f'{prune_s:.1f}' if prune_s is not None else '-'):>9}{ratio:>11}"
            f"{r['peak_rss_bytes'] / 2**20:>13.0f}"
        )
    table = "\n".join(lines)
    print(f"\n{args.model}: {args.nsamples} × {args.seqlen}-token calibration windows (seed {args.seed}); "
          f"ppl on the first {args.eval_windows} × {args.eval_seqlen} tokens of WikiText-2 raw test")
    if fwd:
        print(f"dense forward over the calibration set (batch 1, logits included): {fwd:.1f} s")
    print(table)
    checks: dict[str, Any] = {}
    by = {(r["method"], r["pattern"]): r for r in rows if "ppl" in r}
    s_pat = "unstructured"
    if all((m, s_pat) in by for m in ("magnitude", "wanda", "sparsegpt")):
        p = {m: by[(m, s_pat)]["ppl"] for m in ("magnitude", "wanda", "sparsegpt")}
        checks["sparsegpt_lt_wanda_lt_magnitude_unstructured"] = p["sparsegpt"] < p["wanda"] < p["magnitude"]
    if fwd and ("wanda", s_pat) in by:
        checks["wanda_prune_over_dense_forward"] = by[("wanda", s_pat)]["prune_s"] / fwd
        checks["wanda_within_1_5x_dense_forward"] = checks["wanda_prune_over_dense_forward"] <= 1.5
    print("checks:", json.dumps(checks))
    from prunelab.io import write_json

    write_json(args.out, {
        "benchmark": "prune_quality", "model": args.model, "sparsity": args.sparsity, "nsamples": args.nsamples,
        "seqlen": args.seqlen, "seed": args.seed, "owl": args.owl, "eval_seqlen": args.eval_seqlen,
        "eval_windows": args.eval_windows, "units": {"ppl": "token perplexity", "prune_s": "seconds wall",
                                                      "peak_rss_bytes": "bytes (ru_maxrss of the child)"},
        "threads": os.environ.get("OMP_NUM_THREADS"), "wall_s": time.perf_counter() - t_all,
        "dense_forward_s": fwd, "rows": rows, "checks": checks, "table": table,
    })
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)  # the full result supersedes it
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

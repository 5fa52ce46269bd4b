"""Dense baselines of the evaluation suite on the offline zoo, with wall time per benchmark.

Rows (each one `prunelab.evaluation.evaluate` call on an already-loaded model; model load time
is reported separately):

* zoo:minilm  sst2  probe — frozen mean-pooled features, logistic regression on 2000 seeded
  train rows, accuracy on all 872 dev rows (goal: >= 0.75);
* zoo:minilm  mrpc  probe — same recipe, accuracy and F1 on the 408 dev pairs;
* zoo:minilm  embed — the model against itself (fidelity 1 by construction: checks the
  plumbing and gives the cost of the benchmark);
* zoo:smollm2 ppl   — WikiText-2 raw test, prefix protocol: the first 8 windows of 512 tokens
  (4088 predicted tokens), plus an independent plain loop over the same windows
  (forward with labels, sum of NLL) as a cross-check and a speed reference.

    .venv/bin/python benchmarks/eval_baselines.py [--threads 2] [--skip-smollm2] [--skip-minilm]
        [--out benchmarks/results/eval_baselines.json]

One run; each number is a single measurement (evaluations are deterministic, timings are
wall-clock seconds on whatever else the machine is doing — the load average is recorded).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _plain_loop_ppl(lm: Any, seqlen: int, n_windows: int) -> tuple[float, float]:
    """(ppl, seconds) by the textbook loop: every window through model(..., labels=window)."""
    import torch

    from prunelab.data.wikitext import load_wikitext

    corpus = load_wikitext()
    ids = lm.tokenizer(corpus.text, return_tensors="pt").input_ids[0]
    start = time.perf_counter()
    total = 0.0
    with torch.no_grad():
        for i in range(n_windows):
            window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            total += float(lm.model(input_ids=window, labels=window).loss) * (seqlen - 1)
    return math.exp(total / (n_windows * (seqlen - 1))), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_baselines.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from prunelab.evaluation import EvalOptions, evaluate
    from prunelab.io import write_json
    from prunelab.storage import load

    rows: list[dict[str, Any]] = []

    def record(model: str, bench: str, options: EvalOptions, lm: Any, load_s: float) -> dict[str, Any]:
        result = evaluate(lm, bench, options)
        row = {
            "model": model, "bench": bench, "mode": options.mode if bench in ("sst2", "mrpc") else "",
            "metrics": result.metrics, "primary": result.primary, "value": result.value,
            "n_tokens": result.n_tokens, "n_examples": result.n_examples, "seqlen": result.seqlen,
            "wall_time_s": result.wall_time_s, "model_load_s": load_s, "note": result.note,
            "data_sha256": result.data_sha256,
        }
        rows.append(row)
        print(f"  {model:12s} {bench:6s} {result.primary}={result.value:.4f} ({result.wall_time_s:.1f} s)", flush=True)
        return row

    if not args.skip_minilm:
        t0 = time.perf_counter()
        minilm = load("zoo:minilm")
        load_s = time.perf_counter() - t0
        record("zoo:minilm", "sst2", EvalOptions(), minilm, load_s)
        record("zoo:minilm", "mrpc", EvalOptions(), minilm, load_s)
        record("zoo:minilm", "embed", EvalOptions(reference=minilm), minilm, load_s)

    check: dict[str, Any] = {}
    if not args.skip_smollm2:
        t0 = time.perf_counter()
        smol = load("zoo:smollm2")
        load_s = time.perf_counter() - t0
        row = record("zoo:smollm2", "ppl", EvalOptions(seqlen=512, max_tokens=8 * 512), smol, load_s)
        plain_ppl, plain_s = _plain_loop_ppl(smol, 512, 8)
        check = {
            "plain_loop_ppl": plain_ppl, "plain_loop_s": plain_s,
            "relative_difference": abs(row["value"] - plain_ppl) / plain_ppl,
            "speed_ratio_plain_over_prunelab": plain_s / row["wall_time_s"],
        }

    from rich.console import Console
    from rich.table import Table

    table = Table("model", "bench", "metrics", "n", "seqlen", "eval s", "load s", title="dense evaluation baselines")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items() if v is not None)
        table.add_row(r["model"], r["bench"] + (f" ({r['mode']})" if r["mode"] else ""), metrics,
                      str(r["n_tokens"] or r["n_examples"]), str(r["seqlen"]), f"{r['wall_time_s']:.1f}",
                      f"{r['model_load_s']:.1f}")
    console = Console(width=160)
    console.print(table)
    if check:
        console.print(f"smollm2 ppl cross-check: plain loop {check['plain_loop_ppl']:.4f} "
                      f"in {check['plain_loop_s']:.1f} s; relative difference {check['relative_difference']:.2e}; "
                      f"plain/prunelab time {check['speed_ratio_plain_over_prunelab']:.2f}x", highlight=False)
    minilm_sst2 = next((r for r in rows if r["model"] == "zoo:minilm" and r["bench"] == "sst2"), None)
    goals = {}
    if minilm_sst2 is not None:
        goals["minilm_sst2_probe_accuracy_ge_0.75"] = minilm_sst2["value"] >= 0.75
    if check:
        goals["smollm2_ppl_matches_plain_loop_within_0.1pct"] = check["relative_difference"] < 1e-3
    console.print(f"goals: {goals}", highlight=False)
    payload = {
        "benchmark": "eval_baselines",
        "unit_note": "wall_time_s = seconds of one evaluate() call, model already loaded; one run",
        "threads": args.threads, "load_average": os.getloadavg(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "rows": rows, "smollm2_cross_check": check, "goals": goals,
    }
    write_json(args.out, payload)
    console.print(f"saved {args.out}", highlight=False)


if __name__ == "__main__":
    main()

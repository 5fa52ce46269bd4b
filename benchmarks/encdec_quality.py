"""Encoder-decoder quality under pruning: Whisper tiny.en, dense vs magnitude / Wanda / SparseGPT at 50 %.

For each method the dense weights are restored, the model is pruned in place with
`prunelab.pruning.prune` (speech calibration: espeak-ng clips to the encoder, transcripts to
the decoder), and the `asr` benchmark measures greedy WER and teacher-forced transcript
perplexity on the same fixed evaluation clips (disjoint from the calibration sentences).
Achieved sparsity is the fraction of zeros over the prunable matrices (4 encoder + 4
decoder blocks: q, k, v, o, cross-attention, fc1, fc2; the conv front-end is not pruned).

Each configuration runs once (pruning and greedy decoding are deterministic); wall times
are single measurements on a shared CPU, for orientation only. Ratios are to the dense row.

    .venv/bin/python benchmarks/encdec_quality.py [--model zoo:whisper-tiny-en] [--sparsity 0.5]
        [--methods magnitude,wanda,sparsegpt] [--nsamples 32] [--clips 16]
        [--out benchmarks/results/encdec_quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:whisper-tiny-en")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--nsamples", type=int, default=32, help="speech calibration clips (wanda, sparsegpt)")
    ap.add_argument("--clips", type=int, default=16, help="evaluation clips (asr max_examples)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encdec_quality.json"))
    args = ap.parse_args(argv)

    import torch

    from prunelab.evaluation.asr import evaluate_asr
    from prunelab.evaluation.types import EvalOptions
    from prunelab.io import write_json
    from prunelab.pruning import PruneConfig, prune
    from prunelab.storage import load

    t0 = time.perf_counter()
    lm = load(args.model)
    load_s = time.perf_counter() - t0
    dense_state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    options = EvalOptions(max_examples=args.clips, seed=args.seed)

    def zeros_fraction() -> float:
        zeros = total = 0
        for m in lm.prunable:
            w = m.weight(lm.model)
            zeros += int((w == 0).sum())
            total += w.numel()
        return zeros / total

    rows: list[dict[str, Any]] = []
    for method in ["dense", *[m.strip() for m in args.methods.split(",") if m.strip()]]:
        lm.model.load_state_dict(dense_state)
        prune_s = 0.0
        result = None
        if method != "dense":
            cfg = PruneConfig(method=method, sparsity=args.sparsity, nsamples=args.nsamples, seed=args.seed)
            t = time.perf_counter()
            result = prune(lm, cfg)
            prune_s = time.perf_counter() - t
        ev = evaluate_asr(lm, options)
        row = {
            "method": method,
            "requested_sparsity": 0.0 if method == "dense" else args.sparsity,
            "achieved_sparsity": zeros_fraction(),
            "wer": ev.metrics["wer"],
            "transcript_ppl": ev.metrics["transcript_ppl"],
            "prune_s": prune_s,
            "eval_s": ev.wall_time_s,
            "calibration": result.calibration if result is not None else None,
            "word_errors": ev.details.get("word_errors"),
            "examples": ev.details["examples"][:2],
        }
        rows.append(row)
        print(f"  {method:<10} wer={row['wer']:.3f} ppl={row['transcript_ppl']:.3f} "
              f"sparsity={row['achieved_sparsity']:.4f} prune={prune_s:.1f}s eval={ev.wall_time_s:.1f}s",
              file=sys.stderr, flush=True)

    dense = rows[0]
    for r in rows:
        r["wer_minus_dense"] = r["wer"] - dense["wer"]
        r["ppl_ratio_to_dense"] = r["transcript_ppl"] / dense["transcript_ppl"]

    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.model}: asr at {args.sparsity:.0%} sparsity ({args.clips} clips)")
        for col in ("method", "achieved sparsity", "WER", "ΔWER", "transcript ppl", "ppl ×dense", "prune s"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in rows:
            table.add_row(
                r["method"], f"{r['achieved_sparsity']:.4f}", f"{r['wer']:.3f}", f"{r['wer_minus_dense']:+.3f}",
                f"{r['transcript_ppl']:.3f}", f"{r['ppl_ratio_to_dense']:.2f}", f"{r['prune_s']:.1f}",
            )
        Console().print(table)
    except ImportError:  # pragma: no cover
        for r in rows:
            print(r["method"], r["wer"], r["transcript_ppl"])

    out = {
        "benchmark": "encdec_quality",
        "model": args.model,
        "sparsity": args.sparsity,
        "nsamples": args.nsamples,
        "eval_clips": args.clips,
        "seed": args.seed,
        "units": {"wer": "word error rate (fraction, corpus-level, normalised text)",
                  "transcript_ppl": "exp(mean NLL per transcript token), teacher-forced",
                  "prune_s": "seconds wall, one run", "eval_s": "seconds wall, one run"},
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows,
    }
    write_json(args.out, out)
    print(json.dumps({r["method"]: {"wer": round(r["wer"], 4), "transcript_ppl": round(r["transcript_ppl"], 4)}
                      for r in rows}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

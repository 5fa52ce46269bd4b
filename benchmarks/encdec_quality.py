"""Encoder-decoder and encoder quality under pruning: Whisper tiny.en ASR and MiniLM embedding fidelity.

Whisper tiny.en, dense vs magnitude / Wanda / SparseGPT / ALPS at 50 %: for each method the
dense weights are restored, the model is pruned in place with `prunelab.pruning.prune` (speech
calibration: espeak-ng clips to the encoder, transcripts to the decoder), and the `asr`
benchmark measures greedy WER and teacher-forced transcript perplexity on the same fixed
evaluation clips (disjoint from the calibration sentences). Achieved sparsity is the fraction
of zeros over the prunable matrices (4 encoder + 4 decoder blocks: q, k, v, o, cross-attention,
fc1, fc2; the conv front-end is not pruned).

MiniLM (all-MiniLM-L6-v2) at the same sparsity, same methods: the `embed` benchmark's fidelity
of mean-pooled SST-2 dev embeddings against the dense model (mean cosine, Spearman of pairwise
similarities), calibrated on text windows of the default calibration set (MRPC sentences).

Checks (issue 11), printed as PASS/FAIL: Whisper alps WER ≤ sparsegpt WER; MiniLM alps mean
cosine ≥ sparsegpt's. Each configuration runs once (pruning and greedy decoding are
deterministic); wall times are single measurements on a shared CPU, for orientation only.

    .venv/bin/python benchmarks/encdec_quality.py [--model zoo:whisper-tiny-en] [--sparsity 0.5]
        [--methods magnitude,wanda,sparsegpt,alps] [--nsamples 32] [--clips 16]
        [--embed-model zoo:minilm] [--embed-nsamples 64] [--embed-seqlen 128] [--embed-examples 872]
        [--out benchmarks/results/encdec_quality.json]
    .venv/bin/python benchmarks/encdec_quality.py --quick     # smoke test (tiny sizes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:whisper-tiny-en", help="speech model ('' skips the ASR part)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,alps")
    ap.add_argument("--nsamples", type=int, default=32, help="speech calibration clips (calibrated methods)")
    ap.add_argument("--clips", type=int, default=16, help="evaluation clips (asr max_examples)")
    ap.add_argument("--embed-model", default="zoo:minilm", help="encoder for the embed part ('' skips it)")
    ap.add_argument("--embed-nsamples", type=int, default=64, help="text calibration windows for the encoder")
    ap.add_argument("--embed-seqlen", type=int, default=128, help="tokens per encoder calibration window")
    ap.add_argument("--embed-examples", type=int, default=None, help="SST-2 dev sentences (default: all 872)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 speech clips, 4 × 32 text windows, "
                    "2 eval clips, 32 sentences")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encdec_quality.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.nsamples, args.clips = 2, 2
        args.embed_nsamples, args.embed_seqlen, args.embed_examples = 4, 32, 32
    return args


def _sweep(lm: Any, methods: list[str], settings: dict[str, Any],
           measure: Callable[[], dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Dense, then each method from the restored dense weights: prune in place, `measure()` → metrics (timed)."""
    from prunelab.pruning import PruneConfig, prune

    dense_state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    rows: list[dict[str, Any]] = []
    for method in ["dense", *methods]:
        lm.model.load_state_dict(dense_state)
        # dense: a no-op prune (sparsity 0) that only counts the zeros already there
        config = (PruneConfig(method="magnitude", sparsity=0.0) if method == "dense"
                  else PruneConfig.from_settings(method, **settings))
        t = time.perf_counter()
        result = prune(lm, config)
        prune_s = 0.0 if method == "dense" else time.perf_counter() - t
        t = time.perf_counter()
        metrics = measure()
        eval_s = time.perf_counter() - t
        row = {"method": method, "requested_sparsity": 0.0 if method == "dense" else settings["sparsity"],
               "achieved_sparsity": result.sparsity_prunable, **metrics, "prune_s": prune_s, "eval_s": eval_s,
               "calibration": result.calibration or None}
        rows.append(row)
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"  {label} {method:<10} {shown} sparsity={row['achieved_sparsity']:.4f} prune={prune_s:.1f}s "
              f"eval={eval_s:.1f}s", file=sys.stderr, flush=True)
    lm.model.load_state_dict(dense_state)
    return rows


def _asr_rows(args: argparse.Namespace, methods: list[str]) -> tuple[list[dict[str, Any]], float]:
    from prunelab.evaluation.asr import evaluate_asr
    from prunelab.evaluation.types import EvalOptions
    from prunelab.storage import load

    t0 = time.perf_counter()
    lm = load(args.model)
    load_s = time.perf_counter() - t0
    options = EvalOptions(max_examples=args.clips, seed=args.seed)

    def measure() -> dict[str, Any]:
        ev = evaluate_asr(lm, options)
        return {"wer": ev.metrics["wer"], "transcript_ppl": ev.metrics["transcript_ppl"],
                "word_errors": ev.details.get("word_errors"), "examples": ev.details["examples"][:2]}

    rows = _sweep(lm, methods, {"sparsity": args.sparsity, "nsamples": args.nsamples, "seed": args.seed}, measure,
                  "asr")
    dense = rows[0]
    for r in rows:
        r["wer_minus_dense"] = r["wer"] - dense["wer"]
        r["ppl_ratio_to_dense"] = r["transcript_ppl"] / dense["transcript_ppl"]
    return rows, load_s


def _embed_rows(args: argparse.Namespace, methods: list[str]) -> list[dict[str, Any]]:
    from prunelab.evaluation.embed import evaluate_embed
    from prunelab.evaluation.types import EvalOptions
    from prunelab.storage import load

    lm, reference = load(args.embed_model), load(args.embed_model)
    options = EvalOptions(max_examples=args.embed_examples, seed=args.seed, reference=reference)

    def measure() -> dict[str, Any]:
        return {k: float(v) for k, v in evaluate_embed(lm, options).metrics.items()}

    settings = {"sparsity": args.sparsity, "nsamples": args.embed_nsamples, "seqlen": args.embed_seqlen,
                "seed": args.seed}
    return _sweep(lm, methods, settings, measure, "embed")


def _print_tables(args: argparse.Namespace, asr: list[dict[str, Any]], embed: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if asr:
        table = Table(title=f"{args.model}: asr at {args.sparsity:.0%} sparsity ({args.clips} clips)")
        for col in ("method", "achieved sparsity", "WER", "ΔWER", "transcript ppl", "ppl ×dense", "prune s"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in asr:
            table.add_row(r["method"], f"{r['achieved_sparsity']:.4f}", f"{r['wer']:.3f}",
                          f"{r['wer_minus_dense']:+.3f}", f"{r['transcript_ppl']:.3f}",
                          f"{r['ppl_ratio_to_dense']:.2f}", f"{r['prune_s']:.1f}")
        Console().print(table)
    if embed:
        table = Table(title=f"{args.embed_model}: embedding fidelity at {args.sparsity:.0%} sparsity")
        for col in ("method", "achieved sparsity", "mean cosine", "min cosine", "Spearman pairwise", "prune s"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in embed:
            table.add_row(r["method"], f"{r['achieved_sparsity']:.4f}", f"{r['mean_cosine']:.4f}",
                          f"{r['min_cosine']:.4f}", f"{r['spearman_pairwise']:.4f}", f"{r['prune_s']:.1f}")
        Console().print(table)


def _checks(asr: list[dict[str, Any]], embed: list[dict[str, Any]]) -> dict[str, bool]:
    a = {r["method"]: r for r in asr}
    e = {r["method"]: r for r in embed}
    checks: dict[str, bool] = {}
    if "alps" in a and "sparsegpt" in a:
        checks["whisper_alps_wer_le_sparsegpt"] = a["alps"]["wer"] <= a["sparsegpt"]["wer"]
    if "alps" in e and "sparsegpt" in e:
        checks["minilm_alps_mean_cosine_ge_sparsegpt"] = e["alps"]["mean_cosine"] >= e["sparsegpt"]["mean_cosine"]
    return checks


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    from prunelab.io import write_json

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    asr, load_s = _asr_rows(args, methods) if args.model else ([], 0.0)
    embed = _embed_rows(args, methods) if args.embed_model else []
    _print_tables(args, asr, embed)
    checks = _checks(asr, embed)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    out = {
        "benchmark": "encdec_quality", "model": args.model, "embed_model": args.embed_model,
        "sparsity": args.sparsity, "nsamples": args.nsamples, "eval_clips": args.clips,
        "embed_nsamples": args.embed_nsamples, "embed_seqlen": args.embed_seqlen,
        "embed_examples": args.embed_examples, "seed": args.seed,
        "units": {"wer": "word error rate (fraction, corpus-level, normalised text)",
                  "transcript_ppl": "exp(mean NLL per transcript token), teacher-forced",
                  "mean_cosine": "mean cosine of pruned vs dense mean-pooled embeddings (1 = identical)",
                  "prune_s": "seconds wall, one run", "eval_s": "seconds wall, one run"},
        "load_s": load_s, "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": asr, "embed_rows": embed, "checks": checks,
    }
    write_json(args.out, out)
    print(json.dumps({r["method"]: {"wer": round(r["wer"], 4), "transcript_ppl": round(r["transcript_ppl"], 4)}
                      for r in asr}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

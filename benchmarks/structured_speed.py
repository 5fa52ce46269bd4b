"""Structured pruning that shrinks the model: fewer parameters, plain-transformers load, faster decode.

`zoo:smollm2` (fp32) loses `--fraction` (default 25 %) of the MLP neurons of every block via
`prunelab.pruning.prune(method="structured")` (activation-aware score ||a_j||·||W_down[:, j]||
on the default calibration text, `--nsamples` × `--seqlen` tokens). The result is saved with
`save_pretrained`, loaded back with plain `transformers.AutoModelForCausalLM.from_pretrained`
(no prunelab code), and compared with the dense model:

- parameter count: actual vs dense − expected (expected from shapes alone: per block,
  removed × (2 × hidden) for gate/up rows + removed × hidden for down columns);
- decode ms/token (batch 1, KV cache, greedy, fixed count) and 512-token prefill tokens/s,
  dense and small interleaved repeat by repeat, medians of `--repeats`;
- WikiText-2 perplexity on the first `--eval-tokens` tokens (the price of the speed), via
  `prunelab.evaluation.evaluate(lm, "ppl")`.

    nice -n 0 .venv/bin/python benchmarks/structured_speed.py [--fraction 0.25] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:smollm2")
    ap.add_argument("--fraction", type=float, default=0.25, help="fraction of MLP neurons removed per block")
    ap.add_argument("--target", default="mlp", choices=["mlp", "heads", "both"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="0 skips the perplexity check")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structured_speed.json"))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from prunelab.io import write_json
    from prunelab.models import wrap_model
    from prunelab.pruning import PruneConfig, prune
    from prunelab.pruning.structured import expected_params_removed
    from prunelab.runtime.bench import _forward_kwargs, _ids, time_decode, time_prefill
    from prunelab.storage import load

    t_start = time.perf_counter()
    lm = load(args.model)
    dense = lm.model
    n_dense = sum(p.numel() for p in dense.parameters())
    expected = expected_params_removed(lm, args.fraction, args.target)
    lm_s = copy.copy(lm)
    lm_s.model = copy.deepcopy(dense)
    lm_s.prunable = list(lm.prunable)
    t0 = time.perf_counter()
    result = prune(lm_s, PruneConfig(method="structured", sparsity=args.fraction, nsamples=args.nsamples,
                                     seqlen=args.seqlen, options={"target": args.target}))
    prune_s = time.perf_counter() - t0
    report: dict[str, Any] = dict(result.extra.get("structured", {}))
    with tempfile.TemporaryDirectory(prefix="structured-") as tmp:
        lm_s.model.save_pretrained(tmp, safe_serialization=True)
        size_small = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        small = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()  # plain HF
    del lm_s
    gc.collect()
    n_small = sum(p.numel() for p in small.parameters())
    with tempfile.TemporaryDirectory(prefix="dense-") as tmp:
        dense.save_pretrained(tmp, safe_serialization=True)
        size_dense = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))

    vocab = int(lm.config.vocab_size)
    prefill_kw = _forward_kwargs(lm, _ids(args.prefill_tokens, vocab, 0))
    prompt_kw = _forward_kwargs(lm, _ids(16, vocab, 1))
    variants = {"dense": dense, "structured": small}
    meas: dict[str, dict[str, list[float]]] = {k: {"decode_ms": [], "prefill_tps": []} for k in variants}
    for model in variants.values():
        time_prefill(model, prefill_kw, True)
        time_decode(model, lm.family, prompt_kw, 2)
    for _ in range(args.repeats):
        for name, model in variants.items():
            gc.collect()
            meas[name]["decode_ms"].append(time_decode(model, lm.family, prompt_kw, args.decode_tokens)[0] * 1e3)
            meas[name]["prefill_tps"].append(args.prefill_tokens / time_prefill(model, prefill_kw, True))
    med = {k: {q: float(np.median(v)) for q, v in d.items()} for k, d in meas.items()}

    ppl: dict[str, Any] = {}
    if args.eval_tokens > 0:
        try:
            from prunelab.evaluation import evaluate
            from prunelab.evaluation.types import EvalOptions

            opts = EvalOptions(seqlen=min(1024, args.eval_tokens), max_tokens=args.eval_tokens)
            for name, model in variants.items():
                r = evaluate(wrap_model(model, tokenizer=lm.tokenizer, name=name), "ppl", opts)
                ppl[name] = r.metrics.get(r.primary)
        except Exception as exc:  # quality is context here, not the point of this benchmark
            ppl["error"] = f"{type(exc).__name__}: {exc}"

    out = {
        "model": args.model, "fraction": args.fraction, "target": args.target, "threads": torch.get_num_threads(),
        "params_dense": n_dense, "params_structured": n_small, "params_removed": n_dense - n_small,
        "params_removed_expected": expected, "params_match_expected": n_dense - n_small == expected,
        "config": {"intermediate_size": getattr(small.config, "intermediate_size", None),
                   "num_attention_heads": small.config.num_attention_heads,
                   "num_key_value_heads": getattr(small.config, "num_key_value_heads", None)},
        "loads_with_plain_transformers": True,
        "safetensors_bytes": {"dense": size_dense, "structured": size_small},
        "decode_ms_per_token": {k: v["decode_ms"] for k, v in med.items()},
        "decode_speedup": med["dense"]["decode_ms"] / med["structured"]["decode_ms"],
        "prefill_tokens_per_s": {k: v["prefill_tps"] for k, v in med.items()},
        "prefill_speedup": med["structured"]["prefill_tps"] / med["dense"]["prefill_tps"],
        "ppl_wikitext2": ppl, "prune_seconds": prune_s, "prune_report": report,
        "calibration": result.calibration, "runs": meas, "repeats": args.repeats,
        "units": {"decode": "ms/token (median)", "prefill": "tokens/s (median)", "size": "bytes"},
        "wall_s": time.perf_counter() - t_start,
    }
    print(f"\n{args.model}: structured {args.target} -{args.fraction:.0%}, fp32, {torch.get_num_threads()} threads, "
          f"medians of {args.repeats} interleaved runs")
    print(f"{'':<28}{'dense':>14}{'structured':>14}{'ratio':>8}")
    print(f"{'parameters':<28}{n_dense:>14,}{n_small:>14,}{n_small / n_dense:>8.3f}")
    print(f"{'  removed (expected)':<28}{'':>14}{n_dense - n_small:>14,}  ({expected:,}: "
          f"{'match' if out['params_match_expected'] else 'MISMATCH'})")
    print(f"{'safetensors bytes':<28}{size_dense:>14,}{size_small:>14,}{size_small / size_dense:>8.3f}")
    print(f"{'decode ms/token':<28}{med['dense']['decode_ms']:>14.2f}{med['structured']['decode_ms']:>14.2f}"
          f"{out['decode_speedup']:>7.2f}x")
    print(f"{'prefill tokens/s':<28}{med['dense']['prefill_tps']:>14.1f}{med['structured']['prefill_tps']:>14.1f}"
          f"{out['prefill_speedup']:>7.2f}x")
    if ppl and "error" not in ppl:
        print(f"{'WikiText-2 ppl':<28}{ppl['dense']:>14.2f}{ppl['structured']:>14.2f}")
    elif ppl:
        print(f"ppl: {ppl['error']}")
    write_json(args.out, out)
    print(f"results: {args.out}")
    return 0 if out["params_match_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation: one module per benchmark, a registry, and `evaluate(lm, bench, options)`.

Benchmarks: ppl (decoders), seq2seq-ppl (text encoder-decoders), pppl and embed (encoders),
sst2 and mrpc (all families, probe or mask-preserving fine-tuning), asr (speech), zeroshot (decoders:
lm-evaluation-harness's own tasks on the local validation splits, `zeroshot:task,...`, `limit` per task).
"""

from prunelab.evaluation.registry import BENCHMARKS, BenchSpec, default_benchmarks, get_bench
from prunelab.evaluation.runner import evaluate, run_benchmarks
from prunelab.evaluation.types import EvalOptions, EvalResult

__all__ = ["BENCHMARKS", "BenchSpec", "EvalOptions", "EvalResult", "default_benchmarks", "evaluate", "get_bench",
           "run_benchmarks"]

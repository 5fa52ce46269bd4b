"""`evaluate(lm, bench, options)`: check the bench applies, run it, stamp identity and timing."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prunelab.errors import ConfigError
from prunelab.evaluation.registry import benches_for, get_bench
from prunelab.evaluation.types import EvalOptions, EvalResult
from prunelab.models.types import LoadedModel


def evaluate(lm: LoadedModel | str, bench: str, options: EvalOptions | None = None) -> EvalResult:
    """Run benchmark `bench` on `lm` (a LoadedModel, or a spec string loaded here).

    Raises `ConfigError` (one line) for an unknown bench or one that does not apply to the
    model's family; data problems surface as `DataError` from the benchmark itself.
    """
    options = options or EvalOptions()
    spec = get_bench(bench)
    options = spec.with_arg(bench, options)
    if isinstance(lm, str):
        from prunelab.storage import load

        lm = load(lm)
    if lm.family not in spec.families:
        others = ", ".join(benches_for(lm.family)) or "none"
        raise ConfigError(
            f"bench '{bench}' does not apply to {lm.family} models ({lm.name}); "
            f"it needs {' or '.join(sorted(spec.families))}: for this model use {others}"
        )
    fn: Any = spec.load()
    was_training = lm.model.training
    lm.model.eval()
    start = time.perf_counter()
    # Out of core, a bench other than ppl streams each block per forward pass, with the embeddings
    # and head resident for the whole bench (ppl runs block-major on its own).
    resident = lm.offload.outside() if lm.offload is not None and bench != "ppl" else contextlib.nullcontext()
    try:
        with resident:
            result: EvalResult = fn(lm, options)
    finally:
        lm.model.train(was_training)
    result.wall_time_s = time.perf_counter() - start
    result.model, result.family, result.bench, result.seed = lm.name, lm.family, bench, options.seed
    return result


def run_benchmarks(
    model: LoadedModel | str,
    benches: list[str] | None = None,
    options: EvalOptions | None = None,
    *,
    reference: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Load `model` once and run each bench (default: the family's defaults); the `prunelab eval` payload.

    Bench names are checked before the model is loaded, so a typo fails in milliseconds.
    `progress(bench, result)` is called after each benchmark.
    """
    from prunelab.evaluation.registry import default_benchmarks

    options = options or EvalOptions()
    for name in benches or []:
        get_bench(name).with_arg(name, options)
    if isinstance(model, str):
        from prunelab.storage import load

        model = load(model)
    if reference is not None and options.reference is None:
        from prunelab.storage import load

        options.reference = load(reference)
    names = list(benches) if benches else default_benchmarks(model)
    results = []
    for name in names:
        result = evaluate(model, name, options)
        results.append(result)
        if progress is not None:
            progress(name, result)
    return {"model": model.name, "family": model.family, "source": str(model.source),
            "results": [r.to_dict() for r in results]}

"""Sparse CPU inference: sparse linear modules, their kernels, and `bench` (latency, throughput, memory).

    lm = prunelab.storage.load("pruned-dir")           # any pruned checkpoint (HF or prunelab sparse format)
    summary = sparsify_for_inference(lm)               # in place; measured per shape/sparsity/rows bucket
    ...                                                # lm.model.generate(...) as usual, on CPU, fp32
    restore_dense(lm)                                  # undo, bit-identical weights

- `kernels.py`: the SELL-16 format (fp32 values + uint16 columns) and numba kernels.
- `sparse_linear.py`: `SparseLinear` and the measured, cached backend decision.
- `sparsify.py`: swapping modules in and out; `load_for_inference(spec)`.
- `qkernels.py` / `fused_decode.py`: bitmask + int8/int4 kernels and `DecodeEngine` (`load_decoder(spec)`),
  one compiled call per token for Llama-architecture decoders (`engine.generate(ids, n)`).
- `bench.py`: `bench_model(lm)` / `run_bench(spec, out)` behind `prunelab bench`.
"""

from prunelab.runtime.fused_decode import DecodeEngine, load_decoder
from prunelab.runtime.kernels import SellMatrix, warmup
from prunelab.runtime.sparse_linear import BACKENDS, SparseLinear, clear_decisions
from prunelab.runtime.sparsify import (
    SparsifySummary,
    load_for_inference,
    restore_dense,
    sparse_modules,
    sparsify_for_inference,
)


def bench_model(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy re-export
    """See `prunelab.runtime.bench.bench_model` (imported lazily: it pulls in transformers)."""
    from prunelab.runtime.bench import bench_model as _bench_model

    return _bench_model(*args, **kwargs)


__all__ = [
    "BACKENDS", "DecodeEngine", "SellMatrix", "SparseLinear", "SparsifySummary", "bench_model", "clear_decisions",
    "load_decoder", "load_for_inference", "restore_dense", "sparse_modules", "sparsify_for_inference", "warmup",
]

"""Swap a pruned model's linears for `SparseLinear` where that is measured to be faster.

`sparsify_for_inference` works in place (a 135 M model does not need a second copy) and
returns a `SparsifySummary` saying, per matrix, what was decided and why (its sparsity, the
measured seconds of every backend per rows bucket, dense and sparse bytes). A matrix whose
decode (1-row) winner is `dense`, or whose sparsity is below `min_sparsity`, stays the
original module. `restore_dense` undoes the swap with bit-identical weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel, PrunableMatrix
from prunelab.runtime.kernels import warmup
from prunelab.runtime.sparse_linear import BACKENDS, SPARSE_BACKENDS, SparseLinear, rows_bucket


@dataclass
class ModuleDecision:
    name: str
    shape: tuple[int, int]  # (out, in)
    sparsity: float
    swapped: bool
    reason: str
    plan: dict[int, str] = field(default_factory=dict)  # rows bucket -> backend
    seconds: dict[int, dict[str, float]] = field(default_factory=dict)  # rows bucket -> backend -> fastest run, s
    dense_bytes: int = 0
    sparse_bytes: int = 0  # bytes read per product by the backend chosen for the smallest rows bucket


@dataclass
class SparsifySummary:
    """What `sparsify_for_inference` did; `to_dict()` is JSON-ready."""

    modules: list[ModuleDecision] = field(default_factory=list)
    batch_rows: tuple[int, ...] = (1,)
    threads: int = 1

    @property
    def swapped(self) -> int:
        return sum(m.swapped for m in self.modules)

    @property
    def dense_bytes(self) -> int:
        """Bytes of all considered matrices as dense fp32."""
        return sum(m.dense_bytes for m in self.modules)

    @property
    def read_bytes_decode(self) -> int:
        """Bytes a decode step reads from these matrices after the swap (sparse where swapped, dense elsewhere)."""
        return sum(m.sparse_bytes if m.swapped and m.plan.get(1, "dense") != "dense" else m.dense_bytes
                   for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "swapped": self.swapped,
            "considered": len(self.modules),
            "batch_rows": list(self.batch_rows),
            "threads": self.threads,
            "dense_bytes": self.dense_bytes,
            "read_bytes_decode": self.read_bytes_decode,
            "modules": [
                {**asdict(m), "plan": {str(k): v for k, v in m.plan.items()},
                 "seconds": {str(k): v for k, v in m.seconds.items()}}
                for m in self.modules
            ],
        }


def _set_numba_threads() -> int:
    import numba

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def sparsify_for_inference(
    model: nn.Module | LoadedModel,
    prunable: list[PrunableMatrix] | None = None,
    *,
    min_sparsity: float = 0.3,
    batch_rows: tuple[int, ...] = (1, 512),
    backends: tuple[str, ...] = BACKENDS,
    force: str | None = None,
    use_disk_cache: bool = True,
    keep_dense: bool | None = None,
    decision_repeats: int = 5,
) -> SparsifySummary:
    """Replace pruned linears of `model` (in place) by `SparseLinear` where measured faster for decode.

    `prunable` defaults to the model's prunable matrices (`find_prunable`). Each candidate with
    sparsity >= `min_sparsity` is timed for every rows bucket in `batch_rows` (1 = decode,
    512 = prefill) against the `backends`; it is swapped when a sparse backend wins at 1 row
    (or at its smallest bucket). `force="sell"` (or any backend) skips measuring and swaps
    every candidate with that backend -- for tests and for benchmarks of one kernel. Only fp32
    weights are handled (others are left dense and reported).
    """
    if isinstance(model, LoadedModel):
        prunable = prunable if prunable is not None else model.prunable
        model = model.model
    if prunable is None:
        from prunelab.models import detect_family, find_prunable

        prunable = find_prunable(model, detect_family(model.config))
    if force is not None and force not in BACKENDS:
        raise ConfigError(f"unknown runtime backend '{force}': choose one of {', '.join(BACKENDS)}")
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ConfigError(f"unknown runtime backend(s) {bad}: choose from {', '.join(BACKENDS)}")
    threads = _set_numba_threads()
    warmup()
    summary = SparsifySummary(batch_rows=tuple(batch_rows), threads=threads)
    cand_backends = (force,) if force else tuple(backends)
    if threads == 1 and force is None and "sell" in cand_backends:  # one thread: sell_par is sell plus overhead
        cand_backends = tuple(b for b in cand_backends if b != "sell_par")
    buckets = sorted({rows_bucket(r) for r in batch_rows})
    for pm in prunable:
        module = model.get_submodule(pm.name)
        if isinstance(module, SparseLinear):
            continue
        w = pm.weight(model)
        dense_bytes = w.numel() * 4
        sparsity = float((w == 0).sum().item()) / max(1, w.numel())
        dec = ModuleDecision(name=pm.name, shape=(pm.out_features, pm.in_features), sparsity=sparsity,
                             swapped=False, reason="", dense_bytes=dense_bytes, sparse_bytes=dense_bytes)
        summary.modules.append(dec)
        if w.dtype != torch.float32:
            dec.reason = f"dtype {w.dtype} (sparse kernels are fp32)"
            continue
        if sparsity < min_sparsity and force is None:
            dec.reason = f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"
            continue
        sl = SparseLinear.from_module(module, backends=cand_backends, use_disk_cache=use_disk_cache,
                                      keep_dense=keep_dense, decision_repeats=decision_repeats)
        for b in buckets:
            sl.decide(b)
        dec.plan = dict(sl.plan)
        dec.seconds = dict(sl.timings)
        first = sl.plan[buckets[0]]
        dec.sparse_bytes = sl.read_nbytes(first)  # what decode reads with the chosen backend
        if first == "dense" and force is None:
            dec.reason = f"dense is faster at {buckets[0]} row(s)"
            continue
        parent, leaf = _parent(model, pm.name)
        setattr(parent, leaf, sl)
        dec.swapped = True
        dec.reason = f"{first} fastest at {buckets[0]} row(s)"
    return summary


def restore_dense(model: nn.Module | LoadedModel) -> int:
    """Undo `sparsify_for_inference`: every `SparseLinear` becomes its dense module again. Returns the count."""
    if isinstance(model, LoadedModel):
        model = model.model
    names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    for name in names:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, getattr(parent, leaf).restore())
    return len(names)


def sparse_modules(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def load_for_inference(spec: str, **kwargs: Any) -> tuple[LoadedModel, SparsifySummary]:
    """Load a pruned checkpoint (model spec, HF directory or `prunelab.storage` sparse directory) and sparsify it."""
    from prunelab.storage import load

    lm = load(spec)
    return lm, sparsify_for_inference(lm, **kwargs)


__all__ = [
    "ModuleDecision", "SPARSE_BACKENDS", "SparsifySummary", "load_for_inference", "restore_dense",
    "sparse_modules", "sparsify_for_inference",
]

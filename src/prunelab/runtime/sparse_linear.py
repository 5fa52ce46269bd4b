"""`SparseLinear`: a drop-in replacement for a pruned `nn.Linear` / GPT-2 `Conv1D`, for inference.

Which kernel is fastest depends on the matrix shape, its sparsity and how many input rows
arrive at once (1 in decode, hundreds in prefill), and on the machine. So nothing is
assumed: the first time a (shape, sparsity bucket, rows bucket) is seen, every candidate
backend is timed on that very matrix and the winner is remembered -- in memory for the
process and, by default, on disk under `$PRUNELAB_CACHE/runtime/` keyed by a CPU/thread
fingerprint, so later runs skip the measurement.

Backends: `dense` (torch `F.linear`, MKL), `sell` / `sell_par` (our numba SELL-16 kernels,
serial / parallel, see `kernels.py`), `torch_csr` (`torch.sparse.mm` with CSR on the left,
int64 indices) and `scipy` (scipy CSR, int32 indices). Decode (1-row) timings run over
private copies of the matrix that together exceed the last-level cache, because in a real
model the weights come from DRAM every token; the decision takes the fastest of
`decision_repeats` runs of each backend (noise only adds time), in thread CPU time when
everything runs single-threaded.

Inference only: no autograd through the sparse kernels (inputs are detached).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.runtime.kernels import SellMatrix, warmup

BACKENDS = ("dense", "sell", "sell_par", "torch_csr", "scipy")
SPARSE_BACKENDS = BACKENDS[1:]
ROW_BUCKETS = (1, 8, 64, 512, 4096)  # an input with r rows is timed as the smallest bucket >= r


def shape_prefix(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:-1])


def rows_bucket(rows: int) -> int:
    for b in ROW_BUCKETS:
        if rows <= b:
            return b
    return ROW_BUCKETS[-1]


def sparsity_bucket(sparsity: float) -> int:
    """Sparsity in percent, rounded to the nearest 5 (decisions are shared inside a bucket)."""
    return int(round(sparsity * 20)) * 5


# ----------------------------------------------------------------------------------------------
# Decision cache
# ----------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_DECISIONS: dict[str, dict[str, Any]] = {}
_DISK_LOADED: set[Path] = set()


def machine_fingerprint() -> str:
    """CPU model, thread count and library versions: a decision is valid only where it was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba

    raw = f"{cpu}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}|{numba.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def decision_cache_path() -> Path:
    from prunelab.paths import cache_dir

    return cache_dir() / "runtime" / f"decisions-{machine_fingerprint()}.json"


def _load_disk(path: Path) -> None:
    if path in _DISK_LOADED:
        return
    _DISK_LOADED.add(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, dict) and v.get("backend") in BACKENDS:
                _DECISIONS.setdefault(k, v)


def _save_disk(path: Path) -> None:
    from prunelab.io import write_json

    try:
        write_json(path, dict(sorted(_DECISIONS.items())))
    except OSError:  # a read-only cache must not break inference
        pass


def clear_decisions(*, disk: bool = False) -> None:
    """Forget measured decisions (tests, or after changing thread settings)."""
    with _LOCK:
        _DECISIONS.clear()
        _DISK_LOADED.clear()
        if disk:
            try:
                decision_cache_path().unlink()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

_FLUSH: np.ndarray | None = None
_STREAM_BYTES = 48 * 1024 * 1024  # decode-decision copies together exceed a typical last-level cache


def _flush_cache() -> None:
    """Stream a buffer bigger than the last-level cache, so the next call reads weights from DRAM."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = np.ones(16 * 1024 * 1024, dtype=np.float32)  # 64 MiB
    _FLUSH.sum()


def _best_times(fns: dict[str, Any], repeats: int, flush: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(min, median) seconds per call of each function, calls interleaved so that noise hits all alike.

    Decisions use the minimum: on a shared machine noise only ever adds time, so the fastest
    of several runs is the best estimate of what a kernel costs on its own.

    Caveat: with torch at 1 thread, scipy and torch CSR still run in this thread, so CPU time
    is complete for every candidate.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    # Single-threaded (torch and every candidate run in this thread): count this thread's CPU time,
    # which the OS scheduling other processes does not inflate; otherwise wall time.
    clock = time.thread_time if torch.get_num_threads() == 1 and "sell_par" not in fns else time.perf_counter
    for fn in fns.values():  # one untimed call each (lazy allocations, page faults)
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            if flush:
                _flush_cache()
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return ({k: float(np.min(v)) for k, v in times.items()}, {k: float(np.median(v)) for k, v in times.items()})


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored sparse (SELL-16); per input-rows bucket, the measured-fastest backend.

    Build with `SparseLinear.from_module(linear_or_conv1d)`. `plan` maps a rows bucket to a
    backend; unseen buckets are decided on first use (`decide`). `restore()` gives back an
    equivalent dense module (bit-exact weights).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        transposed: bool = False,
        backends: tuple[str, ...] = SPARSE_BACKENDS + ("dense",),
        use_disk_cache: bool = True,
        keep_dense: bool | None = None,
        decision_repeats: int = 5,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError("SparseLinear needs a 2-D (out, in) weight")
        w = weight.detach().to(torch.float32)
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.transposed = transposed  # the original was a GPT-2 Conv1D (weight stored (in, out))
        self.sell = SellMatrix.from_dense(w)
        self.sparsity = 1.0 - self.sell.nnz / max(1, w.numel())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=False)
        self.backends = tuple(b for b in backends if b in BACKENDS) or ("sell",)
        self.use_disk_cache = use_disk_cache
        self.decision_repeats = decision_repeats
        self.keep_dense = keep_dense
        self._bias_pad = self.sell.padded_bias(None if self.bias is None else self.bias.detach().numpy())
        self.plan: dict[int, str] = {}
        self.timings: dict[int, dict[str, float]] = {}
        self._dense: torch.Tensor | None = w.contiguous().clone() if keep_dense is not False else None
        self._torch_csr: torch.Tensor | None = None
        self._scipy: Any = None

    # --- construction / undo --------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any) -> SparseLinear:
        """From an `nn.Linear` or a transformers `Conv1D` (weight (in, out), transposed here)."""
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias, transposed=False, **kwargs)
        from transformers.pytorch_utils import Conv1D

        if isinstance(module, Conv1D):
            return cls(module.weight.t(), module.bias, transposed=True, **kwargs)
        raise TypeError(f"cannot make a SparseLinear from {type(module).__name__}")

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) dense weight, rebuilt exactly from the sparse format if it was not kept."""
        if self._dense is not None:
            return self._dense
        return self.sell.to_dense()

    def restore(self) -> nn.Module:
        """An equivalent dense `nn.Linear` (or `Conv1D`) with the identical weights."""
        w = self.dense_weight()
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            mod = Conv1D(self.out_features, self.in_features)
            with torch.no_grad():
                mod.weight.copy_(w.t())
                if self.bias is not None:
                    mod.bias.copy_(self.bias)
                else:
                    mod.bias.zero_()
            return mod
        mod = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            mod.weight.copy_(w)
            if self.bias is not None:
                mod.bias.copy_(self.bias)
        return mod

    @property
    def weight(self) -> torch.Tensor:
        """A meta-device stand-in with the original weight's shape and dtype (no memory).

        Some HF modules read `linear.weight.dtype` (T5 casts its input to it); real weight
        values live in the sparse format -- use `dense_weight()` for them.
        """
        shape = (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)
        return torch.empty(shape, dtype=torch.float32, device="meta")

    # --- memory -----------------------------------------------------------------------------
    @property
    def sparse_nbytes(self) -> int:
        """Bytes read per product by the SELL kernels (values + indices + metadata)."""
        return self.sell.nbytes

    def read_nbytes(self, backend: str) -> int:
        """Weight bytes one product with `backend` reads (its own format; dense = 4 per element)."""
        if backend in ("sell", "sell_par"):
            return self.sell.nbytes
        if backend == "scipy":
            m = self._get_scipy()
            return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
        if backend == "torch_csr":
            t = self._get_torch_csr()
            return int(sum(x.numel() * x.element_size() for x in (t.crow_indices(), t.col_indices(), t.values())))
        return self.dense_nbytes

    @property
    def dense_nbytes(self) -> int:
        return self.out_features * self.in_features * 4

    def resident_nbytes(self) -> int:
        """Bytes this module holds now (sparse format plus whatever dense/CSR copies the plan needs)."""
        n = self.sell.nbytes + (0 if self.bias is None else self.bias.numel() * 4)
        if self._dense is not None:
            n += self._dense.numel() * 4
        if self._torch_csr is not None:
            n += sum(t.numel() * t.element_size() for t in (
                self._torch_csr.crow_indices(), self._torch_csr.col_indices(), self._torch_csr.values()))
        if self._scipy is not None:
            n += self._scipy.data.nbytes + self._scipy.indices.nbytes + self._scipy.indptr.nbytes
        return int(n)

    # --- backends ---------------------------------------------------------------------------
    def _get_torch_csr(self) -> torch.Tensor:
        if self._torch_csr is None:
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                self._torch_csr = self.dense_weight().to_sparse_csr()
        return self._torch_csr

    def _get_scipy(self) -> Any:
        if self._scipy is None:
            import scipy.sparse as sp

            self._scipy = sp.csr_matrix(self.dense_weight().numpy())
        return self._scipy

    def _run(self, backend: str, x2: torch.Tensor) -> torch.Tensor:
        """(rows, in) contiguous fp32 → (rows, out), without bias."""
        rows = x2.shape[0]
        if backend == "dense":
            if self._dense is None:
                self._dense = self.sell.to_dense()
            return F.linear(x2, self._dense)
        if backend in ("sell", "sell_par"):
            par = backend == "sell_par"
            if rows == 1:
                return torch.from_numpy(self.sell.gemv(x2[0].numpy(), parallel=par)).unsqueeze(0)

            xt = np.ascontiguousarray(x2.numpy().T)
            return torch.from_numpy(self.sell.spmm_t(xt, parallel=par)).t()
        if backend == "torch_csr":
            return torch.sparse.mm(self._get_torch_csr(), x2.t()).t()
        if backend == "scipy":
            return torch.from_numpy(np.asarray(self._get_scipy() @ x2.numpy().T, dtype=np.float32)).t()
        raise ValueError(f"unknown backend {backend}")

    def _private_copy(self) -> SparseLinear:
        """A copy with its own memory for every format (for streaming timings)."""
        import copy as _copy

        twin = _copy.copy(self)
        twin.sell = _copy.deepcopy(self.sell)
        twin._dense = None if self._dense is None else self._dense.clone()
        twin._torch_csr = None
        twin._scipy = None
        twin._modules = {}
        twin._parameters = dict(self._parameters)
        twin._buffers = {}
        return twin

    def decision_key(self, bucket: int) -> str:
        return (f"{self.out_features}x{self.in_features}|s{sparsity_bucket(self.sparsity)}|r{bucket}"
                f"|b{','.join(sorted(self.backends))}")

    def decide(self, rows: int) -> str:
        """The backend for inputs of `rows` rows: cached, or measured now on this matrix."""
        bucket = rows_bucket(rows)
        if bucket in self.plan:
            return self.plan[bucket]
        if len(self.backends) == 1:
            self.plan[bucket] = self.backends[0]
            self._drop_unused()
            return self.backends[0]
        key = self.decision_key(bucket)
        path = decision_cache_path() if self.use_disk_cache else None
        with _LOCK:
            if path is not None:
                _load_disk(path)
            hit = _DECISIONS.get(key)
        if hit is None:
            warmup()
            gen = torch.Generator().manual_seed(0)
            x2 = torch.randn(bucket, self.in_features, generator=gen)
            # Decode streams every weight from DRAM once per token while the code stays hot. Mimic
            # that: time one call on each of k private copies of this matrix (together larger
            # than the last-level cache) and divide by k. (Flushing the cache before one call
            # would also evict the interpreter and dispatch code, charging ~100 us of cold-code
            # overhead that real decode does not pay.)
            k = max(1, min(64, math.ceil(_STREAM_BYTES / max(1, self.dense_nbytes)))) if bucket == 1 else 1
            mods = [self] + [self._private_copy() for _ in range(k - 1)]
            fns = {b: (lambda b=b: [m._run(b, x2) for m in mods]) for b in self.backends}
            with torch.no_grad():
                times, medians = _best_times(fns, self.decision_repeats, flush=False)
            times = {b: t / k for b, t in times.items()}
            medians = {b: t / k for b, t in medians.items()}
            del mods, fns
            best = min(times, key=times.__getitem__)
            hit = {"backend": best, "seconds": times, "seconds_median": medians}
            with _LOCK:
                _DECISIONS[key] = hit
                if path is not None:
                    _save_disk(path)
        self.plan[bucket] = hit["backend"]
        self.timings[bucket] = dict(hit.get("seconds", {}))
        self._drop_unused()
        return hit["backend"]

    def _drop_unused(self) -> None:
        """Free copies no planned backend needs (the dense copy unless keep_dense=True)."""
        used = set(self.plan.values())
        if "torch_csr" not in used:
            self._torch_csr = None
        if "scipy" not in used:
            self._scipy = None
        if "dense" not in used and self.keep_dense is not True and len(self.plan) > 0:
            self._dense = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects {self.in_features} input features, got {x.shape[-1]}")
        rows = x.numel() // self.in_features
        if rows == 1 and x.dtype == torch.float32:  # decode fast path: bias fused into the kernel
            backend = self.plan.get(1) or self.decide(1)
            if backend in ("sell", "sell_par", "scipy"):
                xd = x.detach()
                if not xd.is_contiguous():
                    xd = xd.contiguous()
                if backend == "scipy":
                    y = self._get_scipy() @ xd.view(-1).numpy()
                    if self.bias is not None:
                        y += self._bias_pad[: self.out_features]
                else:
                    y = self.sell.gemv(xd.view(-1).numpy(), parallel=backend == "sell_par", bias=self._bias_pad)
                return torch.from_numpy(y).view(*x.shape[:-1], self.out_features)
        x2 = x.detach().reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.to(torch.float32)
        x2 = x2.contiguous()
        backend = self.decide(x2.shape[0])
        with torch.no_grad():
            y = self._run(backend, x2)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape_prefix(x), self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        plan = ", ".join(f"rows<={b}:{n}" for b, n in sorted(self.plan.items()))
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.sparsity:.3f}, bias={self.bias is not None}, plan=[{plan}]")

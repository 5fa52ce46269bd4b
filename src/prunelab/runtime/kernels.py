"""Sparse matrix kernels for CPU inference, and the compact format they read.

Batch-1 decode is one matrix-vector product per linear layer; on a CPU it is bound by memory
bandwidth, so the time per token is set by the bytes each weight matrix costs to stream.
`torch.sparse` CSR stores int64 column indices (12 bytes per kept fp32 weight) and scipy int32
(8 bytes): at 50-70 % sparsity that is *more* than the dense matrix (4 bytes per element).

`SellMatrix` is SELL-C-sigma (sliced ELLPACK, C = 16, rows sorted by length over the whole
matrix): fp32 values + uint16 column indices when `in_features <= 65536` (int32 otherwise),
so a kept weight costs 6 bytes and the bytes read per token are about `6 (1 - s)` against
dense `4` per element. Rows are sorted by nonzero count and cut into slices of 16; inside a
slice the nonzeros are stored slot-major (slot j of row 0..15, then slot j+1, ...), padded
to the longest row of the slice (sorting keeps the padding at ~1-2 % on pruned matrices).
That layout is what makes the kernel fast: the inner loop handles 16 rows at once, reading
16 contiguous values and 16 contiguous indices, with no horizontal reduction and no short-row
remainder loops. It is written for one 16-wide gather + FMA per slot, but numba/LLVM emit 16
scalar FMAs there (no `vgatherdps`; checked with `inspect_asm`): the kernel still streams about
9 GB/s per core, close to one core's DRAM bandwidth here, and explicit vector code is the next
step. Plain CSR (one dot product per row) was measured 2.5-3x slower here, because at 90 %
sparsity a row holds ~60 weights, too few for a vectorised reduction loop to start.

Kernels are numba-compiled with `cache=True` (compiled once per machine, then loaded from
numba's on-disk cache; `warmup()` forces that outside any timing). There is a serial and a
`prange`-parallel variant of each: when the process also runs torch's OpenMP pool (always, in
a model), the two thread pools contend and the serial kernel is usually faster on small
machines -- the runtime measures both and picks. Accumulation is in fp32 like the dense
kernels, so outputs agree with dense within fp32 rounding (summation order differs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

C = 16  # slice height = rows handled together = fp32 lanes of one AVX-512 register
U16_MAX_COLS = 65536


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _gemv_slice(s, ptr, lens, perm, values, indices, x, bias, y, acc0, acc1):  # pragma: no cover - compiled
    # Two accumulator vectors (even / odd slots) halve the FMA -> store -> load dependency chain:
    # measured ~25 % faster than one, enough to stream the format at dense GEMV bandwidth.
    acc0[:] = 0.0
    acc1[:] = 0.0
    b = ptr[s]
    n = lens[s]
    j = 0
    while j + 1 < n:
        o = b + j * 16
        for lane in range(16):
            acc0[lane] += values[o + lane] * x[indices[o + lane]]
        o += 16
        for lane in range(16):
            acc1[lane] += values[o + lane] * x[indices[o + lane]]
        j += 2
    if j < n:
        o = b + j * 16
        for lane in range(16):
            acc0[lane] += values[o + lane] * x[indices[o + lane]]
    for lane in range(16):
        r = perm[s * 16 + lane]
        y[r] = acc0[lane] + acc1[lane] + bias[r]


@njit(fastmath=True, cache=True, nogil=True)
def _gemv_serial(ptr, lens, perm, values, indices, x, bias, y):  # pragma: no cover - compiled
    acc0 = np.zeros(16, np.float32)
    acc1 = np.zeros(16, np.float32)
    for s in range(lens.shape[0]):
        _gemv_slice(s, ptr, lens, perm, values, indices, x, bias, y, acc0, acc1)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _gemv_parallel(ptr, lens, perm, values, indices, x, bias, y):  # pragma: no cover - compiled
    for s in prange(lens.shape[0]):
        acc0 = np.zeros(16, np.float32)
        acc1 = np.zeros(16, np.float32)
        _gemv_slice(s, ptr, lens, perm, values, indices, x, bias, y, acc0, acc1)


@njit(fastmath=True, cache=True, nogil=True)
def _spmm_slice(s, ptr, perm, row_nnz, values, indices, xt, yt):  # pragma: no cover - compiled
    # yt[r, :] = sum_j values * xt[col, :] for the 16 rows of slice s (an axpy over the batch per weight)
    nb = xt.shape[1]
    b = ptr[s]
    for lane in range(16):
        i = s * 16 + lane
        r = perm[i]
        if r >= yt.shape[0]:
            continue
        out = yt[r]
        for q in range(nb):
            out[q] = 0.0
        for j in range(row_nnz[i]):
            o = b + j * 16 + lane
            v = values[o]
            src = xt[indices[o]]
            for q in range(nb):
                out[q] += v * src[q]


@njit(fastmath=True, cache=True, nogil=True)
def _spmm_serial(ptr, perm, row_nnz, values, indices, xt, yt):  # pragma: no cover - compiled
    for s in range(ptr.shape[0] - 1):
        _spmm_slice(s, ptr, perm, row_nnz, values, indices, xt, yt)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _spmm_parallel(ptr, perm, row_nnz, values, indices, xt, yt):  # pragma: no cover - compiled
    for s in prange(ptr.shape[0] - 1):
        _spmm_slice(s, ptr, perm, row_nnz, values, indices, xt, yt)


@dataclass
class SellMatrix:
    """An (out, in) fp32 matrix in SELL-16 with narrow column indices (see module docstring).

    `ptr[s]` is where slice s starts in `values`/`indices`, `lens[s]` its padded length (slots),
    `perm[i]` the original row of sorted row i (rows >= out are padding), `row_nnz[i]` its
    true nonzero count. Arrays are numpy; `nbytes` is what one product has to read.
    """

    ptr: np.ndarray  # int64 (slices + 1)
    lens: np.ndarray  # int32 (slices)
    perm: np.ndarray  # int32 (slices * 16)
    row_nnz: np.ndarray  # int32 (slices * 16)
    values: np.ndarray  # float32 (ptr[-1])
    indices: np.ndarray  # uint16 or int32 (ptr[-1])
    shape: tuple[int, int]
    nnz: int

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> SellMatrix:
        """Build from an (out, in) dense weight; exact zeros are dropped, every other value kept bit for bit."""
        w = weight.detach().to(torch.float32).contiguous().numpy()
        rows, cols = w.shape
        nz = w != 0
        counts = nz.sum(axis=1).astype(np.int64)
        nslices = (rows + C - 1) // C
        padded = np.zeros(nslices * C, dtype=np.int64)
        padded[:rows] = counts
        perm = np.argsort(-padded, kind="stable")  # longest rows first; padding rows (count 0) last
        sorted_counts = padded[perm]
        lens = sorted_counts.reshape(nslices, C).max(axis=1)
        ptr = np.zeros(nslices + 1, dtype=np.int64)
        np.cumsum(lens * C, out=ptr[1:])
        rank = np.empty(nslices * C, dtype=np.int64)
        rank[perm] = np.arange(nslices * C)
        r_idx, c_idx = np.nonzero(nz)  # row-major, columns ascending within a row
        row_start = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(counts, out=row_start[1:])
        slot = np.arange(r_idx.shape[0], dtype=np.int64) - row_start[r_idx]
        pos_in_order = rank[r_idx]
        pos = ptr[pos_in_order // C] + slot * C + pos_in_order % C
        idx_dtype = np.uint16 if cols <= U16_MAX_COLS else np.int32
        values = np.zeros(int(ptr[-1]), dtype=np.float32)
        indices = np.zeros(int(ptr[-1]), dtype=idx_dtype)
        values[pos] = w[r_idx, c_idx]
        indices[pos] = c_idx
        return cls(
            ptr=ptr, lens=lens.astype(np.int32), perm=perm.astype(np.int32),
            row_nnz=sorted_counts.astype(np.int32), values=values, indices=indices,
            shape=(rows, cols), nnz=int(r_idx.shape[0]),
        )

    @property
    def nbytes(self) -> int:
        """Bytes a product reads: values, indices and the per-slice/per-row metadata."""
        return int(sum(a.nbytes for a in (self.ptr, self.lens, self.perm, self.row_nnz, self.values, self.indices)))

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def padding(self) -> float:
        """Fraction of stored slots that are padding (not real weights)."""
        return 1.0 - self.nnz / max(1, self.values.shape[0])

    def to_dense(self) -> torch.Tensor:
        """The (out, in) fp32 dense matrix, exactly as it was built from."""
        rows, cols = self.shape
        out = np.zeros((len(self.perm), cols), dtype=np.float32)
        for s in range(len(self.lens)):
            n = int(self.lens[s]) * C
            if n == 0:
                continue
            block_v = self.values[self.ptr[s]: self.ptr[s] + n].reshape(-1, C)
            block_i = self.indices[self.ptr[s]: self.ptr[s] + n].reshape(-1, C).astype(np.int64)
            for lane in range(C):
                i = s * C + lane
                k = int(self.row_nnz[i])
                out[self.perm[i], block_i[:k, lane]] = block_v[:k, lane]
        return torch.from_numpy(out[:rows].copy())

    def padded_bias(self, bias: np.ndarray | None) -> np.ndarray:
        """A bias of length slices x 16 (zeros past out_features, or all zeros) for `gemv`."""
        b = np.zeros(len(self.perm), dtype=np.float32)
        if bias is not None:
            b[: self.shape[0]] = bias
        return b

    def gemv(self, x: np.ndarray, *, parallel: bool = False, bias: np.ndarray | None = None) -> np.ndarray:
        """y = W x (+ bias) for a contiguous fp32 vector x; `bias` must come from `padded_bias`."""
        if bias is None:
            bias = self.padded_bias(None)
        y = np.empty(len(self.perm), dtype=np.float32)
        fn = _gemv_parallel if parallel else _gemv_serial
        fn(self.ptr, self.lens, self.perm, self.values, self.indices, x, bias, y)
        return y[: self.shape[0]]

    def spmm_t(self, xt: np.ndarray, *, parallel: bool = False) -> np.ndarray:
        """Y^T = W X^T for a contiguous fp32 X^T of shape (in_features, batch); returns (out, batch)."""
        yt = np.empty((self.shape[0], xt.shape[1]), dtype=np.float32)
        fn = _spmm_parallel if parallel else _spmm_serial
        fn(self.ptr, self.perm, self.row_nnz, self.values, self.indices, xt, yt)
        return yt


_WARM = False


def warmup() -> None:
    """Compile (or load from numba's cache) every kernel signature we use, outside any timing."""
    global _WARM
    if _WARM:
        return
    for cols in (8, U16_MAX_COLS + 1):
        w = torch.zeros(3, cols)
        w[0, 1] = 1.0
        w[2, cols - 1] = 2.0
        m = SellMatrix.from_dense(w)
        x = np.ones(cols, dtype=np.float32)
        xt = np.ones((cols, 2), dtype=np.float32)
        for par in (False, True):
            m.gemv(x, parallel=par)
            m.spmm_t(xt, parallel=par)
    _WARM = True

"""Streaming |w| statistics over fixed log10 bins, mergeable across tensors, blocks and files.

Why it is built this way:

* **Fixed, shared bin edges.** Every tensor is histogrammed on the same log10|w| grid
  (`EDGES`, 40 bins per decade from 1e-10 to 1e4, plus an underflow and an overflow bin,
  exact zeros counted apart). Histograms of matrices therefore add up *exactly* into
  blocks, module types and the whole model, and quantiles of any group can be read from
  its merged histogram to within one bin.
* **Binning from the bit pattern, no log10.** For a non-negative float32, the integer
  order of its bits is its numeric order, so `bits >> 15` is a "fine" bucket 1/256 of an
  octave wide. The nominal edges 10**(k/40) are snapped to fine-bucket boundaries (a shift
  of at most 0.0017 decades, reported in `EDGES_LOG10`), so every coarse bin is an exact
  union of fine buckets and the scan does one table increment per weight.
* **Exact threshold counts.** `fraction_below` is not read from the histogram: each
  threshold t is compared with every weight as the smallest float32 >= t, which equals
  ``abs(w.astype(float64)) < t`` exactly. These counts, sums and the max vectorise (SIMD).
* **Accurate moments.** Mean and std of |w| use float64 shifted sums per chunk, merged with
  Chan's parallel formula, so neither large counts nor a large mean lose precision.
* **Reading inside the kernel.** For files, `summarize_file_range` `pread`s 256 KiB pieces from
  compiled code and runs both passes while the piece is in L2: memory stays at one piece per
  thread, and threads scale because no Python runs between pieces.
* **16-bit weights are counted, not scanned.** A bfloat16/float16 |w| takes one of 2**15 values,
  so the file loop only histograms the raw patterns and derives every statistic per pattern.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from llvmlite import ir as _ir

_njit = numba.njit(nogil=True, cache=True)


LOG10_LO = -10
LOG10_HI = 4
BINS_PER_DECADE = 40
N_BINS = (LOG10_HI - LOG10_LO) * BINS_PER_DECADE

# A float32's bit pattern without its sign, shifted right by FINE_SHIFT, indexes a "fine"
# bucket: 2**(23 - FINE_SHIFT) = 256 buckets per octave (each <= 0.39 % wide). Bin edges are
# put on fine-bucket boundaries, so a coarse bin is exactly a union of fine buckets and the
# scan only needs `fine[bits >> FINE_SHIFT] += 1` per weight.
FINE_SHIFT = 15
N_FINE = (1 << 31) >> FINE_SHIFT
_INF_BITS = 0x7F800000


def _edge_bits() -> np.ndarray:
    """Nominal edges 10**(LO + i/40), snapped to the nearest fine-bucket boundary (<= 0.0017 decades)."""
    nominal = 10.0 ** (LOG10_LO + np.arange(N_BINS + 1) / BINS_PER_DECADE)
    bits = nominal.astype(np.float32).view(np.uint32).astype(np.int64)
    step = 1 << FINE_SHIFT
    return ((bits + step // 2) // step) * step


_EDGE_BITS = _edge_bits()
#: Bin edges as numbers. counts[0] is 0 < |w| < EDGES[0], counts[i] is EDGES[i-1] <= |w| < EDGES[i],
#: counts[N_BINS + 1] is |w| >= EDGES[-1]. Exact zeros and NaN/inf are counted apart.
EDGES = _EDGE_BITS.astype(np.uint32).view(np.float32).astype(np.float64)
EDGES_LOG10 = np.log10(EDGES)

#: fine bucket -> extended bin index (0 underflow, 1..N_BINS, N_BINS + 1 overflow, N_BINS + 2 NaN/inf).
FINE_TO_BIN = np.searchsorted(_EDGE_BITS >> FINE_SHIFT, np.arange(N_FINE), side="right").astype(np.int32)
FINE_TO_BIN[_INF_BITS >> FINE_SHIFT :] = N_BINS + 2

THRESHOLDS: dict[str, float] = {"1e-4": 1e-4, "1e-3": 1e-3, "1e-2": 1e-2, "1e-1": 1e-1, "1": 1.0}
QUANTILES: dict[str, float] = {"1": 0.01, "10": 0.10, "50": 0.50, "90": 0.90, "99": 0.99, "99.9": 0.999}
_T64 = np.array(list(THRESHOLDS.values()), dtype=np.float64)


def _threshold_bits() -> np.ndarray:
    """Bits of the smallest float32 >= each threshold: `bits < T` <=> `|w| < t` exactly (t as float64)."""
    t32 = _T64.astype(np.float32)
    low = t32.astype(np.float64) < _T64
    t32[low] = np.nextafter(t32[low], np.float32(np.inf))
    return t32.view(np.uint32).copy()


_T_BITS = _threshold_bits()
_FM = {"reassoc", "contract", "nsz", "arcp"}  # lets LLVM vectorise the sums; NaN/inf semantics stay IEEE
#: Values per piece: 256 KiB of float32, so pass A and pass B both find it in L2.
PIECE = 1 << 16
_SHIFT_HEAD = 4096  # values used to pick the moments' shift

# Per-chunk integer accumulators (int64 array): exact zeros, finite values, max bit pattern of the
# finite values, max bit pattern of all values and min bit pattern of the non-zero ones minus one
# (together they bound the fold), then one count per threshold.
A_ZEROS, A_FINITE, A_MAXBITS, A_TOPBITS, A_LOWBITS, A_BELOW = 0, 1, 2, 3, 4, 5
N_ACC = A_BELOW + len(THRESHOLDS)
#: Most values folded into the int32 fine histogram between two `_fold`s.
MAX_CHUNK_VALUES = 1 << 30

_njit_fast = numba.njit(nogil=True, cache=True, fastmath=_FM)


@_njit_fast
def _pass_a(x, shift_k, t):
    """Vectorised: float64 shifted sums of |x|, max bit pattern, zeros, counts below thresholds.

    The bit patterns are compared as int32 and the counters truncated back to int32 each step:
    numba would otherwise widen them to int64 and LLVM would spend most of the loop converting
    compare masks to 64-bit lanes (measured: 9 -> 16 GB/s on one core). A piece has < 2**31 values.
    """
    b0 = x.view(np.int32)
    m = np.int32(0x7FFFFFFF)
    t0, t1, t2, t3, t4 = np.int32(t[0]), np.int32(t[1]), np.int32(t[2]), np.int32(t[3]), np.int32(t[4])
    s1 = 0.0
    s2 = 0.0
    mx = np.int32(0)
    mn = np.int32(0x7FFFFFFF)
    z = np.int32(0)
    c0 = np.int32(0)
    c1 = np.int32(0)
    c2 = np.int32(0)
    c3 = np.int32(0)
    c4 = np.int32(0)
    for i in range(b0.shape[0]):
        d = abs(np.float64(x[i])) - shift_k
        s1 += d
        s2 += d * d
        b = b0[i] & m
        mx = max(mx, b)
        mn = min(mn, (b - np.int32(1)) & m)  # zero wraps to the top: the smallest non-zero pattern - 1
        z = np.int32(z + (b == 0))
        c0 = np.int32(c0 + (b < t0))
        c1 = np.int32(c1 + (b < t1))
        c2 = np.int32(c2 + (b < t2))
        c3 = np.int32(c3 + (b < t3))
        c4 = np.int32(c4 + (b < t4))
    return s1, s2, mx, mn, z, c0, c1, c2, c3, c4


@_njit
def _pass_b(x, fine):
    """Scalar: the fine histogram of |x| bit patterns, into 4 interleaved int32 copies.

    Real checkpoints repeat values (a dequantized GGUF has 16 levels per block), so neighbours
    often hit the same bucket and one histogram stalls on its own read-modify-write; four
    copies break that chain (measured on SmolLM2: 8.7 -> 11.6 GB/s on one core).
    """
    b0 = x.view(np.int32)
    n4 = b0.shape[0] // 4 * 4
    for i in range(0, n4, 4):
        fine[0, (b0[i] & 0x7FFFFFFF) >> FINE_SHIFT] += 1
        fine[1, (b0[i + 1] & 0x7FFFFFFF) >> FINE_SHIFT] += 1
        fine[2, (b0[i + 2] & 0x7FFFFFFF) >> FINE_SHIFT] += 1
        fine[3, (b0[i + 3] & 0x7FFFFFFF) >> FINE_SHIFT] += 1
    for i in range(n4, b0.shape[0]):
        fine[0, (b0[i] & 0x7FFFFFFF) >> FINE_SHIFT] += 1


@_njit
def _moments_masked(x, shift_k):
    """Shifted sums, max bit pattern and count of the finite values: the slow path for pieces with NaN/inf."""
    b0 = x.view(np.int32)
    s1 = 0.0
    s2 = 0.0
    mx = 0
    n = 0
    for i in range(x.shape[0]):
        b = b0[i] & 0x7FFFFFFF
        if b < _INF_BITS:
            d = abs(np.float64(x[i])) - shift_k
            s1 += d
            s2 += d * d
            n += 1
            mx = max(mx, b)
    return s1, s2, mx, n


@_njit
def _shift(x):
    """Mean |x| of the first finite values: a shift near the mean keeps M2 free of cancellation."""
    total = 0.0
    n = 0
    for i in range(min(x.shape[0], _SHIFT_HEAD)):
        a = abs(np.float64(x[i]))
        if a < np.inf:
            total += a
            n += 1
    return total / n if n else 0.0


@_njit
def _accumulate(x, shift_k, t, fine, acc, sums):
    """Fold a float32 array into the fine histogram and the accumulators, one L2-sized piece at a time."""
    for start in range(0, x.shape[0], PIECE):
        p = x[start : start + PIECE]
        s1, s2, mx, mn, z, c0, c1, c2, c3, c4 = _pass_a(p, shift_k, t)
        top = np.int64(mx)
        n_fin = p.shape[0]
        if top >= _INF_BITS:  # NaN or inf in this piece: recompute its moments over finite values only
            s1, s2, mxf, n_fin = _moments_masked(p, shift_k)
            acc[A_MAXBITS] = max(acc[A_MAXBITS], mxf)
        else:
            acc[A_MAXBITS] = max(acc[A_MAXBITS], top)
        acc[A_TOPBITS] = max(acc[A_TOPBITS], top)
        acc[A_LOWBITS] = min(acc[A_LOWBITS], np.int64(mn))
        acc[A_ZEROS] += z
        acc[A_FINITE] += n_fin
        acc[A_BELOW] += c0
        acc[A_BELOW + 1] += c1
        acc[A_BELOW + 2] += c2
        acc[A_BELOW + 3] += c3
        acc[A_BELOW + 4] += c4
        sums[0] += s1
        sums[1] += s2
        _pass_b(p, fine)


if hasattr(os, "pread"):
    _pread = numba.types.ExternalFunction(
        "pread", numba.types.intp(numba.types.int32, numba.types.voidptr, numba.types.uintp, numba.types.int64)
    )
else:  # pragma: no cover - no pread (Windows): callers use the Python reader instead
    _pread = None

#: Kinds of weights `_scan_fd` reads itself.
FD_KINDS = {"F32": 0, "BF16": 1, "F16": 2}


@_njit
def _read_exact(fd, ptr, nbytes, off):
    """pread until nbytes arrived: 0 on success, -1 on an OS error, -2 at an early end of file."""
    got = 0
    while got < nbytes:
        r = _pread(fd, ptr + got, nbytes - got, off + got)
        if r < 0:
            return -1
        if r == 0:
            return -2
        got += r
    return 0


@numba.extending.intrinsic
def _f32_bits(typingctx, x):  # type: ignore[no-redef]
    """The uint32 bit pattern of a float32 scalar (an LLVM bitcast: free, and vectorisable)."""
    sig = numba.types.uint32(numba.types.float32)
    return sig, lambda context, builder, signature, args: builder.bitcast(args[0], _ir.IntType(32))


@numba.extending.intrinsic
def _bits_f32(typingctx, x):  # type: ignore[no-redef]
    """The float32 whose bit pattern is a uint32 scalar."""
    sig = numba.types.float32(numba.types.uint32)
    return sig, lambda context, builder, signature, args: builder.bitcast(args[0], _ir.FloatType())


@_njit
def _half_abs_bits(h16):
    """float32 bit pattern of |h| for float16 bits, exactly (every statistic here uses |w| only).

    Branch-free: a normal half moves its exponent and mantissa into place (inf/NaN get the
    float32 all-ones exponent); a subnormal one is m * 2**-24, computed in float32 (exact: m < 1024).
    """
    h = np.uint32(h16) & np.uint32(0x7FFF)
    normal = (h << np.uint32(13)) + np.uint32(0x38000000)
    normal += np.uint32(0x38000000) if h >= 0x7C00 else np.uint32(0)
    sub = _f32_bits(np.float32(h) * np.float32(2.0**-24))
    return sub if h < 0x400 else normal


#: Magnitude patterns of a 16-bit float (sign dropped).
N_HALF = 1 << 15


@_njit
def _pattern_range(h):
    """Smallest non-zero |pattern| minus one, and the largest, in a piece of 16-bit floats (vectorised)."""
    lo = np.uint16(0xFFFF)
    hi = np.uint16(0)
    m = np.uint16(0x7FFF)
    for i in range(h.shape[0]):
        v = h[i] & m
        lo = min(lo, np.uint16(v - np.uint16(1)))  # zero wraps to the top: zeros do not widen the range
        hi = max(hi, v)
    return lo, hi


@_njit
def _count_patterns(h, hist):
    """hist[|pattern|] += 1 over a piece, into 4 interleaved int32 copies (see `_pass_b`)."""
    n4 = h.shape[0] // 4 * 4
    for i in range(0, n4, 4):
        hist[0, h[i] & 0x7FFF] += 1
        hist[1, h[i + 1] & 0x7FFF] += 1
        hist[2, h[i + 2] & 0x7FFF] += 1
        hist[3, h[i + 3] & 0x7FFF] += 1
    for i in range(n4, h.shape[0]):
        hist[0, h[i] & 0x7FFF] += 1


@_njit
def _pattern_bits(p, kind):
    return np.uint32(p) << np.uint32(16) if kind == 1 else _half_abs_bits(np.uint16(p))


@_njit
def _fold_patterns(hist, kind, lo, hi, t, fine, acc, sums, seen):
    """Turn a 16-bit pattern histogram into what `_accumulate` would have produced; returns the shift.

    A bfloat16/float16 weight can only take 2**15 magnitudes, so the scan just counts patterns
    (one scalar increment per weight) and every statistic is computed here, once per pattern
    present: 0 (the zeros) and lo+1..hi. The moments come out better than streamed ones: the
    mean is known before the squared deviations are summed. Leaves `hist` zeroed; `seen` is
    scratch for the (bits, count) pairs found. Accumulators are locals until the end, so they
    stay in registers (as array elements they cost ~60 ns per pattern).
    """
    start = max(lo + 1, 1)
    zeros = 0
    n_fin = 0
    total = 0.0
    maxb = 0
    topb = 0
    lowb = 0x7FFFFFFF
    below = np.zeros(t.shape[0], dtype=np.int64)
    k = 0
    for i in range(-1, hi + 1 - start):
        q = 0 if i < 0 else start + i  # pattern 0 first, then the range
        c = np.int64(hist[0, q]) + hist[1, q] + hist[2, q] + hist[3, q]
        if c == 0:
            continue
        hist[0, q] = 0
        hist[1, q] = 0
        hist[2, q] = 0
        hist[3, q] = 0
        b = _pattern_bits(q, kind)
        fine[0, b >> FINE_SHIFT] += c
        topb = max(topb, np.int64(b))
        if b >= _INF_BITS:  # NaN/inf: counted by the fine histogram's last slot only
            continue
        seen[0, k] = b
        seen[1, k] = c
        k += 1
        n_fin += c
        total += c * np.float64(_bits_f32(b))
        maxb = max(maxb, np.int64(b))
        if b == 0:
            zeros += c
        else:
            lowb = min(lowb, np.int64(b) - 1)
        for j in range(t.shape[0]):
            if b < t[j]:
                below[j] += c
    acc[A_ZEROS] += zeros
    acc[A_FINITE] += n_fin
    acc[A_MAXBITS] = max(acc[A_MAXBITS], maxb)
    acc[A_TOPBITS] = max(acc[A_TOPBITS], topb)
    acc[A_LOWBITS] = min(acc[A_LOWBITS], lowb)
    for j in range(t.shape[0]):
        acc[A_BELOW + j] += below[j]
    shift = total / n_fin if n_fin else 0.0
    for i in range(k):
        d = np.float64(_bits_f32(np.uint32(seen[0, i]))) - shift
        sums[0] += seen[1, i] * d
        sums[1] += seen[1, i] * d * d
    return shift


@_njit
def _scan_fd(fd, start, nbytes, kind, buf32, buf16, hist, seen, t, fine, acc, sums):
    """Scan bytes [start, start+nbytes) of a file of float32 (kind 0), bfloat16 (1) or float16 (2) weights.

    The whole loop — `pread` of one L2-sized piece, then the passes, next piece — runs without
    the GIL and without a Python call per piece, which is what lets two threads scale (the
    Python per-chunk path spent ~60 µs of GIL time per chunk). 16-bit weights are only counted
    per pattern here and summarised at the end (`_fold_patterns`). Returns (status, shift):
    status 0, or the `_read_exact` code of the piece that failed.
    """
    item = 4 if kind == 0 else 2
    step = buf32.shape[0] * item
    shift_k = 0.0
    lo = 0xFFFF
    hi = 0
    off = start
    end = start + nbytes
    while off < end:
        want = min(step, end - off)
        n = want // item
        if kind == 0:
            status = _read_exact(fd, buf32.ctypes.data, want, off)
        else:
            status = _read_exact(fd, buf16.ctypes.data, want, off)
        if status != 0:
            hist[:] = 0
            return status, shift_k
        if kind == 0:
            x = buf32[:n]
            if off == start:
                shift_k = _shift(x)
            _accumulate(x, shift_k, t, fine, acc, sums)
        else:
            h = buf16[:n]
            plo, phi = _pattern_range(h)
            lo = min(lo, np.int64(plo))
            hi = max(hi, np.int64(phi))
            _count_patterns(h, hist)
        off += want
    if kind != 0:
        shift_k = _fold_patterns(hist, kind, lo, hi, t, fine, acc, sums, seen)
    return 0, shift_k


@_njit
def _move_bucket(fine, fine_to_bin, counts, f):
    c = np.int64(fine[0, f]) + fine[1, f] + fine[2, f] + fine[3, f]
    if c:
        counts[fine_to_bin[f]] += c
        fine[0, f] = 0
        fine[1, f] = 0
        fine[2, f] = 0
        fine[3, f] = 0


@_njit
def _fold(fine, fine_to_bin, counts, first, last):
    """Move fine buckets 0 and first..last of all copies into the extended bins (last slot: NaN/inf), zeroing them.

    Only buckets the chunk can have touched are visited (~5k of 64k for a typical matrix): the
    whole table costs ~50 µs, as much as scanning 200 KB.
    """
    if first > 0:  # bucket 0 holds the exact zeros even when no non-zero value is that small
        _move_bucket(fine, fine_to_bin, counts, 0)
    for f in range(first, last + 1):
        _move_bucket(fine, fine_to_bin, counts, f)


@_njit
def _scan_f64(x, edges, t, counts, below, shift_k):
    """The float64 path: binary search on the edges (rare dtype, simplicity over speed)."""
    zeros = 0
    nonfinite = 0
    s1 = 0.0
    s2 = 0.0
    mx = 0.0
    nb = edges.shape[0] - 1
    for i in range(x.shape[0]):
        a = abs(x[i])
        if not a < np.inf:
            nonfinite += 1
            continue
        d = a - shift_k
        s1 += d
        s2 += d * d
        if a > mx:
            mx = a
        for j in range(t.shape[0]):
            if a < t[j]:
                below[j] += 1
        if a == 0.0:
            zeros += 1
            continue
        k = np.searchsorted(edges, a, side="right")
        counts[min(k, nb + 1)] += 1
    return zeros, nonfinite, s1, s2, mx


@dataclass
class Summary:
    """Mergeable |w| statistics of any set of weights (a chunk, a matrix, a block, a model)."""

    params: int = 0
    zeros: int = 0
    nonfinite: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS + 2, dtype=np.int64))
    below: np.ndarray = field(default_factory=lambda: np.zeros(len(THRESHOLDS), dtype=np.int64))
    n_finite: int = 0  # finite values, zeros included: the population of mean/std
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean (float64)
    max: float = 0.0

    def merge(self, other: Summary) -> Summary:
        """Add `other` into self (Chan et al. for mean/M2); returns self."""
        self.params += other.params
        self.zeros += other.zeros
        self.nonfinite += other.nonfinite
        self.counts += other.counts
        self.below += other.below
        self._merge_moments(other.n_finite, other.mean, other.m2)
        self.max = max(self.max, other.max)
        return self

    def _merge_moments(self, n_b: int, mean_b: float, m2_b: float) -> None:
        if n_b == 0:
            return
        n_a = self.n_finite
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * n_a * n_b / n
        self.n_finite = n

    def update(self, values: np.ndarray) -> None:
        """Accumulate a 1-D chunk of float16 / bfloat16 (as a uint16 view) / float32 / float64 weights."""
        x = _as_scannable(values)
        n = int(x.shape[0])
        if n == 0:
            return
        if n > MAX_CHUNK_VALUES:  # keeps the int32 fine histogram from overflowing
            for start in range(0, n, MAX_CHUNK_VALUES):
                self.update(x[start : start + MAX_CHUNK_VALUES])
            return
        if x.dtype == np.float32:
            fine, acc, sums = _scratch()
            shift_k = float(_shift(x))
            _accumulate(x, shift_k, _T_BITS, fine, acc, sums)
            self._absorb(n, shift_k, fine, acc, sums)
            return
        shift_k = float(_shift(x))
        zeros, nonfinite, s1, s2, mx = _scan_f64(x, EDGES, _T64, self.counts, self.below, shift_k)
        self.params += n
        self.zeros += int(zeros)
        self.nonfinite += int(nonfinite)
        self._add_moments(n - int(nonfinite), shift_k, s1, s2)
        self.max = max(self.max, float(mx))

    def _absorb(self, n: int, shift_k: float, fine: np.ndarray, acc: np.ndarray, sums: np.ndarray) -> None:
        """Add the result of `_accumulate` over n values, and reset the scratch for the next chunk."""
        ext = np.zeros(N_BINS + 3, dtype=np.int64)
        _fold(fine, FINE_TO_BIN, ext, (int(acc[A_LOWBITS]) + 1) >> FINE_SHIFT, int(acc[A_TOPBITS]) >> FINE_SHIFT)
        zeros = int(acc[A_ZEROS])
        ext[0] -= zeros  # zeros sit in fine bucket 0; they are reported apart
        self.counts += ext[:-1]
        self.below += acc[A_BELOW:]
        self.params += n
        self.zeros += zeros
        self.nonfinite += n - int(acc[A_FINITE])
        self._add_moments(int(acc[A_FINITE]), shift_k, float(sums[0]), float(sums[1]))
        if acc[A_FINITE]:
            self.max = max(self.max, float(np.array([acc[A_MAXBITS]], dtype=np.uint32).view(np.float32)[0]))
        _reset(acc, sums)

    def _add_moments(self, m: int, shift_k: float, s1: float, s2: float) -> None:
        """Merge m values given their sums of (|w| - shift) and of its square."""
        if m:
            self._merge_moments(m, shift_k + s1 / m, max(s2 - s1 * s1 / m, 0.0))

    # ----- derived numbers -------------------------------------------------------------------

    def below_count(self, key: str) -> int:
        """Exact count of weights with |w| < THRESHOLDS[key] (zeros included, NaN/inf never)."""
        return int(self.below[list(THRESHOLDS).index(key)])

    def quantile(self, q: float) -> float:
        """|w| quantile from the histogram, within one bin (a factor <= 10**(1/40 + 0.002)) of exact.

        Mirrors numpy's linear quantile: position h = q·(n-1) between the sorted values at ranks
        floor(h) and floor(h)+1. Each of those is placed geometrically inside its histogram bin
        (so within a factor of one bin width of the true value, zeros exactly), and the linear
        interpolation of two such estimates stays within the same factor of the exact answer.
        """
        n = self.n_finite
        if n == 0:
            return float("nan")
        h = q * (n - 1)
        r = math.floor(h)
        g = h - r
        cum = np.cumsum(self.counts)
        lo = self._value_at_rank(r, cum)
        if g == 0.0 or r + 1 >= n:
            return lo
        return lo + g * (self._value_at_rank(r + 1, cum) - lo)

    def _value_at_rank(self, r: int, cum: np.ndarray) -> float:
        """Estimate of the r-th smallest finite |w| (0-based)."""
        if r < self.zeros:
            return 0.0
        r -= self.zeros
        k = int(np.searchsorted(cum, r, side="right"))
        before = int(cum[k - 1]) if k else 0
        frac = (r - before + 0.5) / int(self.counts[k])
        if k == 0:
            value = EDGES[0] * frac
        elif k == N_BINS + 1:
            value = EDGES[-1] * (max(self.max, EDGES[-1]) / EDGES[-1]) ** frac
        else:
            lo, hi = EDGES[k - 1], EDGES[k]
            value = lo * (hi / lo) ** frac
        return float(min(value, self.max))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n_finite) if self.n_finite else float("nan")

    def to_dict(self, *, histogram: bool = True) -> dict[str, Any]:
        """The JSON form written to stats.json (fractions are of all `params`)."""
        p = self.params
        d: dict[str, Any] = {
            "params": p,
            "zeros": self.zeros,
            "zero_fraction": self.zeros / p if p else float("nan"),
            "nonfinite": self.nonfinite,
            "fraction_below": {k: (self.below_count(k) / p if p else float("nan")) for k in THRESHOLDS},
            "quantiles": {k: self.quantile(q) for k, q in QUANTILES.items()},
            "mean": self.mean if self.n_finite else float("nan"),
            "std": self.std,
            "max": self.max,
        }
        if histogram:
            d["below"] = {k: self.below_count(k) for k in THRESHOLDS}
            d["hist"] = self.counts.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        """Rebuild a summary from its JSON form (needs the histogram); used by plots and tests."""
        n_finite = d["params"] - d["nonfinite"]
        std = d["std"] if n_finite else 0.0
        return cls(
            params=d["params"], zeros=d["zeros"], nonfinite=d["nonfinite"],
            counts=np.asarray(d["hist"], dtype=np.int64), n_finite=n_finite,
            below=np.array([d["below"][k] for k in THRESHOLDS], dtype=np.int64),
            mean=d["mean"] if n_finite else 0.0, m2=std * std * n_finite, max=d["max"],
        )


def merged(parts: Iterable[Summary]) -> Summary:
    """A new summary equal to the union of `parts`."""
    total = Summary()
    for part in parts:
        total.merge(part)
    return total


_SCRATCH = threading.local()


def _scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's zeroed fine histogram and accumulators, reused across chunks (`_absorb` re-zeroes them)."""
    scratch = getattr(_SCRATCH, "arrays", None)
    if scratch is None:
        scratch = _SCRATCH.arrays = (np.zeros((4, N_FINE), dtype=np.int32), np.zeros(N_ACC, dtype=np.int64),
                                     np.zeros(2, dtype=np.float64))
        _reset(*scratch[1:])
    return scratch


def _reset(acc: np.ndarray, sums: np.ndarray) -> None:
    acc[:] = 0
    acc[A_LOWBITS] = 0x7FFFFFFF
    sums[:] = 0.0


def _read_buffers() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's buffers for `_scan_fd`: a piece of float32 values, one of 16-bit patterns,
    the zeroed pattern histogram (`_fold_patterns` re-zeroes what it used) and its pair scratch."""
    bufs = getattr(_SCRATCH, "read", None)
    if bufs is None:
        bufs = _SCRATCH.read = (np.empty(PIECE, dtype=np.float32), np.empty(PIECE, dtype=np.uint16),
                                np.zeros((4, N_HALF), dtype=np.int32), np.zeros((2, N_HALF), dtype=np.int64))
    return bufs


_FD_USABLE: list[bool] = []


def can_scan_file(dtype: str) -> bool:
    """Whether `summarize_file_range` reads this safetensors dtype itself (else use a Python reader).

    The compiled loop links libc's `pread` by name; where that fails (no such symbol), the
    Python readers take over instead of the scan failing.
    """
    if _pread is None or dtype not in FD_KINDS:
        return False
    if not _FD_USABLE:
        try:
            fine, acc, sums = _scratch()
            _scan_fd(-1, 0, 0, 0, *_read_buffers(), _T_BITS, fine, acc, sums)  # an empty range: compiles/loads only
            _FD_USABLE.append(True)
        except Exception:  # noqa: BLE001 - any compile or link failure means: use the Python reader
            _FD_USABLE.append(False)
    return _FD_USABLE[0]


def summarize_file_range(path: str | os.PathLike[str], start: int, nbytes: int, dtype: str) -> Summary:
    """Summary of bytes [start, start+nbytes) of a file holding float32, bfloat16 or float16 weights.

    Reads the file with `pread` into one 256 KiB buffer per thread from inside the compiled loop,
    so memory stays flat whatever the range and threads scale; raises OSError / EOFError on a
    failed or short read (the caller names the tensor).
    """
    item = 4 if dtype == "F32" else 2
    step = MAX_CHUNK_VALUES * item
    if nbytes > step:  # keeps the int32 fine histogram from overflowing
        return merged(summarize_file_range(path, off, min(step, start + nbytes - off), dtype)
                      for off in range(start, start + nbytes, step))
    fine, acc, sums = _scratch()
    buf32, buf16, hist, seen = _read_buffers()
    fd = os.open(path, os.O_RDONLY)
    try:
        status, shift_k = _scan_fd(fd, start, nbytes, FD_KINDS[dtype], buf32, buf16, hist, seen, _T_BITS, fine,
                                   acc, sums)
    finally:
        os.close(fd)
    if status != 0:
        fine[:] = 0
        _reset(acc, sums)
        if status == -2:
            raise EOFError(f"file ends before byte {start + nbytes}")
        raise OSError(f"read failed in bytes {start}..{start + nbytes}")
    s = Summary()
    s._absorb(nbytes // item, float(shift_k), fine, acc, sums)
    return s


def _as_scannable(values: np.ndarray) -> np.ndarray:
    """float32 or float64 1-D view/copy of a chunk; bfloat16 arrives as a uint16 view (numpy has no bf16)."""
    x = np.ascontiguousarray(values).reshape(-1)
    if x.dtype == np.float32 or x.dtype == np.float64:
        return x
    if x.dtype == np.float16:
        return x.astype(np.float32)
    if x.dtype == np.uint16:  # bfloat16 bit patterns: the top half of a float32
        return (x.astype(np.uint32) << 16).view(np.float32)
    raise TypeError(f"unsupported weight dtype {x.dtype}")


def summarize(values: np.ndarray, chunk: int = 1 << 22) -> Summary:
    """Summary of an in-memory array, processed in chunks (tests, notebooks)."""
    s = Summary()
    flat = np.asarray(values).reshape(-1)
    for start in range(0, max(flat.shape[0], 1), chunk):
        s.update(flat[start : start + chunk])
    return s


_WARM: list[bool] = []


def warm_up() -> None:
    """Load (or compile, the first time) every kernel before any scan, once per process.

    Timings then measure the scan itself, and no kernel is compiled while its argument is a
    view of a memory-mapped window: numba's compiler can keep such an argument alive, and the
    window then cannot be unmapped.
    """
    if _WARM:
        return
    for dtype in (np.float32, np.float64):
        summarize(np.linspace(-1.0, 1.0, 64, dtype=dtype))
    can_scan_file("F32")  # loads (or compiles) the file loop too
    _WARM.append(True)

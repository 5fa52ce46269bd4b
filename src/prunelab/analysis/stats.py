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
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:  # numba is a declared dependency; the fallback keeps the module importable without it.
    import numba

    _njit = numba.njit(nogil=True, cache=True)
except ImportError:  # pragma: no cover
    numba = None

    def _njit(fn):  # type: ignore[no-redef]
        return fn


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
_SUB = 1 << 16  # sub-block: pass A and pass B see the same 256 KiB while it is in cache

if numba is not None:
    _njit_fast = numba.njit(nogil=True, cache=True, fastmath=_FM)
else:  # pragma: no cover
    _njit_fast = _njit


@_njit_fast
def _pass_a(x, bits, shift_k, t):
    """Vectorised: float64 shifted sums of |x|, max bit pattern, zeros, counts below thresholds."""
    s1 = 0.0
    s2 = 0.0
    mxb = np.uint32(0)
    m = np.uint32(0x7FFFFFFF)
    t0, t1, t2, t3, t4 = t[0], t[1], t[2], t[3], t[4]
    z = np.uint32(0)
    c0 = np.uint32(0)
    c1 = np.uint32(0)
    c2 = np.uint32(0)
    c3 = np.uint32(0)
    c4 = np.uint32(0)
    for i in range(x.shape[0]):
        d = abs(np.float64(x[i])) - shift_k
        s1 += d
        s2 += d * d
        b = bits[i] & m
        mxb = max(mxb, b)
        z += np.uint32(b == 0)
        c0 += np.uint32(b < t0)
        c1 += np.uint32(b < t1)
        c2 += np.uint32(b < t2)
        c3 += np.uint32(b < t3)
        c4 += np.uint32(b < t4)
    return s1, s2, mxb, z, c0, c1, c2, c3, c4


@_njit
def _pass_b(bits, fine):
    """Scalar: the fine histogram of |x| bit patterns."""
    m = np.uint32(0x7FFFFFFF)
    for i in range(bits.shape[0]):
        fine[(bits[i] & m) >> 15] += 1


@_njit
def _scan_f32(x, bits, shift_k, t, fine, below):
    """Both passes over a float32 chunk, sub-block by sub-block; returns s1, s2, max bits, zeros."""
    n = x.shape[0]
    s1 = 0.0
    s2 = 0.0
    mxb = np.uint32(0)
    z = 0
    for start in range(0, n, 65536):
        end = min(n, start + 65536)
        a1, a2, amx, az, c0, c1, c2, c3, c4 = _pass_a(x[start:end], bits[start:end], shift_k, t)
        s1 += a1
        s2 += a2
        mxb = max(mxb, amx)
        z += az
        below[0] += c0
        below[1] += c1
        below[2] += c2
        below[3] += c3
        below[4] += c4
        _pass_b(bits[start:end], fine)
    return s1, s2, mxb, z


@_njit
def _fold(fine, fine_to_bin, counts, last):
    """Move fine buckets 0..last into the extended bins (last slot: NaN/inf), leaving `fine` zeroed."""
    for f in range(last + 1):
        c = fine[f]
        if c:
            counts[fine_to_bin[f]] += c
            fine[f] = 0


@_njit
def _moments_masked(x, shift_k):
    """Shifted sums and max of |x| over finite values only: the slow path for chunks with NaN/inf."""
    s1 = 0.0
    s2 = 0.0
    mx = 0.0
    n = 0
    for i in range(x.shape[0]):
        a = abs(np.float64(x[i]))
        if a < np.inf:
            d = a - shift_k
            s1 += d
            s2 += d * d
            n += 1
            if a > mx:
                mx = a
    return s1, s2, mx, n


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
        """Accumulate a 1-D chunk of float16 / bfloat16 (as a uint16 view) / float32 / float64 weights.

        Chunks must hold fewer than 2**32 values (per-chunk counters are uint32).
        """
        x = _as_scannable(values)
        n = int(x.shape[0])
        if n == 0:
            return
        head = np.abs(x[:4096].astype(np.float64))
        head = head[np.isfinite(head)]
        shift_k = float(head.mean()) if head.size else 0.0  # near the mean: no cancellation in M2
        if x.dtype == np.float32:
            bits = x.view(np.uint32)
            fine = _fine_scratch()
            ext = np.zeros(N_BINS + 3, dtype=np.int64)
            s1, s2, mxb, zeros = _scan_f32(x, bits, shift_k, _T_BITS, fine, self.below)
            _fold(fine, FINE_TO_BIN, ext, int(mxb) >> FINE_SHIFT)  # no bucket above the max is touched
            nonfinite = int(ext[-1])
            ext[0] -= zeros  # zeros sit in fine bucket 0; they are reported apart
            self.counts += ext[:-1]
            if nonfinite:
                s1, s2, mx, _ = _moments_masked(x, shift_k)
            else:
                mx = float(np.array([mxb], dtype=np.uint32).view(np.float32)[0])
        else:
            zeros, nonfinite, s1, s2, mx = _scan_f64(x, EDGES, _T64, self.counts, self.below, shift_k)
        self.params += n
        self.zeros += int(zeros)
        self.nonfinite += int(nonfinite)
        m = n - int(nonfinite)
        if m:
            mean_c = shift_k + s1 / m
            m2_c = max(s2 - s1 * s1 / m, 0.0)
            self._merge_moments(m, mean_c, m2_c)
        self.max = max(self.max, float(mx))

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


def _fine_scratch() -> np.ndarray:
    """A zeroed fine histogram per thread, reused across chunks (`_fold` zeroes what it used)."""
    fine = getattr(_SCRATCH, "fine", None)
    if fine is None:
        fine = _SCRATCH.fine = np.zeros(N_FINE, dtype=np.int64)
    return fine


def _as_scannable(values: np.ndarray) -> np.ndarray:
    """float32 or float64 1-D view/copy of a chunk; bfloat16 arrives as a uint16 view (numpy has no bf16)."""
    x = np.asarray(values).reshape(-1)
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


def warm_up() -> None:
    """Load (or compile, the first time) the float32 kernels so timings measure the scan itself."""
    summarize(np.linspace(-1.0, 1.0, 64, dtype=np.float32))

"""Lossless per-tensor encodings of sparse weights, and the rule that picks the smallest one.

An element is "zero" when it compares equal to 0, so both `+0.0` and `-0.0` are zeros (a
pruning step written as `w.mul_(mask)` leaves `-0.0` behind for negative weights; treating
those as nonzeros would silently double the stored size). Every nonzero — NaN, denormals,
everything else — is stored in the tensor's own dtype and comes back bit for bit; zeros come
back as `+0.0`. `dense` tensors are stored untouched, so for them even `-0.0` is kept. The
round trip is therefore exact under `torch.equal` and bit-exact for every nonzero.

Encodings (component tensors in brackets; `n` = numel, `nnz` = nonzero count, `b` = bytes per
element). A tensor is seen as a 2-D matrix `(R, C)`: `R = shape[0]`, `C = n // R` for ndim ≥ 2,
`(1, n)` for 1-D tensors.

* `dense`   [data]: the tensor as it is. `n·b` bytes.
* `bitmask` [mask uint8, values]: bit *i* of the row-major flattened tensor is set iff element
  *i* is nonzero, packed with `numpy.packbits` (big bit order: element 8k is the MSB of byte
  k; pad bits of the last byte are 0); `values` are the nonzeros in row-major order.
  `ceil(n/8) + nnz·b` bytes.
* `csr`     [values, indptr, indices]: compressed sparse rows of the `(R, C)` view. `indptr`
  (R+1 entries) uses the narrowest of uint8/uint16/int32/int64 that holds `nnz`. `indices`
  is one of (`params.index`):
    - `abs`: absolute column of each value, narrowest of uint8 (C ≤ 256) / uint16 (C ≤ 65536)
      / int32;
    - `delta8` / `delta16`: a code stream in uint8 / uint16 with escape `E = 255 / 65535`.
      A code `c < E` means "skip `c` zero columns, then the next value"; a code `E` means
      "skip `E` zero columns, no value". Gaps restart at each row (the first value of a row
      has gap = its column). The stream holds `nnz` value codes plus the escapes; an escape
      always precedes a value code of the same row.
  The narrowest index form that fits is chosen by exact byte count.
* `nm`      [values, groups uint8]: for tensors where every group of `M` consecutive elements
  along `params.axis` (`-1`: last/input dim of an `(out, in)` Linear weight, `0`: first dim,
  used for GPT-2 `Conv1D` `(in, out)` weights) holds at most `K = M − N` nonzeros. Each
  group stores exactly `K` values (groups with fewer nonzeros are padded with the group's
  first zero positions, whose stored values are exact zeros) and the *set* of kept
  positions as its rank among all K-subsets of `range(M)`, ordered by the subset's bitmask
  integer (bit j = position j). Ranks take `bits = ceil(log2(C(M, K)))` bits each, written
  MSB first, groups in order, packed with `numpy.packbits`. For 2:4 that is 3 bits per 4
  weights, below the 4 bits of two 2-bit indices (and below the 1 bit/element bitmask).
  For `axis = 0` groups run down the columns: values/groups follow the transposed (C, R)
  matrix in row-major order.

Quantized tensors (`encode_quantized`, for the matrices in `LoadedModel.quant`) use the same
encodings with integer values: int8 values (int4: two per byte, `prunelab.quant.pack_int4`,
element 2k in the low nibble, an odd count padded with a zero nibble) plus a `scales` component,
float32 `(out, groups)` in the matrix's logical `(out, in)` orientation, and for int4 a `zeros`
component, uint8 zero points in `[0, 15]` of the same shape (the integers are then the wrapped
levels `d mod 16`, see `prunelab.quant`; 0 still means pruned; an int4 tensor without `zeros`
reads as zero point 8, the symmetric grid). `params` then hold
`quant` ("int8"/"int4"), `bits`, `group_size` (null: one scale per row), `transposed` (true for
a GPT-2 `Conv1D` weight stored `(in, out)`: the integers follow the stored layout, the scales
the logical one) and, for `bitmask`, `bitorder: "little"` — element *i* is bit `i % 8` of byte
`i // 8`, so a kernel reads 64 elements' presence with one 64-bit load. `dense` stores every
integer (`data`: int8 in the tensor's shape, or packed int4, 1-D). The index keeps the
tensor's float32 dtype: decoding returns the dequantized `q * s`, exactly the model's weights,
and `to_ints`/`quant_info` return the integers and scales bit for bit.

`encode_tensor` computes the exact stored bytes of every applicable encoding and keeps the
smallest (ties → the simpler one, in the order dense, bitmask, csr, nm). Decoding is
vectorised numpy/torch; `validate` checks every structural invariant (component sizes,
bounds, nnz) first, so a corrupt component raises `CheckpointError` naming the tensor
rather than an IndexError or a silently wrong weight.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NoReturn

import numpy as np
import torch

from prunelab.errors import CheckpointError
from prunelab.quant import QuantInfo, QuantScheme, pack_int4, unpack_int4

ENCODINGS = ("dense", "bitmask", "csr", "nm")
NM_GROUP_SIZES = (2, 4, 8, 16)

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# dtype names as written in the index (torch names without the "torch." prefix).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    )
    if hasattr(torch, name)
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` → `"float32"`; the names stored in the JSON index."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in a sparse checkpoint") from None


def dtype_from_name(name: str, tensor: str = "") -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise CheckpointError(f"tensor {tensor}: unknown dtype {name!r} in the sparse index") from None


def _narrow_uint(max_value: int) -> torch.dtype:
    """Narrowest index dtype that holds 0..max_value (unsigned up to 16 bits, then signed)."""
    if max_value <= 0xFF:
        return torch.uint8
    if max_value <= 0xFFFF:
        return torch.uint16
    if max_value <= 0x7FFFFFFF:
        return torch.int32
    return torch.int64


def _np(t: torch.Tensor) -> np.ndarray:
    """numpy view of an integer/bool component (uint16 has no numpy bridge in every torch)."""
    if t.dtype == torch.uint16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _torch_u16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint16, copy=False).view(np.int16)).view(torch.uint16)


def _to_torch_index(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint16:
        return _torch_u16(a)
    np_dtype = {torch.uint8: np.uint8, torch.int32: np.int32, torch.int64: np.int64}[dtype]
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np_dtype))


def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """Flat bool tensor: True where the element is not zero (`-0.0` counts as zero; NaN does not)."""
    return t.detach().reshape(-1) != 0


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    n = math.prod(shape)
    if len(shape) >= 2:
        return shape[0], (n // shape[0] if shape[0] else 0)
    return 1, n


@lru_cache(maxsize=64)
def _subset_tables(m: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rank of each M-bit mask with popcount K, as uint16; kept positions of each rank, (C, K) int64; bits)."""
    ints = np.arange(1 << m, dtype=np.int64)
    onehot = (ints[:, None] >> np.arange(m)) & 1
    valid = onehot.sum(1) == k
    rank = np.where(valid, np.cumsum(valid) - 1, 0).astype(np.uint16)  # invalid masks are never looked up
    positions = np.argsort(1 - onehot[valid], axis=1, kind="stable")[:, :k].astype(np.int64)
    bits = (math.comb(m, k) - 1).bit_length()
    return rank, positions, bits


def _group_ints(sel: np.ndarray) -> np.ndarray:
    """(G, M ≤ 16) bool → per-group bitmask integer (bit j = position j), uint8 or uint16."""
    packed = np.packbits(sel, axis=1, bitorder="little")
    return packed[:, 0] if sel.shape[1] <= 8 else np.ascontiguousarray(packed).view("<u2")[:, 0]


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """b-bit codes, MSB first, concatenated and packed into bytes (numpy.packbits, big bit order)."""
    cb = np.empty((codes.size, bits), dtype=np.uint8)
    for j in range(bits):  # one vectorised pass per bit of the code (≤ 14), never per element
        cb[:, j] = (codes >> (bits - 1 - j)) & 1
    return np.packbits(cb.reshape(-1))


def _unpack_codes(packed: np.ndarray, groups: int, bits: int) -> np.ndarray:
    u = np.unpackbits(packed, count=groups * bits).reshape(groups, bits)
    codes = np.zeros(groups, dtype=np.uint16)
    for j in range(bits):
        codes |= u[:, j].astype(np.uint16) << np.uint16(bits - 1 - j)
    return codes


@dataclass
class EncodedTensor:
    """One tensor in its stored form: encoding name, components, and what is needed to decode."""

    name: str
    encoding: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nnz: int
    components: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def dense_bytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def stored_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.components.values())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    @property
    def quantized(self) -> bool:
        """Values are integers plus `scales` (see the module docstring)."""
        return "quant" in self.params

    @property
    def bits(self) -> int:
        """Bits per stored value: the quantized width, else the dtype's."""
        return int(self.params["bits"]) if self.quantized else self.itemsize * 8

    def quant_info(self) -> QuantInfo:
        """The scheme and the stored scales (float32 `(out, groups)`, logical orientation), bit for bit."""
        self._validate_common()
        return QuantInfo(QuantScheme(int(self.params["bits"]), self.params.get("group_size")),
                         self.components["scales"], self.components.get("zeros"))

    def _logical_shape(self) -> tuple[int, int]:
        rows, cols = self.shape if len(self.shape) == 2 else (0, 0)
        return (cols, rows) if self.params.get("transposed") else (rows, cols)

    # -- validation ------------------------------------------------------------------------
    def _fail(self, what: str) -> NoReturn:
        raise CheckpointError(f"tensor {self.name}: {what} (sparse checkpoint is corrupt; re-save it)")

    def _expect(self, comp: str, dtype: torch.dtype | None, numel: int) -> torch.Tensor:
        t = self.components.get(comp)
        if t is None:
            self._fail(f"{self.encoding} component '{comp}' is missing")
        if dtype is not None and t.dtype != dtype:
            self._fail(f"component '{comp}' has dtype {t.dtype}, expected {dtype}")
        if t.dim() != 1 and not (self.encoding == "dense" and comp == "data"):
            self._fail(f"component '{comp}' should be 1-D, has shape {tuple(t.shape)}")
        if t.numel() != numel:
            self._fail(f"component '{comp}' has {t.numel()} elements, expected {numel}")
        return t

    def _validate_common(self) -> None:
        if self.encoding not in ENCODINGS:
            self._fail(f"unknown encoding {self.encoding!r}")
        if not 0 <= self.nnz <= self.numel:
            self._fail(f"nnz {self.nnz} outside 0..{self.numel}")
        extra = set(self.components) - {"data", "mask", "values", "indptr", "indices", "groups", "scales", "zeros"}
        if extra or ("scales" in self.components) != self.quantized:
            self._fail(f"unexpected components {sorted(extra or {'scales'})}")
        if self.quantized:
            self._validate_quant()

    def _validate_quant(self) -> None:
        """Scheme parameters and the scales: float32 `(out, in // group_size)`, finite and positive."""
        bits, g = self.params.get("bits"), self.params.get("group_size")
        if self.params.get("quant") != f"int{bits}" or bits not in (4, 8) or not (g is None or isinstance(g, int)):
            self._fail(f"bad quantization parameters {self.params}")
        if len(self.shape) != 2:
            self._fail("a quantized tensor must be 2-D")
        out, inp = self._logical_shape()
        groups = 1 if g is None else (inp // g if g > 0 and inp % g == 0 else -1)
        sc = self.components["scales"]
        if sc.dtype != torch.float32 or tuple(sc.shape) != (out, groups):
            self._fail(f"scales are {sc.dtype} {tuple(sc.shape)}, expected float32 ({out}, {groups})")
        if not bool((torch.isfinite(sc) & (sc > 0)).all()):
            self._fail("scales must be finite and positive")
        zp = self.components.get("zeros")
        if zp is not None and (bits != 4 or zp.dtype != torch.uint8 or zp.shape != sc.shape
                               or (zp.numel() and int(zp.max()) > 15)):
            self._fail(f"zeros are {zp.dtype} {tuple(zp.shape)}: expected int4 zero points, uint8 in [0, 15] "
                       f"shaped like the scales")

    def _expect_values(self, comp: str, count: int) -> torch.Tensor:
        """The value stream of `count` values: the tensor's dtype, or int8 / packed int4 when quantized."""
        if not self.quantized:
            return self._expect(comp, self.dtype, count)
        if self.params["bits"] == 8:
            t = self._expect(comp, torch.int8, count)
            if bool((t == -128).any()):
                self._fail(f"{comp} holds -128, outside the int8 range [-127, 127]")
            return t
        t = self._expect(comp, torch.uint8, (count + 1) // 2)
        if count % 2 and int(t[-1]) >> 4:
            self._fail(f"{comp}: the pad nibble of the packed int4 values is set")
        return t

    def _values(self, comp: str, count: int) -> torch.Tensor:
        """Decoded value stream: int8 integers when quantized (int4 unpacked), else the stored values."""
        t = self.components[comp].reshape(-1)
        if self.quantized and self.params["bits"] == 4:
            return unpack_int4(t, count)
        return t

    def validate(self) -> None:
        """Check every structural invariant without decoding the values (cheap, vectorised)."""
        self._validate_common()
        getattr(self, f"_validate_{self.encoding}")()

    def _validate_dense(self) -> None:
        t = self._expect_values("data", self.numel)
        packed = self.quantized and self.params["bits"] == 4
        if not packed and tuple(t.shape) != self.shape:
            self._fail(f"dense data has shape {tuple(t.shape)}, expected {self.shape}")

    def _validate_bitmask(self) -> None:
        mask = self._expect("mask", torch.uint8, (self.numel + 7) // 8)
        self._expect_values("values", self.nnz)
        pad = (-self.numel) % 8
        little = self.params.get("bitorder", "big") == "little"
        if self.params.get("bitorder", "big") not in ("big", "little"):
            self._fail(f"unknown bitorder {self.params.get('bitorder')!r}")
        if pad and int(mask[-1]) & ((((1 << pad) - 1) << (8 - pad)) if little else ((1 << pad) - 1)):
            self._fail("bitmask pad bits are set")
        popcount = int(np.bitwise_count(mask.numpy()).sum(dtype=np.int64))
        if popcount != self.nnz:
            self._fail(f"bitmask has {popcount} set bits but nnz is {self.nnz}")

    def _csr_rows(self) -> tuple[int, int, np.ndarray]:
        rows, cols = _matrix_shape(self.shape)
        indptr_t = self._expect("indptr", None, rows + 1)
        if indptr_t.dtype not in (torch.uint8, torch.uint16, torch.int32, torch.int64):
            self._fail(f"indptr has dtype {indptr_t.dtype}")
        indptr = _np(indptr_t).astype(np.int64)
        if indptr[0] != 0 or indptr[-1] != self.nnz or (np.diff(indptr) < 0).any():
            self._fail("indptr is not a nondecreasing 0..nnz sequence")
        if (np.diff(indptr) > cols).any():
            self._fail("a row holds more values than columns")
        self._expect_values("values", self.nnz)
        return rows, cols, indptr

    def _validate_csr(self) -> None:
        self._csr_lin()

    def _csr_lin(self) -> np.ndarray:
        """Validated flat (row-major) positions of the CSR values, in value order."""
        rows, cols, indptr = self._csr_rows()
        kind = self.params.get("index")
        idx_t = self.components.get("indices")
        if idx_t is None:
            self._fail("csr component 'indices' is missing")
        if kind == "abs":
            self._expect("indices", None, self.nnz)
            if idx_t.dtype not in (torch.uint8, torch.uint16, torch.int32, torch.int64):
                self._fail(f"indices have dtype {idx_t.dtype}")
            col = _np(idx_t).astype(np.int64)
            row = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))
            if col.size and (col.min() < 0 or col.max() >= cols):
                self._fail(f"column index out of range 0..{cols - 1}")
            if col.size > 1:
                same = row[1:] == row[:-1]
                if (np.diff(col)[same] <= 0).any():
                    self._fail("column indices are not strictly increasing within a row")
            return row * cols + col
        if kind not in ("delta8", "delta16"):
            self._fail(f"unknown csr index kind {kind!r}")
        want = torch.uint8 if kind == "delta8" else torch.uint16
        if idx_t.dtype != want or idx_t.dim() != 1:
            self._fail(f"{kind} indices must be a 1-D {want} stream")
        esc = 0xFF if kind == "delta8" else 0xFFFF
        codes = _np(idx_t).astype(np.int64)
        is_val = codes != esc
        nvals = int(is_val.sum())
        if nvals != self.nnz:
            self._fail(f"index stream holds {nvals} value codes but nnz is {self.nnz}")
        if codes.size and not is_val[-1]:
            self._fail("index stream ends with an escape")
        before = np.cumsum(is_val) - is_val  # values before each code = index of its (next) value
        row = np.searchsorted(indptr, before, side="right") - 1
        advance = np.where(is_val, codes + 1, esc)
        total = np.cumsum(advance)
        start = total - advance
        first = np.ones(codes.size, dtype=bool)
        first[1:] = row[1:] != row[:-1]
        base = np.maximum.accumulate(np.where(first, start, 0)) if codes.size else start
        col = (total - base - 1)[is_val]
        if col.size and col.max() >= cols:
            self._fail(f"column index out of range 0..{cols - 1}")
        return row[is_val] * cols + col

    def _nm_geometry(self) -> tuple[int, int, int, int, int]:
        """(axis, M, K, groups, bits) after validating the parameters."""
        try:
            n, m, axis = int(self.params["n"]), int(self.params["m"]), int(self.params["axis"])
        except (KeyError, TypeError, ValueError):
            self._fail("nm parameters n/m/axis missing")
        if not (0 <= n <= m and m in NM_GROUP_SIZES and axis in (-1, 0)):
            self._fail(f"bad nm parameters n={n} m={m} axis={axis}")
        if axis == 0 and len(self.shape) != 2:
            self._fail("nm axis 0 needs a 2-D tensor")
        length = self.shape[axis] if self.shape else 1
        if not self.shape or length % m:
            self._fail(f"dimension {length} is not a multiple of M={m}")
        k = m - n
        groups = self.numel // m
        bits = _subset_tables(m, k)[2]
        return axis, m, k, groups, bits

    def _nm_positions(self) -> torch.Tensor:
        """Validated (groups, K) int64 kept positions within each group, in stored-value order."""
        axis, m, k, groups, bits = self._nm_geometry()
        packed = self._expect("groups", torch.uint8, (groups * bits + 7) // 8).numpy()
        self._expect_values("values", groups * k)
        pad = (-(groups * bits)) % 8
        if pad and int(packed[-1]) & ((1 << pad) - 1):
            self._fail("nm group codes have pad bits set")
        _, positions, _ = _subset_tables(m, k)
        codes = _unpack_codes(packed, groups, bits)
        if codes.size and int(codes.max()) >= positions.shape[0]:
            self._fail(f"nm group code {int(codes.max())} ≥ C({m},{k}) = {positions.shape[0]}")
        return torch.from_numpy(positions[codes.astype(np.intp)])

    def _validate_nm(self) -> None:
        self._nm_positions()

    # -- decoding ----------------------------------------------------------------------------
    def to_dense(self, *, check_nnz: bool = True) -> torch.Tensor:
        """The original tensor, bit for bit. Validates first; raises CheckpointError naming the tensor.

        A quantized tensor comes back dequantized (`q * s` in float32, exactly the saved weights).
        """
        out = self._decode(check_nnz)
        if not self.quantized:
            return out
        info = self.quant_info()
        if self.params.get("transposed"):
            return info.dequantize(out.t()).t().contiguous()
        return info.dequantize(out)

    def to_ints(self) -> torch.Tensor:
        """The stored int8 integers of a quantized tensor, in the stored layout (validated)."""
        if not self.quantized:
            self._fail("to_ints needs a quantized tensor")
        return self._decode(True)

    def _decode(self, check_nnz: bool) -> torch.Tensor:
        """The stored values put back in place: the tensor itself, or its integers when quantized."""
        self._validate_common()  # the per-encoding checks run inside each decoder below
        enc = self.encoding
        dtype = torch.int8 if self.quantized else self.dtype
        if enc == "dense":
            self._validate_dense()
            out = self._values("data", self.numel).reshape(self.shape)
        elif enc == "bitmask":
            self._validate_bitmask()
            order = self.params.get("bitorder", "big")
            bits = np.unpackbits(self.components["mask"].numpy(), count=self.numel, bitorder=order).view(bool)
            out = torch.zeros(self.numel, dtype=dtype)
            out[torch.from_numpy(bits)] = self._values("values", self.nnz)
            out = out.reshape(self.shape)
        elif enc == "csr":
            lin = self._csr_lin()
            out = torch.zeros(self.numel, dtype=dtype)
            out[torch.from_numpy(lin)] = self._values("values", self.nnz)
            out = out.reshape(self.shape)
        else:
            pos = self._nm_positions()
            axis, m = int(self.params["axis"]), int(self.params["m"])
            grouped = torch.zeros(pos.shape[0], m, dtype=dtype)
            if pos.shape[1]:
                grouped.scatter_(1, pos, self._values("values", pos.numel()).view(pos.shape))
            if axis == -1:
                out = grouped.reshape(self.shape)
            else:
                rows, cols = self.shape
                out = grouped.reshape(cols, rows).t().contiguous()
        if check_nnz:
            got = int(np.count_nonzero(nonzero_mask(out).numpy()))
            if got != self.nnz:
                self._fail(f"decoded {got} nonzeros but the index says nnz = {self.nnz}")
        return out

    def to_csr(self) -> torch.Tensor:
        """A `torch.sparse_csr_tensor` of the (R, C) matrix view, without building the dense tensor.

        For `csr` the stored arrays are used as they are (widened to int64); other encodings
        are converted from their positions. Explicit zeros padded into `nm` groups are dropped.
        """
        self.validate()
        rows, cols = _matrix_shape(self.shape)
        if self.encoding == "csr" and not self.quantized:
            _, _, indptr = self._csr_rows()
            lin = self._csr_lin()
            cols_of = lin - np.repeat(np.arange(rows) * cols, np.diff(indptr))
            return _csr_tensor(indptr, cols_of, self.components["values"], rows, cols)
        flat = self.to_dense().reshape(-1)
        lin = np.flatnonzero(nonzero_mask(flat).numpy())
        row = lin // cols if cols else lin
        indptr = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=rows), out=indptr[1:])
        return _csr_tensor(indptr, lin - row * cols, flat[torch.from_numpy(lin)], rows, cols)


def _csr_tensor(indptr: np.ndarray, col: np.ndarray, values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """torch CSR from arrays whose invariants were already checked (validate() or built sorted here)."""
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": noise for our users
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(col), values,
                                       size=(rows, cols), check_invariants=False)


# -- encoding ------------------------------------------------------------------------------------


def _csr_index_choice(mask: np.ndarray, rows: int, cols: int, nnz: int) -> tuple[str, int]:
    """(index kind, index bytes) of the narrowest CSR column encoding for this mask."""
    abs_bytes = nnz * torch.empty((), dtype=_narrow_uint(max(cols - 1, 0))).element_size()
    best = ("abs", abs_bytes)
    if cols > 0xFF and nnz:
        gap = _row_gaps(mask, cols)
        for kind, esc, width in (("delta8", 0xFF, 1), ("delta16", 0xFFFF, 2)):
            cost = (nnz + int((gap // esc).sum())) * width
            if cost < best[1]:
                best = (kind, cost)
    return best


def _row_gaps(mask: np.ndarray, cols: int) -> np.ndarray:
    """Zeros skipped before each nonzero within its row (row-major order)."""
    idx = np.flatnonzero(mask)
    row = idx // cols
    col = idx - row * cols
    prev = np.empty_like(col)
    prev[0] = -1
    prev[1:] = col[:-1]
    prev[1:][row[1:] != row[:-1]] = -1
    return col - prev - 1


def _nm_candidates(mask: torch.Tensor, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(axis, M, K) for every group size and axis along which the zeros follow a K-of-M pattern.

    Group counts are built by pairwise sums (M = 2, 4, 8, 16) on uint8, about 2n byte-adds per
    axis, instead of one reduction per M.
    """
    out: list[tuple[int, int, int]] = []
    if not shape or mask.numel() == 0:
        return out
    flat = mask.numpy().view(np.uint8)
    views = [(-1, flat.reshape(-1, shape[-1]))]
    if len(shape) == 2:
        views.append((0, flat.reshape(shape).T))
    for axis, counts in views:
        m = 1
        while m < NM_GROUP_SIZES[-1] and counts.shape[1] % 2 == 0:
            counts = counts[:, 0::2] + counts[:, 1::2]
            m *= 2
            k = int(counts.max())
            if k < m:
                out.append((axis, m, k))
    return out


def plan_encoding(t: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[str, dict[str, Any], int]:
    """(encoding, params, stored bytes) of the smallest lossless encoding of `t`."""
    shape = tuple(t.shape)
    n, b = t.numel(), t.element_size()
    dense = ("dense", {}, n * b)
    if n == 0 or t.dim() == 0 or t.dtype == torch.bool or t.is_complex() or b not in _INT_VIEW:
        return dense
    if mask is None:
        mask = nonzero_mask(t)
    return _smallest(shape, mask, lambda count: count * b)


def _smallest(shape: tuple[int, ...], mask: torch.Tensor,
              value_bytes: Callable[[int], int]) -> tuple[str, dict[str, Any], int]:
    """The smallest encoding for a nonzero `mask` when `value_bytes(count)` bytes hold `count` values
    (count·itemsize for float tensors, count or ceil(count/2) for int8 / int4 integers)."""
    n = math.prod(shape)
    nnz = int(np.count_nonzero(mask.numpy()))
    if nnz == n:
        return "dense", {}, value_bytes(n)
    cands: list[tuple[int, int, str, dict[str, Any]]] = [(value_bytes(n), 0, "dense", {})]
    cands.append(((n + 7) // 8 + value_bytes(nnz), 1, "bitmask", {}))
    rows, cols = _matrix_shape(shape)
    indptr_bytes = (rows + 1) * torch.empty((), dtype=_narrow_uint(nnz)).element_size()
    best_so_far = min(c[0] for c in cands)
    if value_bytes(nnz) + nnz + indptr_bytes < best_so_far:  # a lower bound of any CSR form
        kind, idx_bytes = _csr_index_choice(mask.numpy(), rows, cols, nnz)
        cands.append((value_bytes(nnz) + indptr_bytes + idx_bytes, 2, "csr", {"index": kind}))
    for axis, m, k in _nm_candidates(mask, shape):
        groups = n // m
        cost = value_bytes(groups * k) + (groups * _subset_tables(m, k)[2] + 7) // 8
        cands.append((cost, 3, "nm", {"n": m - k, "m": m, "axis": axis}))
    cost, _, enc, params = min(cands, key=lambda c: (c[0], c[1]))
    return enc, params, cost


def encode_tensor(t: torch.Tensor, name: str = "", *, encoding: str | None = None,
                  params: dict[str, Any] | None = None) -> EncodedTensor:
    """Encode `t` losslessly, in the smallest encoding unless `encoding` (and its params) is forced."""
    t = t.detach().to("cpu").contiguous()
    mask_t = nonzero_mask(t) if t.numel() and t.dtype != torch.bool and t.element_size() in _INT_VIEW else None
    if encoding is None:
        encoding, params, _ = plan_encoding(t, mask_t)
    params = dict(params or {})
    shape = tuple(t.shape)
    nnz = int(np.count_nonzero(mask_t.numpy())) if mask_t is not None else int((t != 0).sum()) if t.numel() else 0
    enc = EncodedTensor(name, encoding, shape, t.dtype, nnz, {}, params)
    if encoding == "dense":
        enc.components = {"data": t}
        return enc
    if mask_t is None:
        raise CheckpointError(f"tensor {name}: dtype {t.dtype} can only be stored dense")
    flat = t.reshape(-1)
    if encoding == "bitmask":
        packed = np.packbits(mask_t.numpy())
        enc.components = {"mask": torch.from_numpy(packed), "values": flat[mask_t]}
    elif encoding == "csr":
        enc.components = _encode_csr(flat, mask_t.numpy(), shape, nnz, params)
    elif encoding == "nm":
        enc.components = _encode_nm(t, mask_t, params, name)
    else:
        raise CheckpointError(f"tensor {name}: unknown encoding {encoding!r}")
    return enc


def _encode_csr(flat: torch.Tensor, mask: np.ndarray, shape: tuple[int, ...], nnz: int,
                params: dict[str, Any]) -> dict[str, torch.Tensor]:
    rows, cols = _matrix_shape(shape)
    kind = params.setdefault("index", "abs")
    idx = np.flatnonzero(mask)
    row = idx // cols if cols else idx
    counts = np.bincount(row, minlength=rows)
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    comps = {
        "values": flat[torch.from_numpy(idx)],
        "indptr": _to_torch_index(indptr, _narrow_uint(nnz)),
    }
    if kind == "abs":
        comps["indices"] = _to_torch_index(idx - row * cols, _narrow_uint(max(cols - 1, 0)))
        return comps
    esc = 0xFF if kind == "delta8" else 0xFFFF
    gap = _row_gaps(mask, cols) if nnz else np.zeros(0, dtype=np.int64)
    n_esc = gap // esc
    pos = np.arange(nnz) + np.cumsum(n_esc)
    stream = np.full(nnz + int(n_esc.sum()), esc, dtype=np.int64)
    stream[pos] = gap - n_esc * esc
    comps["indices"] = _to_torch_index(stream, torch.uint8 if kind == "delta8" else torch.uint16)
    return comps


def _encode_nm(t: torch.Tensor, mask: torch.Tensor, params: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    m, n, axis = int(params["m"]), int(params["n"]), int(params["axis"])
    k = m - n
    if axis == 0:
        t = t.t().contiguous()
        mask = mask.view(t.shape[1], t.shape[0]).t().contiguous()
    if t.shape[-1] % m:
        raise CheckpointError(f"tensor {name}: last dimension is not a multiple of M={m}")
    vals = t.reshape(-1, m)
    keep = mask.reshape(-1, m).numpy()
    ints = _group_ints(keep)
    count = np.bitwise_count(ints)
    if count.size and int(count.max()) > k:
        raise CheckpointError(f"tensor {name}: zeros do not follow a {n}:{m} pattern")
    short = np.flatnonzero(count < k)  # groups with fewer than K nonzeros: pad with their first zeros
    if short.size:
        sub = keep[short]
        zeros = ~sub
        sub_sel = sub | (zeros & (np.cumsum(zeros, axis=1) <= (k - count[short].astype(np.int64))[:, None]))
        ints = ints.copy()
        ints[short] = _group_ints(sub_sel)
    rank_tab, positions, bits = _subset_tables(m, k)
    codes = rank_tab[ints]
    packed = _pack_codes(codes, bits)
    pos = torch.from_numpy(positions[codes.astype(np.intp)])
    values = vals.gather(1, pos).reshape(-1)
    if short.size:  # padding stores +0.0, never a -0.0 that happened to sit there
        values = values.masked_fill(~torch.from_numpy(keep).gather(1, pos).reshape(-1), 0)
    return {"values": values, "groups": torch.from_numpy(packed)}


def _value_bytes(bits: int) -> Callable[[int], int]:
    return (lambda count: count) if bits == 8 else (lambda count: (count + 1) // 2)


def encode_quantized(w: torch.Tensor, name: str, info: QuantInfo, *, transposed: bool = False) -> EncodedTensor:
    """Encode a quantized matrix as integers + scales, in the smallest encoding by exact byte count.

    `w` holds the dequantized weights (stored layout; `transposed` for a `(in, out)` Conv1D weight,
    whose `info` is in the logical `(out, in)` orientation). The integers are recovered with
    `QuantInfo.ints` and checked to reproduce `w` exactly: a weight edited after quantization is a
    `CheckpointError`, never a silently different checkpoint.
    """
    w = w.detach().to("cpu").float().contiguous()
    logical = w.t() if transposed else w
    q = info.ints(logical)
    if not torch.equal(info.dequantize(q), logical):
        raise CheckpointError(f"tensor {name}: weights are not on their {info.scheme.name} grid (changed after "
                              "quantization?); re-quantize or save the float model")
    q = q.t().contiguous() if transposed else q
    bits = info.scheme.bits
    mask = nonzero_mask(q)
    encoding, params, _ = _smallest(tuple(q.shape), mask, _value_bytes(bits))
    params = {**params, "quant": info.scheme.name, "bits": bits, "group_size": info.scheme.group_size,
              "transposed": transposed}
    nnz = int(np.count_nonzero(mask.numpy()))
    enc = EncodedTensor(name, encoding, tuple(w.shape), torch.float32, nnz, {}, params)
    flat = q.reshape(-1)
    if encoding == "dense":
        enc.components = {"data": q if bits == 8 else pack_int4(flat)}
    elif encoding == "bitmask":
        params["bitorder"] = "little"
        packed = np.packbits(mask.numpy(), bitorder="little")
        enc.components = {"mask": torch.from_numpy(packed), "values": flat[mask]}
    elif encoding == "csr":
        enc.components = _encode_csr(flat, mask.numpy(), tuple(q.shape), nnz, params)
    else:
        enc.components = _encode_nm(q, mask, params, name)
    if bits == 4 and "values" in enc.components:
        enc.components["values"] = pack_int4(enc.components["values"])
    enc.components["scales"] = info.scales.detach().to("cpu", torch.float32).contiguous()
    if info.zeros is not None:
        enc.components["zeros"] = info.zeros.detach().to("cpu", torch.uint8).contiguous()
    return enc

"""Integer quantization of weight matrices: the one definition every layer shares.

Pruning decides *which* weights survive; quantization decides how each survivor is stored.
Both are needed to beat a dense int8 engine on size and speed, and every stage must agree
bit for bit on what "int8" or "int4 with group size 64" means, so the arithmetic lives
here, below every package that uses it (pruning computes the integers, storage writes them,
the runtime's kernels read them).

A quantized matrix `W` of shape `(out, in)` is `d * s`: float32 scales `s` of shape
`(out, in // group_size)`, one per output row and group of `group_size` consecutive input
columns (`group_size = None`: one per row, i.e. per output channel), times integer levels `d`,
`d = 0` exactly where the weight is pruned.

* int8 (symmetric): `d` in `[-127, 127]`, `s = max|W_group| / 127`; the stored integer is `d`.
* int4 (asymmetric, scale + zero point): each group has a zero point `z` in `[0, 15]` (uint8
  `zeros`, same shape as the scales) and `d` in the 16-level window `[-z, 15 - z]`, so the grid
  spans `[min(W_group, 0), max(W_group, 0)]` with `s = (max - min) / 15` instead of wasting half
  of it on the sign a symmetric grid needs (measured on SmolLM2 2:4: the symmetric grid cost
  1.39x perplexity). The stored integer is the nibble `d mod 16` as a signed int4 in `[-8, 7]`
  (`wrap`); `d = ((q + z) & 15) - z` recovers it. A pruned weight (`d = 0`) is stored as 0, so
  "zero integer = pruned" holds for every encoding. A symmetric int4 matrix is `z = 8`.

An all-zero group gets scale 1 (nothing divides by zero). The model keeps the dequantized
float32 weights `d * s` so every evaluation runs on what is stored; the integers come back
exactly as `round(W / s)` because `|d| <= 127` is far inside float32's 24-bit mantissa (see
`QuantInfo.ints`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.errors import ConfigError

QUANT_BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = {8: None, 4: 128}


def _qrange(bits: int) -> tuple[int, int]:
    return (-127, 127) if bits == 8 else (-8, 7)


@dataclass(frozen=True)
class QuantScheme:
    """Bits and group size; `group_size=None` means one scale per output channel."""

    bits: int
    group_size: int | None = None

    @classmethod
    def parse(cls, name: str, group_size: int | None = None) -> QuantScheme:
        """`int8` / `int4` (+ optional group size) → scheme; anything else is a one-line error."""
        if name not in QUANT_BITS:
            raise ConfigError(f"unknown --quant {name!r}: choose one of {', '.join(QUANT_BITS)}")
        bits = QUANT_BITS[name]
        if group_size is not None and group_size < 1:
            raise ConfigError(f"--group-size must be a positive integer, got {group_size}")
        return cls(bits, group_size if group_size is not None else DEFAULT_GROUP_SIZE[bits])

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmin(self) -> int:
        return _qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return _qrange(self.bits)[1]

    def groups(self, in_features: int, matrix: str = "") -> tuple[int, int]:
        """(number of groups per row, group size) for a row of `in_features`; a misfit is an error."""
        g = self.group_size or in_features
        if in_features % g:
            where = f" of {matrix}" if matrix else ""
            raise ConfigError(
                f"--group-size {g} does not divide in_features={in_features}{where}; "
                f"pick a divisor of every prunable matrix's input size (e.g. 32 or 64)")
        return in_features // g, g

    def to_dict(self) -> dict[str, int | None]:
        return {"bits": self.bits, "group_size": self.group_size}


INT4_LEVELS = 15  # an int4 window spans 16 levels: d in [-z, 15 - z]


@dataclass
class QuantInfo:
    """How one matrix was quantized: its scheme, float32 scales `(out, groups)` and, for int4, the
    uint8 zero points `(out, groups)` (None: symmetric, i.e. int8 or a `z = 8` int4 grid)."""

    scheme: QuantScheme
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    def expanded_scales(self, in_features: int) -> torch.Tensor:
        """Scales broadcast to the matrix shape `(out, in)`."""
        return _expand(self.scales, in_features)

    def expanded_zeros(self, in_features: int) -> torch.Tensor:
        """int16 zero points broadcast to `(out, in)` (int4 only; 8 when none are stored)."""
        if self.zeros is None:
            return torch.full((self.scales.shape[0], in_features), 8, dtype=torch.int16)
        return _expand(self.zeros.to(torch.int16), in_features)

    def levels(self, q: torch.Tensor) -> torch.Tensor:
        """The integer levels `d` (int16) of stored integers `q` (int4: unwrapped with the zero points)."""
        d = q.to(torch.int16)
        if self.scheme.bits != 4:
            return d
        z = self.expanded_zeros(q.shape[1])
        return ((d + z) & 15) - z

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """float32 weights `d * s` of the stored integers `q` (exactly what the model holds)."""
        return self.levels(q).to(torch.float32) * self.expanded_scales(q.shape[1])

    def ints(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored integers back from the dequantized weights: exact for weights made by `dequantize`."""
        inp = weight.shape[1]
        d = torch.round(weight.to(torch.float32) / self.expanded_scales(inp))
        if self.scheme.bits != 4:
            return d.clamp_(self.scheme.qmin, self.scheme.qmax).to(torch.int8)
        z = self.expanded_zeros(inp).to(torch.float32)
        d = torch.maximum(torch.minimum(d, INT4_LEVELS - z), -z)
        return wrap_int4(d.to(torch.int16))


def _expand(t: torch.Tensor, in_features: int) -> torch.Tensor:
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def wrap_int4(d: torch.Tensor) -> torch.Tensor:
    """int4 levels `d` (any integer dtype, |d| <= 15) → stored signed nibbles `d mod 16` in [-8, 7] (int8)."""
    return (((d.to(torch.int16) + 8) & 15) - 8).to(torch.int8)


def block_grid(block: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales `(out,)` float32, zero points `(out,)` uint8 or None) of one group given as `(out, g)`.

    int8: `max|w| / 127`. int4: the window `[min(w, 0), max(w, 0)]` over 15 steps, zero point
    `round(-min / s)`. 0 belongs to every window (a pruned weight must stay exactly 0), so the
    pruned zeros inside a group change nothing. An all-zero row gets scale 1."""
    b = block.detach().to(torch.float32)
    if scheme.bits != 4:
        scales = b.abs().amax(dim=1) / scheme.qmax
        return torch.where(scales > 0, scales, torch.ones_like(scales)), None
    lo, hi = b.amin(dim=1).clamp(max=0), b.amax(dim=1).clamp(min=0)
    scales = (hi - lo) / INT4_LEVELS
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-lo / scales).clamp_(0, INT4_LEVELS).to(torch.uint8)
    return scales, zeros


def group_grid(w: torch.Tensor, scheme: QuantScheme, matrix: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales, zero points) `(out, groups)` of a whole matrix: `block_grid` of every group."""
    out, inp = w.shape
    n_groups, g = scheme.groups(inp, matrix)
    scales, zeros = block_grid(w.detach().reshape(out * n_groups, g), scheme)
    return scales.reshape(out, n_groups), None if zeros is None else zeros.reshape(out, n_groups)


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  scheme: QuantScheme) -> torch.Tensor:
    """Dequantized round-to-nearest of `w` (`(out, k)`, or a column `(out,)`) on broadcast scales / zero points."""
    d = torch.round(w.to(torch.float32) / scales)
    if zeros is None:
        d = d.clamp_(scheme.qmin, scheme.qmax)
    else:
        z = zeros.to(torch.float32)
        d = torch.maximum(torch.minimum(d, INT4_LEVELS - z), -z)
    return d * scales


def quantize_rtn(w: torch.Tensor, scheme: QuantScheme, matrix: str = "") -> tuple[torch.Tensor, QuantInfo]:
    """Round-to-nearest: (stored int8 integers, QuantInfo). Zeros (pruned weights) stay exactly 0."""
    info = QuantInfo(scheme, *group_grid(w, scheme, matrix))
    return info.ints(round_to_grid(w, info.expanded_scales(w.shape[1]), _zeros_or_none(info, w.shape[1]),
                                   scheme)), info


def _zeros_or_none(info: QuantInfo, in_features: int) -> torch.Tensor | None:
    return None if info.zeros is None else info.expanded_zeros(in_features)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] → uint8, two per byte (element 2k in the low nibble); odd length padded with 0."""
    flat = q.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_int4`: the first `n` int8 values (sign-extended nibbles)."""
    b = packed.to(torch.int16)
    nib = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:n]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)

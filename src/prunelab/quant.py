"""Symmetric integer quantization of weight matrices: the one definition every layer shares.

Pruning decides *which* weights survive; quantization decides how each survivor is stored.
Both are needed to beat a dense int8 engine on size and speed, and every stage must agree
bit for bit on what "int8" or "int4 with group size 128" means, so the arithmetic lives
here, below every package that uses it (pruning computes the integers, storage writes them,
the runtime's kernels read them).

A quantized matrix `W` of shape `(out, in)` is `q * s`, with

* `q` int8 integers, `0` exactly where the weight is pruned; `bits = 8` uses `[-127, 127]`,
  `bits = 4` uses `[-8, 7]` (two's-complement nibbles);
* `s` float32 scales of shape `(out, in // group_size)`: one per output row and group of
  `group_size` consecutive input columns (`group_size = None`: one per row, i.e. per
  output channel). `s = max|W_group| / qmax` with `qmax` 127 or 7 (an all-zero group gets
  scale 1, so nothing divides by zero).

The model keeps the dequantized float32 weights `q * s` so every evaluation runs on what is
stored; the integers come back exactly as `round(W / s)` because `|q| <= 127` is far inside
float32's 24-bit mantissa (see `QuantInfo.ints`).
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


@dataclass
class QuantInfo:
    """How one matrix was quantized: its scheme and its float32 scales `(out, groups)`."""

    scheme: QuantScheme
    scales: torch.Tensor

    def expanded_scales(self, in_features: int) -> torch.Tensor:
        """Scales broadcast to the matrix shape `(out, in)`."""
        g = in_features // self.scales.shape[1]
        return self.scales.repeat_interleave(g, dim=1)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """float32 weights `q * s` (exactly what the model holds)."""
        return q.to(torch.float32) * self.expanded_scales(q.shape[1])

    def ints(self, weight: torch.Tensor) -> torch.Tensor:
        """The integers back from the dequantized weights: exact for weights made by `dequantize`."""
        q = torch.round(weight.to(torch.float32) / self.expanded_scales(weight.shape[1]))
        return q.clamp_(self.scheme.qmin, self.scheme.qmax).to(torch.int8)


def group_scales(w: torch.Tensor, scheme: QuantScheme, matrix: str = "") -> torch.Tensor:
    """float32 scales `(out, groups)`: max |w| of each group over qmax (1 for an all-zero group)."""
    out, inp = w.shape
    n_groups, g = scheme.groups(inp, matrix)
    amax = w.detach().to(torch.float32).abs().reshape(out, n_groups, g).amax(dim=2)
    scales = amax / scheme.qmax
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest integers of `w` (`(out, in)` or a column block) on the given expanded scales."""
    q = torch.round(w.to(torch.float32) / scales)
    return q.clamp_(scheme.qmin, scheme.qmax).to(torch.int8)


def quantize_rtn(w: torch.Tensor, scheme: QuantScheme, matrix: str = "") -> tuple[torch.Tensor, QuantInfo]:
    """Round-to-nearest: (int8 integers, QuantInfo). Zeros (pruned weights) stay exactly 0."""
    info = QuantInfo(scheme, group_scales(w, scheme, matrix))
    return quantize_with_scales(w, info.expanded_scales(w.shape[1]), scheme), info


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


def block_scales(block: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """float32 scales `(out,)` of one group given as a column block `(out, g)`: the `group_scales`
    rule (max |w| over qmax, 1 for an all-zero row) for a group GPTQ opens mid-sweep."""
    scales = block.detach().to(torch.float32).abs().amax(dim=1) / scheme.qmax
    return torch.where(scales > 0, scales, torch.ones_like(scales))

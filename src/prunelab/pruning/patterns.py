"""Mask selection with exact counts: lowest-k over a tensor, per row, per N:M group.

Every selector returns a bool mask, True = kept, and prunes *exactly* the requested number of
entries. Ties (equal scores, common in quantized checkpoints) are broken by position: among
equal scores the earlier flat index is pruned first. That makes every method deterministic
and lets tests demand exact counts instead of "about s %".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from prunelab.errors import ConfigError


def target_count(sparsity: float, numel: int) -> int:
    """How many entries to prune: `round(s · numel)` with Python's rounding, as torch.nn.utils.prune does."""
    return int(round(float(sparsity) * int(numel)))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of `scores`' shape with exactly the `k` lowest entries pruned (ties: lower index first).

    Uses `kthvalue` for the threshold instead of a full argsort: O(n) memory beyond one copy,
    which matters for the global ranking over a whole model.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    thr = torch.kthvalue(flat, k).values
    prune = flat < thr
    need = k - int(prune.sum())
    if need > 0:
        ties = torch.nonzero(flat == thr, as_tuple=False).reshape(-1)[:need]
        prune[ties] = True
    return (~prune).reshape(scores.shape)


def _magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).float().abs().view(torch.int32)  # NaN sorts last, like kthvalue


@dataclass
class MagnitudeCut:
    """Where the k-th smallest |w| lies: prune bit patterns below `threshold`, plus the first
    `ties_left` entries equal to it (in tensor order, then flat index)."""

    threshold: int
    ties_left: int

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """The keep-mask of the next tensor in order (call once per tensor, in order)."""
        b = _magnitude_bits(t)
        prune = b < self.threshold
        if self.ties_left > 0:
            ties = torch.nonzero(b == self.threshold).reshape(-1)[: self.ties_left]
            prune[ties] = True
            self.ties_left -= ties.numel()
        return (~prune).reshape(t.shape)


def magnitude_cut(tensors: Callable[[], Iterable[torch.Tensor]], k: int) -> MagnitudeCut:
    """A radix select on the float32 bit patterns of |w| over every tensor `tensors()` yields.

    For non-negative floats the integer order of the bits is the numeric order: one pass
    histograms the high 16 bits, a second the low 16 bits inside the bucket holding rank k.
    `tensors` is called once per pass, so the tensors may be read from disk one at a time.
    """
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for t in tensors():
        high += torch.bincount(_magnitude_bits(t) >> 16, minlength=1 << 15)
    cum = torch.cumsum(high, 0)
    bucket = int(torch.searchsorted(cum, k))  # first bucket whose cumulative count reaches k
    rank = k - (int(cum[bucket - 1]) if bucket else 0)  # 1-based rank inside the bucket
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for t in tensors():
        b = _magnitude_bits(t)
        low += torch.bincount(b[(b >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    cum = torch.cumsum(low, 0)
    lo = int(torch.searchsorted(cum, rank))
    return MagnitudeCut((bucket << 16) | lo, rank - (int(cum[lo - 1]) if lo else 0))


def lowest_k_magnitude_masks(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks pruning the k smallest |w| over all `tensors` as if flattened and concatenated.

    Exactly `lowest_k_mask(cat(|w|), k)` split back per tensor (ties: earlier tensor, then earlier
    flat index, pruned first), but found by `magnitude_cut` and a third pass writing the masks.
    Extra memory is a few copies of the largest tensor, not of the whole model: concatenating
    SmolLM2's 106 M weights for `kthvalue` peaked at 2.5 GB.
    """
    n = sum(t.numel() for t in tensors)
    if k <= 0 or k >= n:
        return [torch.full_like(t, k <= 0, dtype=torch.bool) for t in tensors]
    cut = magnitude_cut(lambda: tensors, k)
    return [cut.keep(t) for t in tensors]


def rowwise_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune exactly `k` entries of a 2-D score matrix, spread as evenly as possible over rows.

    Each row prunes `k // rows` entries (its lowest, ties by column); the `k % rows` leftover
    prunes go to the rows whose next-lowest score is smallest (ties by row). This is Wanda's
    per-output comparison group, made exact at the matrix level.
    """
    rows, cols = scores.shape
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= rows * cols:
        return torch.zeros_like(scores, dtype=torch.bool)
    base, extra = divmod(k, rows)
    order = torch.sort(scores, dim=1, stable=True).indices
    per_row = torch.full((rows,), base, dtype=torch.long, device=scores.device)
    if extra:
        candidate = torch.gather(scores, 1, order[:, base : base + 1]).reshape(-1)
        winners = torch.sort(candidate, stable=True).indices[:extra]
        per_row[winners] += 1
    rank = torch.arange(cols, device=scores.device).unsqueeze(0).expand(rows, cols)
    prune_sorted = rank < per_row.unsqueeze(1)
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, ~prune_sorted)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the `n` lowest of every `m` consecutive entries along the last (input) dimension.

    If the input dimension is not a multiple of `m`, the trailing partial group of length r
    prunes `round(n · r / m)` entries (there is no group of `m` to respect there).
    """
    if not 0 < n < m:
        raise ConfigError(f"pattern {n}:{m}: need 0 < N < M")
    rows, cols = scores.shape
    full = (cols // m) * m
    mask = torch.ones_like(scores, dtype=torch.bool)
    if full:
        groups = scores[:, :full].reshape(rows, full // m, m)
        order = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
        gmask = torch.ones_like(groups, dtype=torch.bool)
        gmask.scatter_(-1, order, False)
        mask[:, :full] = gmask.reshape(rows, full)
    tail = cols - full
    if tail:
        kt = int(round(n * tail / m))
        if kt:
            order = torch.sort(scores[:, full:], dim=-1, stable=True).indices[:, :kt]
            tmask = torch.ones((rows, tail), dtype=torch.bool)
            tmask.scatter_(1, order, False)
            mask[:, full:] = tmask
    return mask


def nm_target_count(rows: int, cols: int, n: int, m: int) -> int:
    """Entries an N:M mask prunes in a (rows, cols) matrix (including a partial trailing group)."""
    full = cols // m
    tail = cols - full * m
    return rows * (full * n + int(round(n * tail / m)))


def select_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, *, rowwise: bool) -> torch.Tensor:
    """The method-independent last step: turn (out, in) scores into an exact keep-mask."""
    if nm is not None:
        return nm_mask(scores, *nm)
    k = target_count(sparsity, scores.numel())
    return rowwise_mask(scores, k) if rowwise else lowest_k_mask(scores, k)


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every full group of `m` consecutive inputs has at least `n` pruned entries."""
    rows, cols = mask.shape
    full = (cols // m) * m
    if not full:
        return True
    pruned = (~mask[:, :full]).reshape(rows, full // m, m).sum(-1)
    return bool((pruned >= n).all())


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the pruned entries of an (out, in) weight view in place (works through Conv1D's transpose)."""
    weight.masked_fill_(~mask, 0)

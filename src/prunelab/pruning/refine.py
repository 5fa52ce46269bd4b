"""Training-free mask refinement: swap one kept and one pruned weight per row when that lowers the row's error.

The layer error of a pruned weight Ŵ against the dense W is a sum over output rows,
e_r = (w − ŵ) H (w − ŵ)ᵀ with H = XᵀX/n, so rows can be improved independently (DSnoT,
SparseSwaps). A swap prunes a kept weight j (ŵ_j → 0) and restores a pruned weight i
(ŵ_i → w_i); with the residual r = w − ŵ and g = r H its change is exact and cheap:

    Δ = a_i + b_j + 2 δ_i δ_j H_ij,   a_i = 2 δ_i g_i + δ_i² H_ii,   b_j = 2 δ_j g_j + δ_j² H_jj,

where δ_i = −r_i and δ_j = ŵ_j. Per round and row, the `candidates` best restores (lowest a)
and the `candidates` best prunes (lowest b) are paired, the cross term added, and the best pair
applied only when Δ < 0 — so no row's error ever rises, and each row keeps its count. For an
N:M pattern every (i, j) pair inside each group of M inputs is evaluated instead, so every group
keeps its count and stays valid. After a swap g is updated by two rows of H (O(in) per row),
so a round costs O(out · in), not a matrix product.

Methods that reconstruct weights (sparsegpt, alps) pass the dense weight as `dense`: the swap
restores the dense value, and the weights are re-solved on the new support afterwards by
`pcg_on_support` (shared with alps): `refine_matrix` is that whole step for one matrix, and
`refine_pruned` runs it over a pruned model block by block (the engine's `--refine` step:
snapshot the dense weights with `dense_snapshot` before the method, then call it).
"""

from __future__ import annotations

import torch

from prunelab.models.types import LoadedModel, PrunableMatrix
from prunelab.pruning.sequential import ProgressFn, run_sequential
from prunelab.pruning.sparsegpt import HessianStats

INF = float("inf")


def row_errors(dense: torch.Tensor, weight: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row reconstruction error (w − ŵ) H (w − ŵ)ᵀ in float64: the quantity every layer solver minimises."""
    r = dense.double() - weight.double()
    return ((r @ H.double()) * r).sum(1)


def reconstruction_error(dense: torch.Tensor, weight: torch.Tensor, H: torch.Tensor) -> float:
    """‖WX − ŴX‖² / n = tr((W − Ŵ) H (W − Ŵ)ᵀ), summed over rows."""
    return float(row_errors(dense, weight, H).sum())


def pcg_on_support(
    target: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, X0: torch.Tensor, *, iters: int = 15,
    rtol: float = 1e-4,
) -> torch.Tensor:
    """argmin over X with X = 0 off `mask` of tr((target − X) H (target − X)ᵀ), every row at once, in H's dtype.

    Conjugate gradient on each row's kept coordinates, Jacobi-preconditioned by diag(H) and
    started from X0 (restricted to the mask): each iteration costs one (rows × in × in)
    product, and CG never raises the objective, so a good start (SparseGPT's or ADMM's
    weights) only gets better.
    """
    tiny = torch.finfo(H.dtype).tiny
    m = mask.to(H.dtype)
    X = X0.to(H.dtype) * m
    R = (target.to(H.dtype) - X) @ H * m  # minus half the gradient, on the support
    dinv = 1.0 / torch.diagonal(H).clamp_min(tiny)
    Z = R * dinv
    P = Z
    rz = (R * Z).sum(1)
    stop = rtol * R.norm(dim=1)
    for _ in range(max(0, iters)):
        AP = (P @ H) * m
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(tiny), torch.zeros_like(pap))
        X = X + alpha.unsqueeze(1) * P
        R = R - alpha.unsqueeze(1) * AP
        if bool((R.norm(dim=1) <= stop).all()):
            break
        Z = R * dinv
        rz_new = (R * Z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        P = Z + beta.unsqueeze(1) * P
        rz = rz_new
    return X


class _RowState:
    """Residual, its product with H and the current weights of the rows being refined (float64)."""

    def __init__(self, dense: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, H: torch.Tensor) -> None:
        self.H = H
        self.dense = dense
        self.w = weight * keep
        self.keep = keep.clone()
        self.r = dense - self.w
        self.g = self.r @ H
        self.hdiag = torch.diagonal(H)
        self._blocks: torch.Tensor | None = None

    def deltas(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For `rows`: (δ_i, a_i) restoring each pruned entry, (δ_j, b_j) pruning each kept one (inf elsewhere)."""
        g, keep = self.g[rows], self.keep[rows]
        d_in = -self.r[rows]
        a = 2 * d_in * g + d_in.pow(2) * self.hdiag
        d_out = self.w[rows]
        b = 2 * d_out * g + d_out.pow(2) * self.hdiag
        return d_in, a.masked_fill(keep, INF), d_out, b.masked_fill(~keep, INF)

    def nm_blocks(self, m: int) -> torch.Tensor:
        """The (groups, m, m) diagonal blocks of H (zero-padded past the last input), computed once."""
        if self._blocks is None:
            cols = self.H.shape[0]
            groups = -(-cols // m)
            pad = groups * m - cols
            blocks = torch.nn.functional.pad(self.H, (0, pad, 0, pad)).reshape(groups, m, groups, m)
            self._blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
        return self._blocks

    def errors(self, rows: torch.Tensor) -> torch.Tensor:
        return (self.r[rows] * self.g[rows]).sum(1)

    def apply(self, rows: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> None:
        """Restore column i and prune column j in each of `rows` (one pair per row)."""
        d_i = -self.r[rows, i]
        d_j = self.w[rows, j]
        self.g[rows] += d_i.unsqueeze(1) * self.H[i] + d_j.unsqueeze(1) * self.H[j]
        self.r[rows, i] = 0.0
        self.r[rows, j] = self.dense[rows, j]
        self.w[rows, i] = self.dense[rows, i]
        self.w[rows, j] = 0.0
        self.keep[rows, i] = True
        self.keep[rows, j] = False


Best = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _best_unstructured(st: _RowState, rows: torch.Tensor, candidates: int) -> Best:
    """Per row: the best (Δ, i, j) among the `candidates` × `candidates` most promising pairs."""
    d_in, a, d_out, b = st.deltas(rows)
    c = max(1, min(candidates, a.shape[1]))
    a_val, ii = torch.topk(a, c, dim=1, largest=False)
    b_val, jj = torch.topk(b, c, dim=1, largest=False)
    cross = st.H[ii.unsqueeze(2), jj.unsqueeze(1)]  # (rows, c, c)
    di = torch.gather(d_in, 1, ii).unsqueeze(2)
    dj = torch.gather(d_out, 1, jj).unsqueeze(1)
    delta = a_val.unsqueeze(2) + b_val.unsqueeze(1) + 2 * di * dj * cross
    delta = torch.nan_to_num(delta, nan=INF)  # inf - inf where a row has nothing to swap
    best, flat = delta.reshape(delta.shape[0], -1).min(dim=1)
    i = torch.gather(ii, 1, (flat // c).unsqueeze(1)).squeeze(1)
    j = torch.gather(jj, 1, (flat % c).unsqueeze(1)).squeeze(1)
    return best, i, j


def _best_nm(st: _RowState, rows: torch.Tensor, m: int) -> Best:
    """Per row: the best (Δ, i, j) with i and j in the same group of `m` consecutive inputs."""
    d_in, a, d_out, b = st.deltas(rows)
    rows, cols = a.shape
    groups = -(-cols // m)
    pad = groups * m - cols

    def grouped(t: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, pad), value=fill).reshape(rows, groups, m)

    hblk = st.nm_blocks(m)
    delta = (grouped(a, INF).unsqueeze(3) + grouped(b, INF).unsqueeze(2)
             + 2 * grouped(d_in, 0.0).unsqueeze(3) * grouped(d_out, 0.0).unsqueeze(2) * hblk)
    delta = torch.nan_to_num(delta, nan=INF)
    best, flat = delta.reshape(rows, -1).min(dim=1)
    g, rest = flat // (m * m), flat % (m * m)
    return best, g * m + rest // m, g * m + rest % m


def refine_rows(
    weight: torch.Tensor,
    H: torch.Tensor,
    keep_mask: torch.Tensor,
    nm: tuple[int, int] | None = None,
    *,
    max_swaps: int = 100,
    dense: torch.Tensor | None = None,
    candidates: int = 8,
    rtol: float = 1e-9,
) -> torch.Tensor:
    """A better keep-mask of the same per-row (and per-N:M-group) counts; never raises any row's error.

    `weight`: the (out, in) weights the mask applies to — the dense weights for prune-only
    methods (magnitude, wanda), or the reconstructed ones for sparsegpt/alps together with
    `dense`, the original weights the error is measured against. `max_swaps` bounds the swap
    rounds per row; a row stops as soon as no swap lowers its error by more than `rtol` of it.
    """
    W = weight.detach().double()
    target = W if dense is None else dense.detach().double()
    Hd = H.detach().double()
    st = _RowState(target, W, keep_mask.bool(), Hd)
    active = torch.arange(W.shape[0])
    for _ in range(max(0, int(max_swaps))):
        if active.numel() == 0:
            break
        best, i, j = _best_nm(st, active, nm[1]) if nm is not None else _best_unstructured(st, active, candidates)
        good = best < -rtol * st.errors(active).clamp_min(1e-300)
        if not bool(good.any()):
            break
        st.apply(active[good], i[good], j[good])
        active = active[good]
    return st.keep


def refine_matrix(
    dense: torch.Tensor,
    weight: torch.Tensor,
    H: torch.Tensor,
    keep_mask: torch.Tensor,
    nm: tuple[int, int] | None = None,
    *,
    reconstruct: bool,
    max_swaps: int = 100,
    percdamp: float = 0.01,
    pcg_iters: int = 15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix after any method: (new weight, new keep-mask) with the same counts and a lower error.

    Prune-only methods (`reconstruct=False`): swaps on the dense values, the weight is dense ⊙ mask.
    Reconstructing methods: swaps against the dense target from the method's weights, then the
    weights are re-solved on the new support (PCG, dampened H, from the swapped weights); if
    that is not better on the undamped H than the method's own result, the input is returned.
    """
    keep = keep_mask.bool()
    if not reconstruct:
        new = refine_rows(dense, H, keep, nm, max_swaps=max_swaps)
        return (dense * new).to(weight.dtype), new
    new = refine_rows(weight, H, keep, nm, max_swaps=max_swaps, dense=dense)
    start = torch.where(keep, weight.float(), dense.float()) * new
    Hd = H.double().clone()
    Hd.diagonal().add_(percdamp * float(torch.diagonal(H).double().mean()))
    solved = pcg_on_support(dense.float(), Hd.float(), new, start, iters=pcg_iters).float() * new
    before = reconstruction_error(dense, weight, H)
    if not torch.isfinite(solved).all() or reconstruction_error(dense, solved, H) > before:
        return weight, keep
    return solved.to(weight.dtype), new


def dense_snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """Float32 copies of every prunable weight (out, in), taken before a method zeroes them: refine's target."""
    return {m.name: m.weight(lm.model).detach().float().clone() for m in lm.prunable}


def refine_pruned(
    lm: LoadedModel,
    calib: list[dict[str, torch.Tensor]],
    dense: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    nm: tuple[int, int] | None,
    *,
    reconstruct: bool,
    max_swaps: int = 100,
    percdamp: float = 0.01,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
    """The refine step after any method, block by block: (new masks, {name: (error before, error after)}).

    A second sequential pass collects each linear's input Hessian (through the already-refined
    earlier linears, as the methods do) and replaces its weight and mask with `refine_matrix`'s;
    matrices outside the transformer blocks keep theirs. Per-row and per-N:M-group counts are
    unchanged, so exact counts and OWL's per-block sparsities still hold.
    """
    new_masks = dict(masks)
    errors: dict[str, tuple[float, float]] = {}

    def refine_one(m: PrunableMatrix, stats: HessianStats) -> None:
        w = m.weight(lm.model)
        H, target = stats.hessian(), dense[m.name]
        before = reconstruction_error(target, w.detach().float(), H)
        new_w, keep = refine_matrix(target, w.detach().float(), H, masks[m.name], nm, reconstruct=reconstruct,
                                    max_swaps=max_swaps, percdamp=percdamp)
        w.copy_(new_w.masked_fill(~keep, 0))
        new_masks[m.name] = keep
        errors[m.name] = (before, reconstruction_error(target, w.detach().float(), H))

    run_sequential(lm, calib, lambda m: HessianStats(m.in_features), refine_one, progress=progress)
    return new_masks, errors

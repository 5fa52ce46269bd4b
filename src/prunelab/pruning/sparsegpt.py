"""SparseGPT: one-shot pruning with OBS-style weight reconstruction (Frantar & Alistarh, 2023).

For each linear with calibration inputs X, minimise ‖WX − ŴX‖² under the sparsity constraint.
With H = XᵀX (+ dampening), columns are processed left to right in blocks of `blocksize`:
each pruned weight's error is pushed onto the not-yet-processed weights of its row through
the upper Cholesky factor of H⁻¹ (within the block immediately, to later blocks lazily in one
matrix product per block). The mask of each column block is chosen by w² / [H⁻¹]_jj², with
the per-block prune counts allocated so that the matrix hits round(s · numel) exactly; N:M
masks are chosen per group of M columns as the sweep reaches it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel, PrunableMatrix
from prunelab.pruning.layerwise import prune_layerwise
from prunelab.pruning.patterns import lowest_k_mask, nm_mask, target_count
from prunelab.pruning.registry import PruneWarning
from prunelab.pruning.sequential import ProgressFn
from prunelab.pruning.types import PruneConfig, PruningError
from prunelab.quant import QuantInfo, QuantScheme, block_grid, quantize_rtn, round_to_grid

DAMP_RETRIES = 4  # dampening ×10 up to this many times before giving up
FLOAT_PROPAGATION_BITS = (8,)  # quantized widths whose rounding later blocks do not see (prune_sparsegpt)
REFIT_SWEEPS = 2  # coordinate-descent sweeps over the group scales after the joint sweep (`refit_scales`)


@dataclass(frozen=True)
class SparseGPTOptions:
    """SparseGPT's own settings: the column block of the lazy update and the Hessian dampening."""

    blocksize: int = 128  # columns per lazily-updated block
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1 \
                or not isinstance(self.percdamp, (int, float)) or not self.percdamp > 0:
            raise ConfigError("sparsegpt needs blocksize ≥ 1 and percdamp > 0")


class HessianStats:
    """Accumulates XᵀX (float64) and the token count for one linear's input."""

    def __init__(self, in_features: int) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0
        self.hinv_cache: dict[float, torch.Tensor] = {}  # q/k/v share one input, hence one H⁻¹

    def add(self, x: torch.Tensor) -> None:
        xf = x.float()
        if self.H.device != x.device:  # the Hessian lives where the block runs (--device cuda)
            self.H = self.H.to(x.device)
        self.H += (xf.t() @ xf).double()
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.H / max(1, self.n)


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)⁻¹ with damp = percdamp × mean(diag H); raises on failure."""
    Hd = H.clone()
    Hd.diagonal().add_(percdamp * float(torch.diagonal(H).mean()))
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd  # each step frees the previous: four float64 n×n matrices at once would peak a large layer
    if int(info) != 0:
        raise torch.linalg.LinAlgError("H + damp·I is not positive definite")
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    del Hinv
    if int(info) != 0 or not torch.isfinite(U).all():
        raise torch.linalg.LinAlgError("inverse Hessian is not positive definite")
    return U


class _Quantizer:
    """GPTQ's column step for `_sweep`: a group's scales are set when the sweep reaches its first column,
    from the group's current (already updated) weights, known-pruned ones excluded; each kept weight is
    then rounded onto its group's grid, so the error fed back includes the rounding error.

    With pruning the fed-back errors are large and later weights of a wide group (int8: the whole
    row) grow past the group-start maximum and would clip; the scale is therefore widened to cover
    `ref`, the float reconstruction's final weights of that group (measured: int8 per-row GPTQ error
    5-20× lower than without it on 50-70 % sparse layers)."""

    def __init__(self, scheme: QuantScheme, ref: torch.Tensor) -> None:
        self.scheme = scheme
        self.ref = ref
        self.n_groups, self.g = scheme.groups(ref.shape[1])
        self.scales = torch.ones(ref.shape[0], self.n_groups, dtype=torch.float32)
        self.zeros = None if scheme.bits != 4 else torch.zeros(ref.shape[0], self.n_groups, dtype=torch.uint8)

    def column(self, c: int, w: torch.Tensor, ahead: torch.Tensor) -> torch.Tensor:
        """Dequantized column `c` (exactly `d * s` in float32); `ahead` = the group's columns from `c` on."""
        k = c // self.g
        if c % self.g == 0:  # the grid covers both the current weights and the reference's (a union of ranges)
            s, z = block_grid(torch.cat([ahead, self.ref[:, c:c + self.g]], dim=1), self.scheme)
            self.scales[:, k] = s
            if self.zeros is not None:
                self.zeros[:, k] = z
        return round_to_grid(w, self.scales[:, k], None if self.zeros is None else self.zeros[:, k], self.scheme)

    def info(self) -> QuantInfo:
        return QuantInfo(self.scheme, self.scales, self.zeros)


def _group_ahead(W: torch.Tensor, W1: torch.Tensor, mask1: torch.Tensor, i: int, i1: int, i2: int,
                 g: int, fixed: torch.Tensor | None) -> torch.Tensor:
    """Columns c .. c+g of the current weights (c = i1 + i): the block's updated ones (pruned entries
    of this block already zero) and, past the block, the lazily-updated rest (GPTQ reads them the same),
    there too without the weights a known support (`fixed`) prunes: a weight about to become 0 must not
    widen the grid of the kept ones (int8 per row: the group is the whole row, mostly past the block)."""
    inside = W1[:, i:i + g] * mask1[:, i:i + g]
    c = i1 + i
    if c + g <= i2:
        return inside
    rest = W[:, i2:c + g] if fixed is None else W[:, i2:c + g] * fixed[:, i2:c + g]
    return torch.cat([inside, rest], dim=1)


def _sweep(
    W: torch.Tensor, Hinv: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, blocksize: int,
    quant: _Quantizer | None = None, fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The column sweep: returns (updated weights with zeros, keep-mask).

    `fixed` (a keep-mask) replaces the mask selection (a GPTQ pass on a given support); `quant`
    rounds every kept weight onto its group's grid as the sweep reaches it (joint pruning and
    quantization: pruning and rounding errors are both compensated by the remaining columns).
    """
    W = W.clone()
    rows, cols = W.shape
    mask = torch.ones(rows, cols, dtype=torch.bool, device=W.device) if fixed is None else fixed.clone()
    if nm is not None and fixed is None:
        blocksize = max(nm[1], (blocksize // nm[1]) * nm[1])  # groups must not straddle blocks
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        if fixed is not None:
            mask1 = fixed[:, i1:i2]
        elif nm is None:
            kb = target_count(sparsity, rows * i2) - target_count(sparsity, rows * i1)
            mask1 = lowest_k_mask(W1.pow(2) / d.pow(2).unsqueeze(0), kb)
        else:
            mask1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(count):
            if fixed is None and nm is not None and i % nm[1] == 0:
                j = min(i + nm[1], count)
                mask1[:, i:j] = nm_mask(W1[:, i:j].pow(2) / d[i:j].pow(2).unsqueeze(0), *nm)
            w = W1[:, i]
            if quant is not None:
                ahead = _group_ahead(W, W1, mask1, i, i1, i2, quant.g, fixed) if (i1 + i) % quant.g == 0 else w
                w_kept = quant.column(i1 + i, w, ahead)
            else:
                w_kept = w
            q = torch.where(mask1[:, i], w_kept, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, mask


def _joint_sweep(
    W: torch.Tensor, U: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
    blocksize: int, scheme: QuantScheme, fixed: torch.Tensor | None, float_out: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, QuantInfo]:
    """Pruning and GPTQ in one sweep, each row kept from it or from round-to-nearest, whichever is better.

    1. The float reconstruction first (the plain sweep; with `fixed`, `W` on that support is taken as
       already reconstructed, e.g. alps' solution): its mask and its weights, the reference for the
       group scales (`_Quantizer`).
    2. The joint sweep from `W`: on the reference's mask for unstructured sparsity (so the exact
       per-matrix count stays the reference's), choosing N:M groups itself as it goes.
    3. Per row, the lower error tr((w − ŵ) H (w − ŵ)ᵀ) of the joint result and of round-to-nearest
       of the reference (rows are independent in the layer objective and every scale belongs to
       one row, so rows mix freely): joint quantization is never worse than pruning then rounding.
    4. The scales refitted to the chosen integers (`refit_scales`): only ever lowers each row's error.
    """
    if fixed is None:
        ref, ref_mask = _sweep(W, U, sparsity, nm, blocksize)
    else:
        ref, ref_mask = W * fixed, fixed
    if float_out is not None:
        float_out.update(weight=ref, mask=ref_mask)
    quantizer = _Quantizer(scheme, ref)
    support = fixed if fixed is not None else (ref_mask if nm is None else None)
    Q, mask = _sweep(W, U, sparsity, nm, blocksize, quantizer, support)
    q_rtn, rtn = quantize_rtn(ref, scheme)
    R = rtn.dequantize(q_rtn)
    Hd = H.double()

    def err(X: torch.Tensor) -> torch.Tensor:
        r = W.double() - X.double()
        return ((r @ Hd) * r).sum(1)

    joint = (err(Q) <= err(R)).unsqueeze(1)
    mine = quantizer.info()
    scales = torch.where(joint, mine.scales, rtn.scales)
    zeros = None if rtn.zeros is None or mine.zeros is None else torch.where(joint, mine.zeros, rtn.zeros)
    info = QuantInfo(scheme, scales, zeros)
    q = info.ints(torch.where(joint, Q, R))
    info = refit_scales(W, info.levels(q), info, Hd)  # same integers, better scales: on the grid still
    return info.dequantize(q), torch.where(joint, mask, ref_mask), info


def refit_scales(W: torch.Tensor, levels: torch.Tensor, info: QuantInfo, H: torch.Tensor,
                 sweeps: int = REFIT_SWEEPS) -> QuantInfo:
    """The group scales that minimise the layer error tr((w − d·s) H (w − d·s)ᵀ) for the chosen integer
    levels `d` (mask and levels fixed), by exact coordinate descent over each row's groups.

    GPTQ fixes a group's scale before its columns are rounded and compensated, so the scales it ends
    with are not the best ones for the levels it ends with; the error is a convex quadratic in each row's
    scales, and every coordinate step lowers it (measured on SmolLM2 layers at 2:4 + int4 g32: the
    quantization's share of the layer error 3-9x smaller). A scale only moves within (s/2, ∞), so it stays
    positive; the levels (and the int4 zero points) are untouched, so every weight stays on its grid.
    """
    n_groups = info.scales.shape[1]
    g = W.shape[1] // n_groups
    D = levels.double()
    s = info.scales.double().clone()
    R = W.double() - D * s.repeat_interleave(g, dim=1)
    HR = R @ H
    for _ in range(sweeps):
        for k in range(n_groups):
            cols = slice(k * g, (k + 1) * g)
            Dk = D[:, cols]
            den = ((Dk @ H[cols, cols]) * Dk).sum(1)
            delta = torch.where(den > 0, (Dk * HR[:, cols]).sum(1) / den.clamp(min=1e-300), torch.zeros_like(den))
            delta = torch.maximum(delta, -0.5 * s[:, k])
            s[:, k] += delta
            HR -= (delta.unsqueeze(1) * Dk) @ H[cols, :]
    scales = s.float()
    ok = torch.isfinite(scales) & (scales > 0)
    return QuantInfo(info.scheme, torch.where(ok, scales, info.scales), info.zeros)


def sparsegpt_matrix(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "matrix",
    hinv_cache: dict[float, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one (out, in) weight given its input Hessian H = XᵀX/n; returns (new weight, keep-mask).

    If the dampened Hessian is not positive definite or the result is not finite, the
    dampening is raised ×10 (up to `DAMP_RETRIES` times) with a `PruneWarning`; if it still
    fails, `PruningError`.
    """
    new, mask, _ = obs_solve(weight, H, sparsity, nm, blocksize=blocksize, percdamp=percdamp, name=name,
                             hinv_cache=hinv_cache)
    return new, mask


def obs_solve(
    weight: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, *,
    blocksize: int = 128, percdamp: float = 0.01, name: str = "matrix",
    hinv_cache: dict[float, torch.Tensor] | None = None, quant: QuantScheme | None = None,
    fixed: torch.Tensor | None = None, float_out: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, QuantInfo | None]:
    """`sparsegpt_matrix` with the joint options: `quant` rounds the kept weights in the sweep (GPTQ),
    `fixed` keeps a given support instead of choosing one; returns (weight, keep-mask, QuantInfo or None).

    With `quant` the weight comes back exactly as `QuantInfo.dequantize(ints)` (float32); see
    `_joint_sweep` for how (and why each row is never worse than round-to-nearest); `float_out` receives
    its float reconstruction (`weight`, `mask`).
    """
    W = weight.detach().float().clone()
    H = H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0  # inputs never active: any value reconstructs them; keep the weights
    cache = {} if hinv_cache is None else hinv_cache
    damp = percdamp
    for attempt in range(DAMP_RETRIES + 1):
        try:
            U = cache.get(damp)
            if U is None:
                U = cache[damp] = _inverse_cholesky(H, damp).float()
            if quant is None:
                Q, mask = _sweep(W, U, sparsity, nm, blocksize, None, fixed)
                info = None
            else:
                Q, mask, info = _joint_sweep(W, U, H, sparsity, nm, blocksize, quant, fixed, float_out)
            if not torch.isfinite(Q).all():
                raise torch.linalg.LinAlgError("non-finite weights after the update")
            if attempt:
                warnings.warn(
                    f"sparsegpt {name}: Hessian ill-conditioned; dampening raised from {percdamp:g} to {damp:g} "
                    "of the mean diagonal", PruneWarning, stacklevel=3,
                )
            return Q.to(weight.dtype), mask, info
        except torch.linalg.LinAlgError:
            damp *= 10
    raise PruningError(
        f"sparsegpt {name}: Hessian still singular with dampening {damp / 10:g}; use more/other calibration "
        "data (--calib, --nsamples) or --method wanda"
    )


def prune_sparsegpt(
    lm: LoadedModel, config: PruneConfig, calib: list[dict[str, torch.Tensor]] | None,
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """Sequential block-by-block SparseGPT (optionally with OWL block ratios).

    With int8 the later blocks calibrate on the *float* reconstruction and the quantized weights go in
    at the end (`FLOAT_PROPAGATION_BITS`): int8's rounding is far below what later blocks could
    compensate, and propagating it only reshuffled their masks (SmolLM2 70 %, ppl on the quantized
    model: 283.6 propagating int8, 258.8 not, vs 266.3 for the float model). int4 errors are
    large enough for the later blocks to absorb, so they propagate (2:4 g32: 109.0 vs 128.0 rounded).
    """
    scheme = config.joint_quant  # quantize in the sweep (GPTQ) unless a later step re-solves the weights
    deferred: dict[str, tuple[PrunableMatrix, torch.Tensor]] = {}  # name -> (matrix, integers)

    def solve(m: PrunableMatrix, w: torch.Tensor, stats: HessianStats, target: float) -> torch.Tensor:
        quant = config.quant_for(m.in_features, m.name) if scheme else None
        flt: dict[str, torch.Tensor] | None = {} if quant and quant.bits in FLOAT_PROPAGATION_BITS else None
        new, mask, info = obs_solve(
            w, stats.hessian(), target, config.nm,
            blocksize=config.options.blocksize, percdamp=config.options.percdamp, name=m.name,
            hinv_cache=stats.hinv_cache, quant=quant, float_out=flt,
        )
        if info is not None:
            lm.quant[m.name] = info
        if flt:
            deferred[m.name] = (m, info.ints(new))
            new, keep = flt["weight"].to(new.dtype), flt["mask"]
        else:
            keep = mask
        w.copy_(new)
        w.masked_fill_(~keep, 0)
        return mask

    masks = prune_layerwise(
        lm, config, calib, progress, method="sparsegpt", make_stats=lambda m: HessianStats(m.in_features), solve=solve
    )
    with torch.no_grad():
        for name, (m, q) in deferred.items():
            m.weight(lm.model).copy_(lm.quant[name].dequantize(q))
    return masks

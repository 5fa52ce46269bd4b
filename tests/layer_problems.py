"""One synthetic layer problem shared by the reconstruction tests (alps, joint quantization)."""

from __future__ import annotations

import torch


def correlated_problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian XᵀX/n of correlated inputs with uneven scales: the regime where
    reconstruction and error feedback matter (on white inputs every method looks alike)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / 10 + torch.eye(cols)
    scale = 0.2 + 2.8 * torch.rand(cols, generator=g)
    X = torch.randn(1024, cols, generator=g) @ mix * scale
    return torch.randn(rows, cols, generator=g), X.t() @ X / X.shape[0]

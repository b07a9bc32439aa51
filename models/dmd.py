"""Data-free distribution matching (paper Eq. 12; DMD, Yin et al. 2024; DMD2's implementation).

The generator sample x = z̃_0 = f_θ(ẑ_t, t, c) (ẑ_t from Eq. 9) is re-noised to x_τ; the
real score (teacher with CFG) and the fake score (a second LoRA adapter on the same UNet,
trained on detached student samples with the diffusion loss) each predict x̂_0. The KL
gradient w.r.t. x is approximated by their difference, normalised per sample:

    grad = (x̂_0^fake − x̂_0^real) / mean|x − x̂_0^real|

(DMD2: ``(p_real − p_fake) / mean|p_real|`` with ``p = x − x̂_0``), and applied through the
surrogate 0.5·‖x − nograd(x − grad)‖², whose gradient w.r.t. x is exactly ``grad``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(grad, fraction of non-finite entries replaced by 0)."""
    dims = tuple(range(1, x.ndim))
    grad = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=dims, keepdim=True)
    bad = ~torch.isfinite(grad)
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), float(bad.float().mean())


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·‖x − nograd(x − grad)‖² (mean over elements): ∂/∂x = grad / numel."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def fake_score_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The fake score's diffusion loss L_diff on detached student samples (ε-prediction MSE)."""
    return F.mse_loss(eps_pred, noise)

"""Discrete DDPM / DDIM math on the teacher's own ``alphas_cumprod`` (T = 1000).

Notation follows the TLCM paper (§3): ``z_t = sqrt(ᾱ_t) z_0 + sqrt(1 − ᾱ_t) ε`` (Eq. 1);
the ε-prediction network gives ``ẑ_0 = (z_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)`` and the DDIM
solver (Eq. 3, η = 0) moves to an earlier ``s`` with
``z_s = sqrt(ᾱ_s) ẑ_0 + sqrt(1 − ᾱ_s) ε̂``. ``t = -1`` stands for "clean" (ᾱ = 1), so a
jump "to 0" in the milestone sense lands on the data.
"""
from __future__ import annotations

import torch


def alphas_cumprod_scaled_linear(beta_start: float = 0.00085, beta_end: float = 0.012, T: int = 1000) -> torch.Tensor:
    """ᾱ_t for SD/SDXL's ``scaled_linear`` betas: β_t linear in sqrt-space; float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """ᾱ_t with ᾱ_{-1} = 1 (the clean end), as float32 of t's shape."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    ac = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod])
    return ac[(t + 1).long()].float()


def _bc(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.to(x.device).reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion, Eq. 1: z_t = sqrt(ᾱ_t) z_0 + sqrt(1 − ᾱ_t) ε."""
    a = _bc(alpha_bar(alphas_cumprod, t), z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ẑ_0 = (z_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)."""
    a = _bc(alpha_bar(alphas_cumprod, t), z_t)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_step(z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, s: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Eq. 3, η = 0) from t to s < t; s = -1 returns ẑ_0."""
    x0 = x0_from_eps(z_t, eps, t, alphas_cumprod)
    a_s = _bc(alpha_bar(alphas_cumprod, s), z_t)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: ε̃ = ε_u + w (ε_c − ε_u) (w = 1: conditional only)."""
    return eps_uncond + w * (eps_cond - eps_uncond)

"""Samplers over a :class:`models.denoiser.Denoiser` (no I/O)."""
from __future__ import annotations

import torch

from models.denoiser import Cond, Denoiser
from models.diffusion import ddim_step


def trailing_timesteps(n: int, T: int = 1000) -> list[int]:
    """``n`` DDIM timesteps with diffusers' "trailing" spacing, starting at T − 1:
    2 → [999, 499], 4 → [999, 749, 499, 249]. ("leading" spacing would start the
    2-step sampler at t = 501, an unfair few-step baseline.)"""
    return [int(round(T - i * T / n)) - 1 for i in range(n)]


@torch.no_grad()
def sample_ddim(model: Denoiser, cond: Cond, timesteps: list[int], w: float, z_T: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Eq. 3) with CFG weight ``w`` along ``timesteps``, ending at ẑ_0."""
    z = z_T
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = model.eps_cfg(z, torch.tensor(t), cond, w)
        z = ddim_step(z, eps, torch.tensor(t), torch.tensor(s), model.alphas_cumprod)
    return z


def unet_evals(steps: int, w: float) -> int:
    """UNet evaluations per image: two per step under CFG (w ≠ 1), one otherwise."""
    return steps * (1 if w == 1.0 else 2)


@torch.no_grad()
def sample_with_scheduler(model: Denoiser, cond: Cond, scheduler, steps: int, z_T: torch.Tensor, w: float = 1.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """The diffusers pipeline's denoising loop with any scheduler (TLCMScheduler, LCMScheduler, ...)."""
    scheduler.set_timesteps(steps, device=z_T.device)
    z = z_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model.eps_cfg(scheduler.scale_model_input(z, t), t, cond, w)
        z = scheduler.step(eps, t, z, generator=generator, return_dict=False)[0]
    return z

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


# ---- the training-free few-step samplers a user would try before distilling (benchmark baselines) ----
BASELINE_SAMPLERS: dict[str, str] = {
    "tlcm": "TLCM re-noising sampler",
    "dpmpp_2m": "DPM-Solver++ (2M)",
    "euler_a": "Euler ancestral",
    "ddim": "DDIM",
}


def baseline_scheduler(name: str, config):
    """The diffusers scheduler of a training-free baseline, from the teacher's scheduler config, set up as a
    careful user would for few steps: "trailing" timesteps (the first step at t = T − 1), x̂_0 at the end."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    from models.scheduler import TLCMScheduler

    if name == "tlcm":
        return TLCMScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing", final_sigmas_type="zero")
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    raise ValueError(f"unknown baseline sampler '{name}' (known: {', '.join(BASELINE_SAMPLERS)})")

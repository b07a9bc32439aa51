"""``TLCMScheduler``: n-step sampling (2..8) on TLCM's segment milestones, as a diffusers scheduler.

Use it in any diffusers pipeline with the TLCM LoRA loaded and CFG off::

    pipe.scheduler = TLCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights("artifacts/lora")
    image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images[0]

Timesteps (the official TLCM inference code's table over ``linspace(999, 0, 9)``):

====  =========================================
 n    timesteps
====  =========================================
 1    999
 2    999, 499
 3    999, 499, 124
 4    999, 749, 499, 124
 5    999, 749, 499, 249, 124
 6    999, 749, 499, 374, 249, 124
 7    999, 749, 624, 499, 374, 249, 124
 8    999, 874, 749, 624, 499, 374, 249, 124
====  =========================================

Each step predicts x̂_0 from ε̂ and moves to the next timestep. ``renoise="fresh"`` (default,
as the official inference) re-noises x̂_0 with new Gaussian noise; ``renoise="ddim"`` uses the
predicted ε̂ (deterministic DDIM jump, g_θ's own form). The last step returns x̂_0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from models.diffusion import alphas_cumprod_scaled_linear

# indices into linspace(T-1, 0, M+1) for n = 1..8 steps (the last index, t = 0, ends the chain)
_OFFICIAL_TABLE: dict[int, tuple[int, ...]] = {
    1: (0,), 2: (0, 4), 3: (0, 4, 7), 4: (0, 2, 4, 7), 5: (0, 2, 4, 6, 7),
    6: (0, 2, 4, 5, 6, 7), 7: (0, 2, 3, 4, 5, 6, 7), 8: (0, 1, 2, 3, 4, 5, 6, 7),
}


def tlcm_timesteps(n: int, M: int = 8, T: int = 1000) -> list[int]:
    """The n-step timesteps on the M = 8 milestones (table in the module docstring)."""
    if M != 8 or n not in _OFFICIAL_TABLE:
        raise ValueError(f"TLCM sampling supports 1..8 steps on M = 8 segments (got n={n}, M={M})")
    grid = torch.linspace(T - 1, 0, M + 1).to(torch.int64).tolist()
    return [grid[i] for i in _OFFICIAL_TABLE[n]]


@dataclass
class TLCMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    denoised: torch.Tensor


class TLCMScheduler(SchedulerMixin, ConfigMixin):
    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", num_segments: int = 8, renoise: str = "fresh",
                 prediction_type: str = "epsilon", **kwargs):
        if beta_schedule != "scaled_linear" or prediction_type != "epsilon":
            raise ValueError("TLCMScheduler supports SD/SDXL's scaled_linear ε-prediction models")
        if renoise not in ("fresh", "ddim"):
            raise ValueError("renoise must be 'fresh' or 'ddim'")
        self.alphas_cumprod = alphas_cumprod_scaled_linear(beta_start, beta_end, num_train_timesteps).float()
        self.init_noise_sigma = 1.0
        self.timesteps = torch.tensor(tlcm_timesteps(num_segments, num_segments, num_train_timesteps))
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **kwargs) -> None:
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(
            tlcm_timesteps(num_inference_steps, self.config.num_segments, self.config.num_train_timesteps), device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _next_t(self, timestep: int) -> int | None:
        ts = self.timesteps.tolist()
        i = ts.index(int(timestep))
        return ts[i + 1] if i + 1 < len(ts) else None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = True):
        t = int(timestep)
        ac = self.alphas_cumprod.to(sample.device)
        a_t = ac[t]
        denoised = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
        nxt = self._next_t(t)
        if nxt is None:
            prev = denoised
        else:
            a_n = ac[nxt]
            noise = model_output if self.config.renoise == "ddim" else randn_tensor(
                sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = a_n.sqrt() * denoised + (1 - a_n).sqrt() * noise
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev, denoised)
        return TLCMSchedulerOutput(prev_sample=prev, denoised=denoised)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(original.device)[timesteps.long()].view(-1, *([1] * (original.ndim - 1)))
        return (a.sqrt() * original + (1 - a).sqrt() * noise).to(original.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

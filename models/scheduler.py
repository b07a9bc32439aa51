"""``TLCMScheduler``: n-step sampling (1..8) on TLCM's segment milestones, as a diffusers scheduler.

Use it in any diffusers pipeline with the TLCM LoRA loaded and CFG off (the example runs in the
tests against the smoke artifacts; ``teacher`` and ``lora`` are the teacher and LoRA folders)::

    from diffusers import StableDiffusionXLPipeline
    from models.scheduler import TLCMScheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    pipe.load_lora_weights(lora)
    pipe.scheduler = TLCMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a red circle left of a blue square on a white background", num_inference_steps=4,
                 guidance_scale=1.0).images[0]

Timesteps (the official TLCM inference code's table over ``linspace(T - 1, 0, M + 1)``, M = 8):

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

For other ``num_segments`` M, n steps take every (M / n)-th milestone from the top. A pipeline's
``timesteps=[...]`` argument (``set_timesteps(timesteps=...)``) replaces the table with any strictly
descending list in [0, T). Each step predicts x̂_0 and moves to the next timestep: ``renoise="fresh"``
(default, as the official inference) re-noises x̂_0 with new Gaussian noise (Eq. 1),
``renoise="ddim"`` with the predicted ε̂ (the deterministic DDIM jump of Eq. 3, g_θ's own form).
The last step returns x̂_0. img2img/inpainting pipelines start part-way with ``set_begin_index``.
Model outputs: ``prediction_type`` ``epsilon`` (SD/SDXL), ``v_prediction`` or ``sample``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# indices into linspace(T-1, 0, M+1) for n = 1..8 steps on M = 8 milestones (the official inference table)
_OFFICIAL_TABLE: dict[int, tuple[int, ...]] = {
    1: (0,), 2: (0, 4), 3: (0, 4, 7), 4: (0, 2, 4, 7), 5: (0, 2, 4, 6, 7),
    6: (0, 2, 4, 5, 6, 7), 7: (0, 2, 3, 4, 5, 6, 7), 8: (0, 1, 2, 3, 4, 5, 6, 7),
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def tlcm_timesteps(n: int, M: int = 8, T: int = 1000) -> list[int]:
    """The n-step timesteps on the M milestones ``linspace(T − 1, 0, M + 1)`` (table in the module docstring)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= M:
        raise ValueError(f"TLCMScheduler samples in 1..{M} steps on its M = {M} segment milestones (got "
                         f"num_inference_steps={n!r}); for another schedule pass timesteps=[...] instead")
    grid = torch.linspace(T - 1, 0, M + 1).to(torch.int64).tolist()
    idx = _OFFICIAL_TABLE[int(n)] if M == 8 else tuple(int(i * M // n) for i in range(int(n)))
    return [grid[i] for i in idx]


def betas_for(schedule: str, T: int, beta_start: float, beta_end: float, trained_betas=None) -> torch.Tensor:
    """β_1..β_T in float32, computed as diffusers' DDPM-family schedulers compute them."""
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":  # SD/SDXL: linear in sqrt-space
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":  # the cosine schedule
        return betas_for_alpha_bar(T)
    raise ValueError(f"beta_schedule '{schedule}' is not supported (linear, scaled_linear, squaredcos_cap_v2, "
                     "or pass trained_betas)")


def x0_and_eps(model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor, prediction_type: str):
    """(x̂_0, ε̂) from the model output at ᾱ_t: ε-, v- or x_0-prediction (z_t = √ᾱ x_0 + √(1−ᾱ) ε)."""
    s, r = a_t.sqrt(), (1 - a_t).sqrt()
    if prediction_type == "epsilon":
        return (sample - r * model_output) / s, model_output
    if prediction_type == "v_prediction":
        return s * sample - r * model_output, s * model_output + r * sample
    return model_output, (sample - s * model_output) / r


@dataclass
class TLCMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    denoised: torch.Tensor


class TLCMScheduler(SchedulerMixin, ConfigMixin):
    """Few-step TLCM sampling (see the module docstring). Config keys of the other DDPM-family
    schedulers it is compatible with (``_compatibles``) are kept as hidden config, so a pipeline's
    scheduler converts to TLCM and back without loss."""

    _compatibles = ["LCMScheduler", "TCDScheduler", "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                    "UniPCMultistepScheduler", "PNDMScheduler", "HeunDiscreteScheduler", "DEISMultistepScheduler",
                    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: np.ndarray | list[float] | None = None,
                 num_segments: int = 8, renoise: str = "fresh", prediction_type: str = "epsilon"):
        if renoise not in ("fresh", "ddim"):
            raise ValueError(f"renoise must be 'fresh' or 'ddim' (got {renoise!r})")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (got {prediction_type!r})")
        self.betas = betas_for(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.tensor(tlcm_timesteps(num_segments, num_segments, num_train_timesteps))
        self._step_index = None
        self._begin_index = None

    # ---- the schedule ---------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """The n-step TLCM table, or a custom strictly descending ``timesteps`` list (exactly one of the two)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        T = self.config.num_train_timesteps
        if timesteps is None:
            ts = tlcm_timesteps(num_inference_steps, self.config.num_segments, T)
            self.custom_timesteps = False
        else:
            ts = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
            if not ts or any(not 0 <= t < T for t in ts):
                raise ValueError(f"custom timesteps must be a non-empty list in [0, {T}) (got {ts})")
            if any(b >= a for a, b in zip(ts, ts[1:])):
                raise ValueError(f"custom timesteps must be strictly descending (got {ts})")
            self.custom_timesteps = True
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        """Index of the next timestep :meth:`step` takes (None until the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index of the schedule, set by img2img/inpainting pipelines through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        ts = self.timesteps if schedule_timesteps is None else schedule_timesteps
        hits = (ts == torch.as_tensor(timestep, device=ts.device)).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {int(timestep)} is not in this scheduler's timesteps {ts.tolist()}; "
                             "call set_timesteps first (or pass timesteps=[...])")
        return int(hits[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def previous_timestep(self, timestep) -> torch.Tensor:
        """The timestep after ``timestep`` in the schedule (−1 after the last one)."""
        i = self.index_for_timestep(timestep) + 1
        return self.timesteps[i] if i < len(self.timesteps) else torch.tensor(-1)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # ---- one step -------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True) -> TLCMSchedulerOutput | tuple:
        """x̂_0 at ``timestep``, then z at the next timestep: √ᾱ' x̂_0 + √(1−ᾱ') n, n fresh noise (default)
        or ε̂ (``renoise="ddim"``); the last step returns x̂_0."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        ac = self.alphas_cumprod.to(sample.device)
        t = int(self.timesteps[i])
        denoised, eps = x0_and_eps(model_output, sample, ac[t], self.config.prediction_type)
        if i + 1 < len(self.timesteps):
            a_n = ac[int(self.timesteps[i + 1])]
            noise = eps if self.config.renoise == "ddim" else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=denoised.dtype)
            prev = a_n.sqrt() * denoised + (1 - a_n).sqrt() * noise
        else:
            prev = denoised
        self._step_index = i + 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev, denoised)
        return TLCMSchedulerOutput(prev_sample=prev, denoised=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion (Eq. 1): √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
        ac = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        a = ac[timesteps.to(original_samples.device).long()].view(-1, *([1] * (original_samples.ndim - 1)))
        return a.sqrt() * original_samples + (1 - a).sqrt() * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (the v-prediction target)."""
        ac = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        a = ac[timesteps.to(sample.device).long()].view(-1, *([1] * (sample.ndim - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

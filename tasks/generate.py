"""Sampling images for prompts: shared by `tlcm generate` and the `evaluate` stage."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.denoiser import Denoiser, encode_prompts
from models.sampling import sample_ddim, sample_with_scheduler, trailing_timesteps, unet_evals
from tlcm.report.grids import save_grid
from tlcm.loaders.lora_io import resolve_lora
from tlcm.core.params import T_TRAIN, TLCM_MAX_STEPS, Params, ParamsError
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import decode_latents, frozen_dtype, load_for_sampling, resolve_teacher


@dataclass
class Samples:
    images: np.ndarray  # uint8 (N, H, W, 3)
    seconds_per_image: float
    unet_evals_per_image: int


def initial_noise(n: int, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """z_T for image i depends only on (seed, i), not on batching or device: drawn on the CPU, then moved."""
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + i)) for i in range(n)])
    return z.to(device)


def decode(pipe, z0: torch.Tensor) -> np.ndarray:
    x = decode_latents(pipe.vae, z0)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def model_and_noise(pipe, n: int, seed: int) -> tuple[Denoiser, torch.Tensor]:
    """The UNet as a Denoiser and every prompt's z_T, both on the UNet's device."""
    dev = pipe.unet.device
    side = pipe.unet.config.sample_size
    return (Denoiser(pipe.unet, pipe.scheduler.alphas_cumprod.to(dev)),
            initial_noise(n, (pipe.unet.config.in_channels, side, side), seed, dev))


@torch.no_grad()
def teacher_ddim(pipe, prompts: list[str], steps: int, w: float, seed: int, batch_size: int) -> Samples:
    """Teacher DDIM with CFG (trailing timesteps), text encoding and VAE decoding included in the timing."""
    model, z_T = model_and_noise(pipe, len(prompts), seed)
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        cond = encode_prompts(pipe, prompts[i:i + batch_size])
        z0 = sample_ddim(model, cond, trailing_timesteps(steps), w, z_T[i:i + batch_size])
        out.append(decode(pipe, z0))
    dt = time.perf_counter() - t0
    return Samples(np.concatenate(out), dt / len(prompts), unet_evals(steps, w))


@torch.no_grad()
def student_samples(pipe, prompts: list[str], steps: int, seed: int, batch_size: int, scheduler,
                    guidance: float = 1.0) -> Samples:
    """Few-step samples of ``pipe.unet`` as it is (LoRA loaded or fused, or the bare teacher for the
    training-free baselines) with ``scheduler``; CFG weight ``guidance`` (1 = off, the students' setting).
    The re-noising draws come from a CPU generator (identical on every device) and are moved to the UNet's."""
    model, z_T = model_and_noise(pipe, len(prompts), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        cond = encode_prompts(pipe, prompts[i:i + batch_size])
        z0 = sample_with_scheduler(model, cond, scheduler, steps, z_T[i:i + batch_size], guidance, gen)
        out.append(decode(pipe, z0))
    dt = time.perf_counter() - t0
    return Samples(np.concatenate(out), dt / len(prompts), unet_evals(steps, guidance))


def load_student_pipe(teacher: str, lora: str | Path, scheduler: str = "tlcm", dtype: torch.dtype = torch.float32,
                      device: torch.device | None = None):
    """The user's way to sample a TLCM LoRA: teacher + ``load_lora_weights`` + ``fuse_lora`` + TLCMScheduler,
    on ``device`` (default: the process's) with the teacher's weights in ``dtype`` (``teacher.dtype``)."""
    from diffusers import LCMScheduler

    from models.scheduler import TLCMScheduler
    from tlcm.core.storage import ArtifactError

    folder = resolve_lora(str(lora))
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise ArtifactError(f"LoRA not found: no pytorch_lora_weights.safetensors in {folder}")
    pipe = load_for_sampling(teacher, dtype, device)
    pipe.load_lora_weights(folder)
    pipe.fuse_lora()
    pipe.scheduler = (LCMScheduler if scheduler == "lcm" else TLCMScheduler).from_config(pipe.scheduler.config)
    return pipe


def check_steps(steps: int, student: bool) -> None:
    """Refuse, before loading anything, a step count the sampler does not support."""
    if student and not 1 <= steps <= TLCM_MAX_STEPS:
        raise ParamsError(f"--steps {steps}: a TLCM LoRA samples 1..{TLCM_MAX_STEPS} steps (TLCMScheduler on the 8 "
                          f"segment milestones); give --steps between 1 and {TLCM_MAX_STEPS}")
    if not student and not 1 <= steps <= T_TRAIN:
        raise ParamsError(f"--steps {steps}: teacher DDIM samples 1..{T_TRAIN} steps; give --steps between 1 and {T_TRAIN}")


def generate(params: Params, paths: Paths, prompts: list[str], steps: int, guidance: float | None, seed: int,
             teacher: str | None, out: Path, lora: str | None = None) -> Path:
    """Teacher DDIM + CFG, or with ``lora`` the few-step student (TLCMScheduler, CFG off); a PNG grid."""
    check_steps(steps, lora is not None)
    source = teacher or resolve_teacher(params.teacher.source, paths.teacher)
    if lora is not None:
        pipe = load_student_pipe(source, lora, dtype=frozen_dtype(params.teacher))
        s = student_samples(pipe, prompts, steps, seed, params.evaluate.batch_size, pipe.scheduler)
        return save_grid([(f"TLCM {steps} steps", s.images)], out)
    pipe = load_for_sampling(source, frozen_dtype(params.teacher))
    w = params.evaluate.guidance_scale if guidance is None else guidance
    s = teacher_ddim(pipe, prompts, steps, w, seed, params.evaluate.batch_size)
    return save_grid([(f"teacher {steps} steps w={w}", s.images)], out)

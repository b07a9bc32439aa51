"""Throughput and memory estimated from the measured networks and the counted calls: FLOPs per iteration and
A100-hours at an assumed MFU, bytes per GPU (frozen weights, LoRA + AdamW state, activations and transients per
sample, the teacher buffer), the largest batch that fits, and a DMD2-style layout for comparison."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tools.plan.counts import StageRecipe, unet_forward_equivalents
from tools.plan.meters import CallCost
from tools.plan.networks import NetCosts

GiB = 2**30
A100_BF16_PEAK_FLOPS = 312e12  # dense bf16 tensor-core peak (NVIDIA A100 datasheet)
A100_MEMORY_BYTES = 80 * GiB  # "80 GB" A100: 81,920 MiB
PAPER_A100_HOURS = 70.0  # TLCM paper: ~70 A100-hours for the whole SDXL recipe


# ---- throughput -----------------------------------------------------------------------------------------------------

def encoder_fraction(n: NetCosts) -> float:
    return n.unet.encoder_nograd_flops / n.unet.teacher.fwd_flops


def sample_flops(n: NetCosts, r: StageRecipe, measured_backward: bool = False) -> float:
    """FLOPs per sample per iteration. Backward = 2 × forward by convention, or the measured backward (frozen base:
    only input-gradients through the base layers, weight-gradients for the LoRA)."""
    e, u = r.evals, n.unet
    rank, fake_rank = r.trainable_ranks[0], r.trainable_ranks[-1]
    f_student, f_fake = u.student_fwd_flops(rank), u.student_fwd_flops(fake_rank)

    def fb(fwd: float, bwd: float) -> float:
        return fwd + (bwd if measured_backward else 2 * fwd)

    student_bwd = u.student.bwd_flops  # measured at u.rank; the rank's share of the backward is small
    return (e.teacher * u.teacher.fwd_flops + e.student * f_student + e.fake * f_fake
            + e.student_grad * fb(f_student, student_bwd) + e.fake_grad * fb(f_fake, student_bwd)
            + e.encoder * u.encoder_nograd_flops + e.encoder_grad * fb(u.encoder.fwd_flops, u.encoder.bwd_flops)
            + e.lpips * fb(n.lpips.fwd_flops, n.lpips.bwd_flops) + e.text * n.text_flops
            + e.vae_decode_grad * fb(n.vae_decode.fwd_flops, n.vae_decode.bwd_flops)
            + e.scorer_grad * fb(n.scorer.fwd_flops, n.scorer.bwd_flops))


def recompute_flops(n: NetCosts, r: StageRecipe) -> float:
    """Extra FLOPs per sample per iteration with gradient checkpointing: one more forward of every checkpointed
    grad-carrying call (student, fake score, encoder, VAE decoder; the scorer and LPIPS are not checkpointed)."""
    e, u = r.evals, n.unet
    return (e.student_grad * u.student_fwd_flops(r.trainable_ranks[0])
            + e.fake_grad * u.student_fwd_flops(r.trainable_ranks[-1])
            + e.encoder_grad * u.encoder.fwd_flops + e.vae_decode_grad * n.vae_decode.fwd_flops)


def a100_hours(flops: float, mfu: float) -> float:
    """Hours of one A100 at ``mfu`` × the dense bf16 peak."""
    return flops / (A100_BF16_PEAK_FLOPS * mfu) / 3600


@dataclass(frozen=True)
class Throughput:
    stage: str
    iterations: int
    batch_size: int
    unet_fwd_equivalents: float  # per sample per iteration
    flops_per_iteration: float
    flops_per_iteration_measured_bwd: float
    recompute_per_iteration: float  # extra with gradient checkpointing
    in_paper: bool

    @property
    def total_flops(self) -> float:
        return self.flops_per_iteration * self.iterations


def throughput(n: NetCosts, recipe: list[StageRecipe]) -> list[Throughput]:
    frac = encoder_fraction(n)
    return [Throughput(r.stage, r.iterations, r.batch_size, unet_forward_equivalents(r.evals, frac),
                       r.batch_size * sample_flops(n, r), r.batch_size * sample_flops(n, r, measured_backward=True),
                       r.batch_size * recompute_flops(n, r), r.in_paper) for r in recipe]


def implied_mfu(total_flops: float, hours: float = PAPER_A100_HOURS) -> float:
    """The MFU at which ``total_flops`` take ``hours`` A100-hours."""
    return total_flops / (hours * 3600 * A100_BF16_PEAK_FLOPS)


# ---- memory ---------------------------------------------------------------------------------------------------------

ADAMW_BYTES_PER_PARAM = 16  # fp32 master weight + fp32 grad + AdamW exp_avg + exp_avg_sq


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryPlan:
    """One stage on one GPU: bytes that do not scale with the batch, and bytes per sample (estimated from the
    measured counts)."""
    stage: str
    frozen_bytes: int  # frozen weights in the compute dtype
    trainable_bytes: int  # trainable params with fp32 master copy, grads and AdamW states
    activation_bytes: int  # per sample: saved for backward by every grad-carrying call alive at the peak
    transient_bytes: int  # per sample: the largest short-lived working set (no-grad solver call, recompute)
    checkpointing: bool
    buffer_bytes: int = 0  # the teacher buffer's states (float32 latents)

    @property
    def fixed_bytes(self) -> int:
        return self.frozen_bytes + self.trainable_bytes + self.buffer_bytes

    @property
    def per_sample_bytes(self) -> int:
        return self.activation_bytes + self.transient_bytes

    def total_bytes(self, batch: int) -> int:
        return self.fixed_bytes + batch * self.per_sample_bytes

    def max_batch(self, budget_bytes: float) -> int:
        """Largest per-GPU batch with ``total_bytes(batch) <= budget_bytes`` (0: not even one sample fits)."""
        return max(0, int((budget_bytes - self.fixed_bytes) // self.per_sample_bytes))


def memory_plan(n: NetCosts, r: StageRecipe, checkpointing: bool) -> MemoryPlan:
    """Frozen: one UNet (teacher, student and fake score are adapters on it), both text encoders, the latent LPIPS;
    for `mps` also the VAE and the scorer. Trainable: every LoRA in ``r.trainable_ranks`` (+ the discriminator head).
    Activations per sample: the student's grad forward (+ the encoder's in dmgan's generator step, + VAE decode and
    two scorer calls in mps) + LPIPS. Transient per sample: the biggest of a CFG solver call (2 × the no-grad peak),
    the largest recomputed segment (with checkpointing), the VAE decoder's no-grad peak (mps)."""
    e, u, b = r.evals, n.unet, dtype_bytes(n.dtype)
    frozen = (u.params + sum(n.text_params) + n.lpips_params) * b
    if e.vae_decode_grad:
        frozen += (n.vae_params + n.scorer_params) * b
    trainable = sum(u.lora_params(k) for k in r.trainable_ranks) * ADAMW_BYTES_PER_PARAM
    trainable += n.head_params * ADAMW_BYTES_PER_PARAM if r.trains_head else 0

    def saved(c: CallCost) -> int:
        return c.saved_bytes_ckpt if checkpointing else c.saved_bytes

    act = saved(u.student) + (saved(u.encoder) if e.encoder_grad else 0) + (n.lpips.saved_bytes if e.lpips else 0)
    if e.vae_decode_grad:
        act += saved(n.vae_decode) + int(e.scorer_grad) * saved(n.scorer)
    transient = [2 * u.teacher.peak_nograd_bytes]  # a CFG solver call runs the UNet on [uncond, cond]: 2× the batch
    if checkpointing:
        transient += [u.student.segment_bytes] + ([n.vae_decode.segment_bytes] if e.vae_decode_grad else [])
    if e.vae_decode_grad:
        transient.append(n.vae_decode_nograd_peak)
    latent = 4 * n.latent_numel  # the buffer keeps float32 latents
    return MemoryPlan(r.stage, frozen, trainable, act, max(transient), checkpointing, r.buffer_latents * latent)


def dmd2_layout_bytes(n: NetCosts) -> dict[str, int]:
    """DMD2's layout (Yin et al. 2024): a frozen real-score UNet + a fully trainable fake-score UNet + a fully
    trainable generator UNet, each trainable copy with fp32 weights, grads and AdamW states; plus the text encoders."""
    u, b = n.unet.params, dtype_bytes(n.dtype)
    return {"real score (frozen)": u * b, "fake score (trainable)": u * ADAMW_BYTES_PER_PARAM,
            "generator (trainable)": u * ADAMW_BYTES_PER_PARAM, "text encoders (frozen)": sum(n.text_params) * b}

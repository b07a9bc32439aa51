"""The sections of the distillation stages: where their prompts come from, the consistency
stages (``mlcd``/``lcm_baseline``, ``ilcd``: a shared base and each one's own keys) and the techniques on top (``mps``, ``dmgan``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tlcm.core.params.core import T_TRAIN, Section


class PromptsParams(Section):
    """Where the data-free stages get their prompts (the only training data TLCM needs)."""
    source: str = Field("world", description="'world' = shapes-world train prompts; else a local .txt (one per line), "
                                             ".jsonl or .parquet file of captions (e.g. LAION-Aesthetics 6+)")
    caption_key: str = Field("caption", description="field/column holding the caption in .jsonl/.parquet files")
    limit: int = Field(0, ge=0, description="use at most this many prompts (0 = all)")


class ConsistencyParams(Section):
    """What `mlcd`, `ilcd` and `lcm_baseline` share (the loop of tasks/distill.py; each stage's batches read the rest)."""
    seed: int = 7
    num_segments: int = Field(8, gt=0, le=T_TRAIN, description="M; 1 gives plain LCD over [0, T] (the LCM baseline)")
    guidance_scale: float = Field(5.0, ge=0, description="CFG w of the teacher solver (sdxl: 8.0)")
    loss: Literal["mse", "lpips"] = "lpips"
    steps: int = Field(250, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-4, gt=0)
    eval_every: int = Field(200, ge=0, description="small evaluation every N steps (0 = off); the loss says little")
    eval_prompts: int = Field(64, gt=0)
    final_eval_prompts: int = Field(256, ge=0, description="end-of-training evaluation (metrics final_eval: alignment "
                                                           "± s.e. and Fréchet at 2 and 4 steps) on this many held-out prompts; 0 = off")
    checkpoint_every: int = Field(100, gt=0)
    max_minutes: float = Field(0.0, ge=0)


class IlcdParams(ConsistencyParams):
    """`ilcd` (Alg. 2): continues `mlcd`'s LoRA (its rank is that LoRA's); inputs from the student, no skip or buffer."""
    teacher_steps_p: int = Field(3, gt=0, description="p teacher DDIM steps over one segment")
    student_steps_q: int = Field(4, gt=0, description="q student steps that make ẑ0")
    timesteps: Literal["milestones", "uniform"] = Field(
        "milestones", description="'milestones' = Alg. 2 (t_m a milestone, t_n the one below: L_ilcd2); 'uniform' = "
                                  "Table 2's L_lcd2 ablation (t_m over the whole range, t_n one segment below)")


class MlcdParams(ConsistencyParams):
    """`mlcd` and `lcm_baseline` (Alg. 1 pairs): a fresh LoRA of ``rank``; pairs ``skip`` apart, by MDS or the buffer."""
    rank: int = Field(16, gt=0)
    skip: int = Field(20, gt=0, description="t_m - t_n; < T/M (a skip past the segment would always be clamped)")
    teacher_path: Literal["mds", "buffer"] = Field(
        "mds", description="'mds' = Alg. 1 from fresh noise each step; 'buffer' = from buffered teacher "
                           "trajectories (tasks/teacher_buffer.py; about one teacher CFG step per pair)")
    buffer_trajectories: int = Field(64, gt=0, description="teacher trajectories per buffer chunk (global; a multiple "
                                                           "of batch_size)")
    buffer_refresh: int = Field(100, gt=0, description="training steps per buffer chunk (then the next is generated)")
    mds: Literal["multi", "single"] = Field(
        "multi", description="how z_{t_m} is reached from noise: 'multi' = the multistep denoising strategy (Alg. 1); "
                             "'single' = one teacher step (Table 2's L_mlcd-s ablation; teacher_path mds only)")

    @field_validator("skip")
    @classmethod
    def _skip_within_segment(cls, v: int, info: ValidationInfo) -> int:
        m = info.data.get("num_segments")
        if m and v >= T_TRAIN / m:
            raise ValueError(f"{v} out of range: must be < T/M = {T_TRAIN}/{m} = {T_TRAIN / m:g} "
                             f"(T = {T_TRAIN} timesteps, M = num_segments = {m}); the accepted range is 1..{-(-T_TRAIN // m) - 1}")
        return v

    @model_validator(mode="after")
    def _buffer_fits(self) -> "MlcdParams":
        if self.teacher_path == "buffer" and self.mds != "multi":
            raise ValueError(f"mds: {self.mds!r} needs teacher_path: mds (the buffer stores MDS trajectories)")
        if self.teacher_path == "buffer" and self.buffer_trajectories % self.batch_size:
            raise ValueError(f"buffer_trajectories ({self.buffer_trajectories}) must be a multiple of batch_size "
                             f"({self.batch_size}): trajectory i serves row i mod batch_size")
        return self


class TechniqueParams(Section):
    """Shared by `mps` and `dmgan`: both continue the unified LoRA on Eq. 9 batches (ẑ_0 from q student
    steps, forward-diffused to a milestone) and keep iLCD's consistency term (p teacher CFG steps)."""
    enabled: bool = Field(True, description="false: the stage passes its input LoRA through unchanged (ablation)")
    seed: int = 9
    consistency_weight: float = Field(1.0, ge=0, description="weight of the iLCD consistency term kept alongside")
    guidance_scale: float = Field(5.0, ge=0, description="CFG w of the teacher (sdxl: 8.0)")
    teacher_steps_p: int = Field(3, gt=0)
    student_steps_q: int = Field(4, gt=0)
    loss: Literal["mse", "lpips"] = "lpips"
    steps: int = Field(500, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-5, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    max_minutes: float = Field(0.0, ge=0)
    final_eval_prompts: int = Field(256, ge=0, description="end-of-training evaluation (metrics final_eval: alignment "
                                                           "± s.e. and Fréchet at 2 and 4 steps) on this many held-out prompts; 0 = off")


class MpsParams(TechniqueParams):
    """Stage `mps` (Eq. 11) on top of the iLCD LoRA: L = w_c L_ilcd + w_mps L_mps."""
    condition: str = Field("overall", description="MPS condition the reward is asked under")
    margin: float | None = Field(None, description="s0 of Eq. 11; null = the reward model's mean score on clean, "
                                                    "aligned renders (shapes world); sdxl: 16 (MPS's scale)")
    mps_weight: float = Field(1.0, ge=0)
    steps: int = Field(150, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(2e-5, gt=0)


class DmganParams(TechniqueParams):
    """Stage `dmgan` (Eq. 12–13): data-free distribution matching + adversarial loss on the unified LoRA."""
    seed: int = 10
    steps: int = Field(450, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(2e-5, gt=0)
    dm_weight: float = Field(1.0, ge=0, description="0 switches distribution matching off")
    gan_weight: float = Field(0.1, ge=0, description="0 switches the adversarial loss off")
    fake_rank: int = Field(16, gt=0, description="rank of the fake-score LoRA adapter")
    fake_lr: float = Field(1e-4, gt=0)
    disc_lr: float = Field(1e-4, gt=0)
    disc_tune: Literal["frozen", "lora"] = Field("frozen", description="teacher encoder in the discriminator")
    gan_loss: Literal["nonsaturating", "hinge"] = "nonsaturating"
    critic_updates: int = Field(1, gt=0, description="fake-score + discriminator updates per generator update")
    dm_t_min: int = Field(20, ge=0, lt=T_TRAIN)
    dm_t_max: int = Field(980, gt=0, le=T_TRAIN)
    gan_t_max: int = Field(750, gt=0, le=T_TRAIN, description="t' for the discriminator's forward diffusion, U[0, gan_t_max)")
    collapse_window: int = Field(20, gt=0, description="steps of discriminator accuracy 1.0 that count as a collapse")

    @field_validator("dm_t_max")
    @classmethod
    def _dm_range(cls, v: int, info: ValidationInfo) -> int:
        lo = info.data.get("dm_t_min")
        if lo is not None and v <= lo:
            raise ValueError(f"{v} out of range: must be > dm_t_min = {lo} (and <= {T_TRAIN})")
        return v

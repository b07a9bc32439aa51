"""The sections of the benchmark (``evaluate``, its §A.2 ``applications`` rows, the Table 1
``suite`` for real teachers) and of the release (``register`` and its promotion gates)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from tlcm.core.params.core import LCM_MAX_STEPS, T_TRAIN, TLCM_MAX_STEPS, Section, _each_in


class EvaluateParams(Section):
    seed: int = 3
    n_prompts: int = Field(512, gt=0)
    batch_size: int = Field(64, gt=0)
    guidance_scale: float = Field(5.0, ge=0, description="CFG w of the reference row (the teacher at reference_steps)")
    reference_steps: int = Field(25, gt=0, le=T_TRAIN, description="the teacher's DDIM + CFG reference row")
    baseline_samplers: tuple[Literal["tlcm", "dpmpp_2m", "euler_a", "ddim"], ...] = Field(
        ("tlcm", "dpmpp_2m", "euler_a", "ddim"), description="training-free samplers of the untrained teacher")
    baseline_steps: tuple[int, ...] = (2, 3, 4, 8)
    baseline_guidance: tuple[float, ...] = Field((1.0, 2.0, 3.5, 5.0, 7.5), description="CFG grid of the baseline sweep")
    selection_prompts: int = Field(128, gt=0, description="held-out prompts (disjoint captions from the benchmark's) "
                                   "on which each baseline's CFG scale is chosen")
    sample_seeds: int = Field(2, gt=0, description="noise seeds for the reference and the shipped LoRA's rows (spread)")
    student_stages: tuple[str, ...] = Field(("lcm_baseline", "mlcd", "ilcd", "mps", "dmgan"),
                                            description="LoRA stages to benchmark")
    student_steps: tuple[int, ...] = (2, 3, 4, 8)
    lcm_steps: tuple[int, ...] = (2, 4, 8)
    grid_prompts: int = Field(16, gt=0)

    @field_validator("baseline_steps")
    @classmethod
    def _baseline_steps(cls, v: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        if "tlcm" in (info.data.get("baseline_samplers") or ()):
            return _each_in(v, 1, TLCM_MAX_STEPS, "the 'tlcm' baseline sampler samples on the 8 segment milestones")
        return _each_in(v, 1, T_TRAIN, "teacher sampler steps")

    @field_validator("student_steps")
    @classmethod
    def _student_steps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _each_in(v, 1, TLCM_MAX_STEPS, "TLCM sampling on the 8 segment milestones")

    @field_validator("lcm_steps")
    @classmethod
    def _lcm_steps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _each_in(v, 1, LCM_MAX_STEPS, "diffusers' LCMScheduler")


class ApplicationsParams(Section):
    """The paper's §A.2 applications in the benchmark (`evaluate`, :mod:`tasks.applications`): img2img,
    inpainting and ControlNet with the shipped LoRA and TLCMScheduler vs the teacher at ``teacher_steps``,
    and the agreement of the stock diffusers sampling paths with the benchmark's own sampler."""
    enabled: bool = True
    n_prompts: int = Field(64, gt=0, description="held-out prompts (the first n of the eval set)")
    steps: tuple[int, ...] = Field((2, 4), description="TLCM denoising steps run (1..8)")
    teacher_steps: int = Field(25, gt=0, description="the reference: teacher DDIM + CFG (evaluate.guidance_scale)")
    img2img_strength: float = Field(0.5, ge=0.5, le=0.8)
    controlnet_scale: float = Field(1.0, ge=0)


class SuiteParams(Section):
    """The paper's Table 1 evaluation suite for real teachers (unused in the shapes world). Local paths only."""
    coco_captions: str | None = Field(None, description="MSCOCO-2017 annotations/captions_val2017.json")
    coco_images: str | None = Field(None, description="MSCOCO-2017 val2017/ image folder (FID reference)")
    n_images: int = Field(5000, gt=0)
    clip_model: str | None = Field(None, description="CLIP ViT-g/14 folder or hub id (laion/CLIP-ViT-g-14-laion2B-s12B-b42K)")
    aesthetic_clip: str | None = Field(None, description="CLIP ViT-L/14 folder or hub id (openai/clip-vit-large-patch14)")
    aesthetic_head: str | None = Field(None, description="LAION aesthetic predictor MLP weights (sac+logos+ava1-l14-linearMSE)")
    image_reward: str | None = Field(None, description="ImageReward checkpoint folder (ImageReward.pt + med_config.json)")
    fid_inception: str | None = Field(None, description="TorchScript Inception for FID (inception-2015-12-05.pt); "
                                                         "null = FID on CLIP features, reported as fid_clip")
    batch_size: int = Field(8, gt=0)


class GateParams(Section):
    """Promotion gates: ``tlcm promote`` checks one benchmark row (method + steps) against these."""
    method: str = Field("TLCM after dmgan", description="benchmark row 'method' the gates read")
    steps: int = Field(4, ge=0, description="benchmark row 'steps' the gates read")
    min_alignment: float = Field(0.5, ge=0.0, le=1.0)
    max_frechet: float | None = Field(None, ge=0.0, description="null = no Fréchet gate")
    max_sec_per_image: float | None = Field(None, gt=0.0, description="null = no speed gate")


class RegisterParams(Section):
    model_name: str = Field("tlcm-shapes", min_length=1, description="MLflow registered model name")
    gates: GateParams = GateParams()

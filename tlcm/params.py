"""Typed, frozen params: one object per ``params.yaml`` section, unknown keys rejected.

``params.yaml`` holds the default preset (``mini``) in full. Another preset
(``smoke``, ``sdxl``) is a partial overlay in ``configs/presets/<name>.yaml``
merged over it; select it with the top-level ``preset`` key (so
``dvc exp run -S preset=smoke`` works) or ``--preset`` on the command line.
"""
from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer,
                      model_validator)

ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = ROOT / "configs" / "presets"
BASE_PRESET = "mini"


T_TRAIN = 1000  # discrete DDPM timesteps of the teacher (SD, SDXL and the shapes teacher): range checks below
TLCM_MAX_STEPS = 8  # models/scheduler.py: TLCM sampling on the M = 8 milestones supports 1..8 steps
LCM_MAX_STEPS = 50  # diffusers' LCMScheduler: at most original_inference_steps (50)
PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file and key."""


class Section(BaseModel):
    """Strict types (a bool is not an int, a string is not a number), finite floats, unknown keys rejected."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        """YAML lists are tuples here (strict mode takes no list for a tuple field)."""
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data


TRAIN = "train"  # the YAML word for "this pipeline's own stage trains it"


class Source(BaseModel):
    """Where a network a stage uses comes from, written in YAML as one string: ``train`` (this pipeline's
    own stage trains it in the shapes world) or the location of a pretrained one (a local folder or file, or
    a hub id). Serialises back to that string, so records and stage identities read as the YAML does."""
    model_config = ConfigDict(frozen=True, strict=True)
    location: str | None = Field(None, description="folder / file / hub id of a pretrained network; None = trained here")

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if isinstance(data, (Source, dict)):  # Source(location=...) in Python
            return data
        if not isinstance(data, str) or not data.strip():
            raise ValueError(f"must be `{TRAIN}` (trained by this pipeline) or a folder, file or hub id")
        return {"location": None if data == TRAIN else data}

    @model_serializer
    def _to_yaml(self) -> str:
        return TRAIN if self.location is None else self.location

    @property
    def trained(self) -> bool:
        """Built by this pipeline's own stage (the shapes world)."""
        return self.location is None

    @property
    def pretrained(self) -> bool:
        """Loaded from :attr:`location` (a real model: SDXL, SD1.5, MPS)."""
        return self.location is not None

    def resolve(self, trained_at: Path) -> str:
        """The location to load from: ``trained_at`` (the stage's output folder) when trained here."""
        return str(trained_at) if self.location is None else self.location

    def __str__(self) -> str:
        return self._to_yaml()


def _each_in(values: tuple[int, ...], lo: int, hi: int, what: str) -> tuple[int, ...]:
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise ValueError(f"{bad} out of range: each must be in {lo}..{hi} ({what})")
    return values


class WorldParams(Section):
    seed: int = 0
    image_size: int = 32
    two_object_frac: float = Field(0.5, ge=0.0, le=1.0)
    n_train_prompts: int = Field(4096, gt=0)
    n_eval_prompts: int = Field(256, gt=0)
    n_compositional_prompts: int = Field(64, gt=0)


class EvaluatorParams(Section):
    seed: int = 1
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, gt=0)
    n_test: int = Field(2000, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    max_minutes: float = Field(0.0, ge=0)


class AutoencoderParams(Section):
    seed: int = 4
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    steps: int = Field(1200, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    checkpoint_every: int = Field(500, gt=0)
    max_minutes: float = Field(0.0, ge=0)


class TextParams(Section):
    hidden_size: int = 64
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    projection_dim: int = 64
    max_length: int = 24


class UNetParams(Section):
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    addition_time_embed_dim: int = 8


class TeacherParams(Section):
    source: Source = Field(Source(), description="`train` builds the shapes-world teacher; else a hub id or local "
                                                  "folder of an SDXL/SD1.5 pipeline")
    seed: int = 2
    text: TextParams = TextParams()
    unet: UNetParams = UNetParams()
    steps: int = Field(6000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    cond_drop: float = Field(0.1, ge=0.0, le=1.0)
    min_snr_gamma: float = Field(5.0, ge=0.0, description="Min-SNR-γ loss weighting; 0 = uniform")
    offset_noise: float = Field(0.0, ge=0.0, description="offset-noise strength (SDXL trained with 0.0357); 0 = off")
    parse_weight: float = Field(0.0, ge=0.0, description="weight of the caption-parsing loss on the text encoders "
                                "(models/caption_head.py; stand-in for CLIP pretraining); 0 = off")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="frozen teacher weights in the distillation stages (autocast; LoRAs stay float32)")
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward (SDXL: on)")
    checkpoint_every: int = Field(500, gt=0)
    max_minutes: float = Field(0.0, ge=0, description="0 = no wall-clock cap; otherwise stop (and save) after this long")


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
    student_stages: tuple[str, ...] = Field((), description="LoRA stages to benchmark, e.g. [lcm_baseline, mlcd, ilcd]")
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


class GateParams(Section):
    """Promotion gates: ``tlcm promote`` checks one benchmark row (method + steps) against these."""
    method: str = Field("TLCM after dmgan", description="benchmark row 'method' the gates read")
    steps: int = Field(4, ge=0, description="benchmark row 'steps' the gates read")
    min_alignment: float = Field(0.0, ge=0.0, le=1.0)
    max_frechet: float | None = Field(None, ge=0.0, description="null = no Fréchet gate")
    max_sec_per_image: float | None = Field(None, gt=0.0, description="null = no speed gate")


class RegisterParams(Section):
    model_name: str = Field("tlcm-shapes", min_length=1, description="MLflow registered model name")
    gates: GateParams = GateParams()


class BappsParams(Section):
    source: str = Field("synthetic", description="'synthetic' writes a shapes-world BAPPS; else the root of a real BAPPS copy")
    seed: int = 5
    n_train: int = Field(4000, gt=0)
    n_val: int = Field(1000, gt=0)
    judges: int = Field(5, gt=0, description="simulated votes per triplet (BAPPS: 2 train, 5 val)")
    oracle_temperature: float = Field(0.03, gt=0, description="SSIM-difference scale of a judge's preference")


class LatentLpipsParams(Section):
    seed: int = 6
    width_divisor: int = Field(8, gt=0, description="VGG-16 channel widths divided by this (1 = full VGG-16)")
    steps: int = Field(350, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    max_train_triplets: int = Field(0, ge=0, description="read at most this many BAPPS train triplets (0 = all)")
    checkpoint_every: int = Field(100, gt=0)
    max_minutes: float = Field(0.0, ge=0)


class ConsistencyParams(Section):
    """Shared by `mlcd`, `ilcd` and `lcm_baseline` (same loop, different sections)."""
    seed: int = 7
    rank: int = Field(16, gt=0)
    num_segments: int = Field(8, gt=0, le=T_TRAIN, description="M; 1 gives plain LCD over [0, T] (the LCM baseline)")
    skip: int = Field(20, gt=0, description="MLCD: t_m - t_n; < T/M (a skip past the segment would always be clamped)")
    guidance_scale: float = Field(5.0, ge=0, description="CFG w of the teacher solver (sdxl: 8.0)")
    loss: Literal["mse", "lpips"] = "lpips"
    steps: int = Field(600, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-4, gt=0)
    teacher_steps_p: int = Field(3, gt=0, description="iLCD: p teacher DDIM steps over one segment")
    student_steps_q: int = Field(4, gt=0, description="iLCD: q student steps that make ẑ0")
    teacher_path: Literal["mds", "buffer"] = Field(
        "mds", description="MLCD pairs: 'mds' = Alg. 1 from fresh noise each step; 'buffer' = from buffered teacher "
                           "trajectories (tasks/teacher_buffer.py; about one teacher CFG step per pair)")
    buffer_trajectories: int = Field(64, gt=0, description="teacher trajectories per buffer chunk (global; a multiple "
                                                           "of batch_size)")
    buffer_refresh: int = Field(100, gt=0, description="training steps per buffer chunk (then the next is generated)")
    eval_every: int = Field(200, ge=0, description="small evaluation every N steps (0 = off); the loss says little")
    eval_prompts: int = Field(64, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    max_minutes: float = Field(0.0, ge=0)

    @field_validator("skip")
    @classmethod
    def _skip_within_segment(cls, v: int, info: ValidationInfo) -> int:
        m = info.data.get("num_segments")
        if m and v >= T_TRAIN / m:
            raise ValueError(f"{v} out of range: must be < T/M = {T_TRAIN}/{m} = {T_TRAIN / m:g} "
                             f"(T = {T_TRAIN} timesteps, M = num_segments = {m}); the accepted range is 1..{-(-T_TRAIN // m) - 1}")
        return v

    @model_validator(mode="after")
    def _buffer_fits(self) -> "ConsistencyParams":
        if self.teacher_path == "buffer" and self.buffer_trajectories % self.batch_size:
            raise ValueError(f"buffer_trajectories ({self.buffer_trajectories}) must be a multiple of batch_size "
                             f"({self.batch_size}): trajectory i serves row i mod batch_size")
        return self


class RewardParams(Section):
    """The reward model with the MPS interface: trained in the shapes world, or a real MPS checkpoint."""
    source: Source = Field(Source(), description="`train` = the shapes-world reward model; else a local MPS checkpoint "
                                             "(.safetensors from `tlcm convert-mps`, or the released .pth with trust_pickled)")
    trust_pickled: bool = Field(False, description="allow torch.load(weights_only=False) of a pickled MPS module")
    seed: int = 8
    width: int = Field(32, gt=0)
    steps: int = Field(600, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    n_val_pairs: int = Field(2000, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    max_minutes: float = Field(0.0, ge=0)


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


class MpsParams(TechniqueParams):
    """Stage `mps` (Eq. 11) on top of the iLCD LoRA: L = w_c L_ilcd + w_mps L_mps."""
    condition: str = Field("overall", description="MPS condition the reward is asked under")
    margin: float | None = Field(None, description="s0 of Eq. 11; null = the reward model's mean score on clean, "
                                                    "aligned renders (shapes world); sdxl: 16 (MPS's scale)")
    mps_weight: float = Field(1.0, ge=0)


class DmganParams(TechniqueParams):
    """Stage `dmgan` (Eq. 12–13): data-free distribution matching + adversarial loss on the unified LoRA."""
    seed: int = 10
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(4, gt=0)
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


class ControlNetParams(Section):
    """Stage `controlnet`: ``ControlNetModel.from_unet`` of the teacher, trained briefly on edge maps of renders
    (paper §A.2 uses the LoRA with a ControlNet made for the base model). Shapes world only."""
    enabled: bool = Field(True, description="false: the stage records that it skipped; no ControlNet rows")
    seed: int = 11
    steps: int = Field(120, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    cond_drop: float = Field(0.5, ge=0, le=1, description="caption dropout, so that the control alone carries layout")
    checkpoint_every: int = Field(60, gt=0)
    max_minutes: float = Field(0.0, ge=0)


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


class PromptsParams(Section):
    """Where the data-free stages get their prompts (the only training data TLCM needs)."""
    source: str = Field("world", description="'world' = shapes-world train prompts; else a local .txt (one per line), "
                                             ".jsonl or .parquet file of captions (e.g. LAION-Aesthetics 6+)")
    caption_key: str = Field("caption", description="field/column holding the caption in .jsonl/.parquet files")
    limit: int = Field(0, ge=0, description="use at most this many prompts (0 = all)")


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


# `register` (the stage) shadows ABCMeta.register on the class; harmless for a field, so silence pydantic.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(Section):
        preset: str = BASE_PRESET
        world: WorldParams = WorldParams()
        evaluator: EvaluatorParams = EvaluatorParams()
        autoencoder: AutoencoderParams = AutoencoderParams()
        teacher: TeacherParams = TeacherParams()
        bapps: BappsParams = BappsParams()
        latent_lpips: LatentLpipsParams = LatentLpipsParams()
        mlcd: ConsistencyParams = ConsistencyParams()
        ilcd: ConsistencyParams = ConsistencyParams(steps=200, lr=1e-5)
        lcm_baseline: ConsistencyParams = ConsistencyParams(num_segments=1)
        prompts: PromptsParams = PromptsParams()
        reward: RewardParams = RewardParams()
        mps: MpsParams = MpsParams()
        dmgan: DmganParams = DmganParams()
        controlnet: ControlNetParams = ControlNetParams()
        evaluate: EvaluateParams = EvaluateParams()
        applications: ApplicationsParams = ApplicationsParams()
        suite: SuiteParams = SuiteParams()
        register: RegisterParams = RegisterParams()

        def section(self, name: str) -> Section:
            return getattr(self, name)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            known = _known_keys(Params, e["loc"])
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            lines.append(
                f"{source}: unknown key '{key}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})")
            )
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{source}: '{key}': {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_params(path: str | Path = "params.yaml", preset: str | None = None) -> Params:
    """Read ``path``, overlay ``preset`` (or the file's own ``preset`` key), validate."""
    path = Path(path)
    data = _read_yaml(path)
    name = preset or data.get("preset", BASE_PRESET)
    source = str(path)
    known = sorted([p.stem for p in PRESETS_DIR.glob("*.yaml")] + [BASE_PRESET])
    if not isinstance(name, str) or not PRESET_NAME.match(name):
        raise ParamsError(f"preset {name!r} is not a preset name: give one of {', '.join(known)} (presets are "
                          f"names of files in {PRESETS_DIR}, not paths)")
    if name != BASE_PRESET:
        overlay_path = PRESETS_DIR / f"{name}.yaml"
        if not overlay_path.is_file():
            raise ParamsError(f"unknown preset '{name}' (known: {', '.join(known)})")
        data = _deep_merge(data, _read_yaml(overlay_path))
        source = f"{path} + {overlay_path}"
    data["preset"] = name
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_explain(e, source)) from None


StageName = Literal["world", "evaluator", "teacher", "evaluate"]

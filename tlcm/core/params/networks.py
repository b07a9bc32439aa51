"""The sections of the networks the distillation stands on: the shapes world and what is trained
in it (autoencoder, evaluator, teacher, BAPPS and the latent LPIPS, the reward model, the
ControlNet), or, through ``source``, the real model used instead (SDXL, BAPPS, MPS)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tlcm.core.params.core import Section, Source


class WorldParams(Section):
    seed: int = 0
    image_size: int = 32
    two_object_frac: float = Field(0.5, ge=0.0, le=1.0)
    n_train_prompts: int = Field(4096, gt=0)
    n_eval_prompts: int = Field(512, gt=0)
    n_compositional_prompts: int = Field(64, gt=0)


class EvaluatorParams(Section):
    seed: int = 1
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(64, gt=0)
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
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    checkpoint_every: int = Field(300, gt=0)
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
    steps: int = Field(3500, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    cond_drop: float = Field(0.1, ge=0.0, le=1.0)
    min_snr_gamma: float = Field(5.0, ge=0.0, description="Min-SNR-γ loss weighting; 0 = uniform")
    offset_noise: float = Field(0.1, ge=0.0, description="offset-noise strength (SDXL trained with 0.0357); 0 = off")
    parse_weight: float = Field(0.1, ge=0.0, description="weight of the caption-parsing loss on the text encoders "
                                "(models/caption_head.py; stand-in for CLIP pretraining); 0 = off")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="frozen teacher weights in the distillation stages (autocast; LoRAs stay float32)")
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward (SDXL: on)")
    checkpoint_every: int = Field(250, gt=0)
    max_minutes: float = Field(0.0, ge=0, description="0 = no wall-clock cap; otherwise stop (and save) after this long")


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

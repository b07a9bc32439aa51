"""The architectures the plan measures, written out (SDXL base 1.0, its text encoders and VAE, the MPS scorer), and
building any network on the ``meta`` device from its config: parameters without memory, frozen, in a chosen dtype;
our LoRA attached to a meta UNet."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


# ---- architectures (stabilityai/stable-diffusion-xl-base-1.0, written out; checked against its config.json files) ----

SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(  # CLIP ViT-L/14 text tower (CLIPTextModel)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = dict(  # OpenCLIP ViT-bigG/14 text tower (CLIPTextModelWithProjection)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5,
)
SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=1024, scaling_factor=0.13025,
)
# MPS (Kwai-Kolors) = CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) + a 4-layer cross model (models/reward.py).
MPS_CLIP_CONFIG: dict[str, Any] = dict(
    projection_dim=1024,
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5),
)
SDXL_TOKENS = 77
SDXL_POOLED_DIM = 1280  # text_encoder_2 projection = 2816 - 6 * 256


# ---- building on the meta device ------------------------------------------------------------------------------------

def on_meta(build: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """``build()`` with every parameter created on the meta device (no memory), then cast to ``dtype``, frozen."""
    with torch.device("meta"):
        module = build()
    nn.Module.to(module, dtype)  # plain nn.Module.to: diffusers' override only adds a float32-module warning
    return module.requires_grad_(False)


def build_unet(config: dict[str, Any], dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    return on_meta(lambda: UNet2DConditionModel(**config), dtype)


def build_vae(config: dict[str, Any], dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return on_meta(lambda: AutoencoderKL(**config), dtype)


def build_text_encoder(config: dict[str, Any], with_projection: bool, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return on_meta(lambda: cls(CLIPTextConfig(**config)), dtype)


def build_mps(config: dict[str, Any], dtype: torch.dtype):
    """The MPS scorer exactly as :class:`models.reward.MPSNet` builds it (CLIP + cross model)."""
    from transformers import CLIPConfig

    from models.reward import MPSNet

    clip = CLIPConfig(text_config=config["text_config"], vision_config=config["vision_config"],
                      projection_dim=config["projection_dim"])
    return on_meta(lambda: MPSNet(clip), dtype)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attach_lora(unet, rank: int, name: str = "student") -> int:
    """Attach our LoRA (:func:`models.lora.add_lora`) to a meta UNet, trainable; returns its parameter count."""
    from models.lora import add_lora, lora_parameters

    dtype = next(unet.parameters()).dtype
    with torch.device("meta"):  # peft would otherwise initialise every adapter on the CPU first
        add_lora(unet, rank, name)
    params = lora_parameters(unet, name)
    for p in params:
        p.data = p.data.to(dtype)  # bf16 compute, as under autocast; the fp32 master copy is booked as optimizer state
        p.requires_grad_(True)
    return sum(p.numel() for p in params)

"""Builders for small SDXL-shaped networks (randomly initialised, no I/O).

The same diffusers/transformers classes as SDXL: ``AutoencoderKL``, a
``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` whose penultimate
hidden states are concatenated for cross-attention, and a
``UNet2DConditionModel`` with ``text_time`` micro-conditioning (pooled text
embedding + six size/crop ids). Only the sizes differ.

Also the SD1.5 shape (``build_sd15_*``): one ``CLIPTextModel`` whose last hidden
states are the cross-attention input, a UNet without ``text_time``, SD1.5's
scheduler config; :func:`build_sd15_pipeline` assembles a ``StableDiffusionPipeline``.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# SDXL's own training-time noise schedule (stabilityai/stable-diffusion-xl-base-1.0 scheduler_config).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
    use_karras_sigmas=False,
)

# SD1.5's own scheduler config (stable-diffusion-v1-5 scheduler/scheduler_config.json): the same betas.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, trained_betas=None,
)


def build_vae(block_out_channels: tuple[int, ...], layers_per_block: int, latent_channels: int, sample_size: int) -> AutoencoderKL:
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=min(32, block_out_channels[0]), sample_size=sample_size,
        force_upcast=False,
    )


def _text_config(vocab_size: int, hidden: int, layers: int, heads: int, proj: int, max_len: int, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_len, projection_dim=proj,
        hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )


def build_text_encoders(vocab_size: int, hidden: int, layers: int, heads: int, proj: int, max_len: int, bos: int, eos: int):
    """(text_encoder, text_encoder_2): SDXL's CLIP-L-like and CLIP-G-like (with projection) roles."""
    te1 = CLIPTextModel(_text_config(vocab_size, hidden, layers, heads, proj, max_len, bos, eos))
    te2 = CLIPTextModelWithProjection(_text_config(vocab_size, hidden, layers, heads, proj, max_len, bos, eos))
    return te1, te2


def _unet(down: tuple[str, ...], up: tuple[str, ...], block_out_channels: tuple[int, ...], layers_per_block: int,
          attention_head_dim: int, cross_attention_dim: int, latent_channels: int, sample_size: int,
          **extra) -> UNet2DConditionModel:
    """A small UNet2DConditionModel with the given block pattern (heads = channels / head dim)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(max(1, c // attention_head_dim) for c in block_out_channels),
        norm_num_groups=min(32, block_out_channels[0]), **extra,
    )


def build_unet(
    block_out_channels: tuple[int, ...], layers_per_block: int, attention_head_dim: int, cross_attention_dim: int,
    pooled_dim: int, addition_time_embed_dim: int, latent_channels: int, sample_size: int,
) -> UNet2DConditionModel:
    """SDXL's block pattern scaled down: plain blocks at the finest level, cross-attention below."""
    n = len(block_out_channels)
    return _unet(("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1), ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
                 block_out_channels, layers_per_block, attention_head_dim, cross_attention_dim, latent_channels, sample_size,
                 addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                 projection_class_embeddings_input_dim=pooled_dim + 6 * addition_time_embed_dim,
                 transformer_layers_per_block=1, use_linear_projection=True)


def build_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)


def build_sd15_text_encoder(vocab_size: int, hidden: int, layers: int, heads: int, max_len: int, bos: int,
                            eos: int) -> CLIPTextModel:
    """SD1.5's one text encoder (CLIP-L-like, no projection used)."""
    return CLIPTextModel(_text_config(vocab_size, hidden, layers, heads, hidden, max_len, bos, eos))


def build_sd15_unet(block_out_channels: tuple[int, ...], layers_per_block: int, attention_head_dim: int,
                    cross_attention_dim: int, latent_channels: int, sample_size: int) -> UNet2DConditionModel:
    """SD1.5's block pattern scaled down: cross-attention at every level but the coarsest, no ``text_time``."""
    n = len(block_out_channels)
    return _unet(("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
                 block_out_channels, layers_per_block, attention_head_dim, cross_attention_dim, latent_channels, sample_size)


def build_sd15_scheduler() -> PNDMScheduler:
    return PNDMScheduler(**SD15_SCHEDULER_CONFIG)


def build_sd15_pipeline(tokenizer, vae: AutoencoderKL, text_hidden: int = 16, text_layers: int = 2, text_heads: int = 2,
                        unet_block_out_channels: tuple[int, ...] = (8, 16), layers_per_block: int = 1,
                        attention_head_dim: int = 4, sample_size: int = 16):
    """A small, randomly initialised SD1.5-shaped ``StableDiffusionPipeline`` (no safety checker) around
    ``tokenizer`` (a ``CLIPTokenizer``) and ``vae``; ``sample_size`` is the latent side."""
    from diffusers import StableDiffusionPipeline

    te = build_sd15_text_encoder(len(tokenizer), text_hidden, text_layers, text_heads, tokenizer.model_max_length,
                                 tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = build_sd15_unet(unet_block_out_channels, layers_per_block, attention_head_dim, text_hidden,
                           vae.config.latent_channels, sample_size)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_sd15_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

"""Every network of one teacher measured at batch 1 (:class:`NetCosts`): the UNet as teacher, student and
discriminator encoder, the text encoders, the VAE decoder, the scorer, the latent LPIPS and the discriminator head;
for SDXL at 1024² (:func:`sdxl_costs`) and for the `mini` preset's shapes-world networks (:func:`mini_costs`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from tools.plan.configs import (MPS_CLIP_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TOKENS,
                               SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, attach_lora, build_mps, build_text_encoder,
                               build_unet, build_vae, on_meta, param_count)
from tools.plan.meters import (CallCost, measure_checkpointed, measure_grad_call, measure_nograd_call, meta,
                              module_tensors)


# ---- the networks of one teacher, measured -------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetCosts:
    """The UNet as teacher (adapters off), student (LoRA, forward + backward), and discriminator encoder."""
    params: int
    lora_params_per_rank: int  # LoRA parameters are linear in the rank
    rank: int
    teacher: CallCost  # no grad, adapters off: F_base and the solver's peak activation memory
    student: CallCost  # LoRA at ``rank``, grad to the LoRA only; saves with and without checkpointing
    encoder: CallCost  # down + mid blocks (models.gan.unet_encoder_features), grad to the input
    encoder_nograd_flops: int

    def lora_params(self, rank: int) -> int:
        return self.lora_params_per_rank * rank

    def lora_fwd_flops(self, rank: int) -> float:
        """LoRA's extra forward FLOPs (linear in the rank: every LoRA term is r-dimensional)."""
        return (self.student.fwd_flops - self.teacher.fwd_flops) * rank / self.rank

    def student_fwd_flops(self, rank: int) -> float:
        return self.teacher.fwd_flops + self.lora_fwd_flops(rank)


def unet_inputs(unet, batch: int, tokens: int, dtype: torch.dtype):
    """(z, t, Cond) for one call: latents at the config's sample size, ``tokens`` text tokens, SDXL ids if text_time."""
    from models.denoiser import Cond

    cfg = unet.config
    z = meta((batch, cfg.in_channels, cfg.sample_size, cfg.sample_size), dtype)
    t = torch.zeros(batch, device="meta", dtype=torch.long)
    embeds = meta((batch, tokens, cfg.cross_attention_dim), dtype)
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return z, t, Cond(embeds, meta((batch, pooled_dim), dtype), meta((batch, 6), dtype))
    return z, t, Cond(embeds, None, None)


def unet_call(unet, z: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
    """ε̂ exactly as :class:`models.denoiser.Denoiser` calls the UNet."""
    from models.denoiser import Denoiser

    return Denoiser(unet, None).eps(z, t, c)


def measure_unet(config: dict[str, Any], rank: int, tokens: int, dtype: torch.dtype) -> UNetCosts:
    """Build the UNet on meta, attach a rank-``rank`` LoRA, and measure the three ways our stages call it."""
    from models.gan import unet_encoder_features
    from models.lora import adapters_disabled

    unet = build_unet(config, dtype)
    params = param_count(unet)
    lora = attach_lora(unet, rank)
    weights = module_tensors(unet)
    z, t, c = unet_inputs(unet, 1, tokens, dtype)
    with adapters_disabled(unet):
        teacher = measure_nograd_call(lambda: unet_call(unet, z, t, c), weights)
    student = measure_checkpointed(unet, lambda: unet_call(unet, z, t, c), weights)
    for p in unet.parameters():
        p.requires_grad_(False)  # the discriminator's encoder: frozen weights, gradient to its input only
    zg = meta(tuple(z.shape), dtype, grad=True)
    with adapters_disabled(unet):  # its blocks checkpoint like the full UNet's
        encoder = measure_checkpointed(unet, lambda: unet_encoder_features(unet, zg, t, c), weights)
        enc_nograd = measure_nograd_call(lambda: unet_encoder_features(unet, z, t, c), weights)
    return UNetCosts(params, lora // rank, rank, teacher, student, encoder, enc_nograd.fwd_flops)



@dataclass(frozen=True)
class NetCosts:
    """Everything a stage runs, measured at batch 1."""
    name: str
    dtype: torch.dtype
    unet: UNetCosts
    text_params: tuple[int, ...]
    text_flops: int
    vae_params: int
    vae_decoder_params: int
    vae_decode: CallCost  # grad to the latent; checkpointed numbers with the VAE's own checkpointing
    vae_decode_nograd_peak: int
    scorer_name: str
    scorer_params: int
    scorer: CallCost  # one score call, grad to the image
    lpips_params: int
    lpips: CallCost  # one d(pred, target) call, grad through pred
    head_params: int
    latent_numel: int = 0  # one latent (C × H × W): what the teacher buffer keeps per state



# ---- measuring one teacher's networks -------------------------------------------------------------------------------

def measure_text(configs: Iterable[tuple[dict[str, Any], bool]], tokens: int, dtype: torch.dtype
                 ) -> tuple[tuple[int, ...], int]:
    """(parameter counts, forward FLOPs of one prompt through all of them, as ``encode_prompt`` runs them)."""
    counts, flops = [], 0
    for cfg, proj in configs:
        te = build_text_encoder(cfg, proj, dtype)
        counts.append(param_count(te))
        ids = torch.zeros(1, tokens, device="meta", dtype=torch.long)
        flops += measure_nograd_call(lambda: te(ids, output_hidden_states=True), module_tensors(te)).fwd_flops
    return tuple(counts), flops


def measure_vae(vae, dtype: torch.dtype) -> tuple[int, int, CallCost, int]:
    """(params, decoder params, decode with grad to the latent, decode no-grad peak); latents of side
    ``sample_size / 2^(levels - 1)``."""
    cfg = vae.config
    side = cfg.sample_size // 2 ** (len(cfg.block_out_channels) - 1)
    weights = module_tensors(vae)
    z = meta((1, cfg.latent_channels, side, side), dtype, grad=True)
    cost = measure_checkpointed(vae, lambda: vae.decode(z).sample, weights)
    peak = measure_nograd_call(lambda: vae.decode(z.detach()).sample, weights).peak_nograd_bytes
    decoder = param_count(vae.decoder) + param_count(vae.post_quant_conv)
    return param_count(vae), decoder, cost, peak


def measure_mps_scorer(image_side: int, dtype: torch.dtype) -> tuple[int, CallCost]:
    """One MPS call as ``MPSNet.score`` makes it (CLIP preprocessing of the decoded image, prompt and condition text),
    gradient to the image."""
    from models.reward import clip_preprocess

    net = build_mps(MPS_CLIP_CONFIG, dtype)
    ids = torch.zeros(1, SDXL_TOKENS, device="meta", dtype=torch.long)
    images = meta((1, 3, image_side, image_side), dtype, grad=True)
    size = MPS_CLIP_CONFIG["vision_config"]["image_size"]
    cost = measure_grad_call(lambda: net(clip_preprocess(images, size), ids, ids), module_tensors(net))
    return param_count(net), cost


def measure_lpips(channels: int, side: int, width_divisor: int, dtype: torch.dtype) -> tuple[int, CallCost]:
    """One ``LatentLPIPS(pred, target)`` call: one VGG pass on [pred, target], gradient through pred."""
    from models.latent_lpips import LatentLPIPS

    net = on_meta(lambda: LatentLPIPS(channels, width_divisor), dtype)
    x, y = meta((1, channels, side, side), dtype, grad=True), meta((1, channels, side, side), dtype)
    return param_count(net), measure_grad_call(lambda: net(x, y), module_tensors(net))


def head_param_count(unet_config: dict[str, Any]) -> int:
    """The discriminator head (:func:`models.gan.head_for`) on the UNet's deepest channels, projecting pooled text."""
    from models.gan import DiscriminatorHead

    text_dim = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    return param_count(on_meta(lambda: DiscriminatorHead(unet_config["block_out_channels"][-1], text_dim),
                               torch.float32))


def sdxl_costs(rank: int = 64, lpips_width_divisor: int = 1, dtype: torch.dtype = torch.bfloat16) -> NetCosts:
    """Every network of the `sdxl` preset at 1024² (128² latents, 77 tokens), batch 1, in ``dtype``."""
    unet = measure_unet(SDXL_UNET_CONFIG, rank, SDXL_TOKENS, dtype)
    text_params, text_flops = measure_text([(SDXL_TEXT_ENCODER_CONFIG, False), (SDXL_TEXT_ENCODER_2_CONFIG, True)],
                                           SDXL_TOKENS, dtype)
    vae_params, dec_params, vae_cost, vae_peak = measure_vae(build_vae(SDXL_VAE_CONFIG, dtype), dtype)
    scorer_params, scorer = measure_mps_scorer(SDXL_VAE_CONFIG["sample_size"], dtype)
    lpips_params, lpips = measure_lpips(4, SDXL_UNET_CONFIG["sample_size"], lpips_width_divisor, dtype)
    return NetCosts(f"SDXL 1024² ({str(dtype).removeprefix('torch.')})", dtype, unet, text_params, text_flops,
                    vae_params, dec_params, vae_cost, vae_peak,
                    "MPS (CLIP ViT-H/14 + cross)", scorer_params, scorer, lpips_params, lpips,
                    head_param_count(SDXL_UNET_CONFIG), 4 * SDXL_UNET_CONFIG["sample_size"] ** 2)


def mini_unet_config(params) -> dict[str, Any]:
    """The `mini` teacher's UNet config as :func:`tasks.teacher.build_pipeline` makes it (no artifacts needed)."""
    from models.sdxl_shaped import build_unet as shaped_unet

    p, a = params.teacher, params.autoencoder
    side = params.world.image_size // 2 ** (len(a.block_out_channels) - 1)
    with torch.device("meta"):
        unet = shaped_unet(p.unet.block_out_channels, p.unet.layers_per_block, p.unet.attention_head_dim,
                           2 * p.text.hidden_size, p.text.projection_dim, p.unet.addition_time_embed_dim,
                           a.latent_channels, side)
    return {k: v for k, v in unet.config.items() if not k.startswith("_")}


def mini_costs(params) -> NetCosts:
    """The `mini` preset's networks (fp32, as the CPU runs them): teacher UNet, text encoders, VAE, the shapes-world
    reward model as the scorer, latent LPIPS at its width divisor."""
    from models.reward import ShapesReward
    from models.sdxl_shaped import build_vae as shaped_vae
    from tlcm.shapes import world as W
    from tlcm.shapes.tokenizer import BOS, EOS, build_vocab

    dtype, p, a = torch.float32, params.teacher, params.autoencoder
    unet_cfg = mini_unet_config(params)
    ids = build_vocab(W.words())[0]
    vocab, t = len(ids), p.text
    text_cfg = dict(vocab_size=vocab, hidden_size=t.hidden_size, intermediate_size=4 * t.hidden_size,
                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                    max_position_embeddings=t.max_length, projection_dim=t.projection_dim, hidden_act="gelu",
                    bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[EOS])
    unet = measure_unet(unet_cfg, params.mlcd.rank, t.max_length, dtype)
    text_params, text_flops = measure_text([(text_cfg, False), (text_cfg, True)], t.max_length, dtype)
    vae = on_meta(lambda: shaped_vae(a.block_out_channels, a.layers_per_block, a.latent_channels,
                                     params.world.image_size), dtype)
    vae_params, dec_params, vae_cost, vae_peak = measure_vae(vae, dtype)
    reward = on_meta(lambda: ShapesReward(vocab, t.max_length, params.reward.width, params.world.image_size), dtype)
    images = meta((1, 3, params.world.image_size, params.world.image_size), dtype, grad=True)
    scorer = measure_grad_call(lambda: _image_path_sum(reward, images), module_tensors(reward))
    lpips_params, lpips = measure_lpips(a.latent_channels, unet_cfg["sample_size"], params.latent_lpips.width_divisor,
                                        dtype)
    return NetCosts(f"`{params.preset}` teacher", dtype, unet, text_params, text_flops, vae_params, dec_params,
                    vae_cost, vae_peak, "shapes reward (image side)", param_count(reward), scorer, lpips_params, lpips,
                    head_param_count(unet_cfg), unet_cfg["in_channels"] * unet_cfg["sample_size"] ** 2)


def _image_path_sum(reward, images: torch.Tensor) -> torch.Tensor:
    """The shapes reward model's image side (``encode_images``), the only part the gradient to the image crosses;
    its text side runs without grad and is a few MFLOPs."""
    return sum(x.float().sum() for x in reward.encode_images(images))

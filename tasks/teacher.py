"""Stage `teacher`: the small SDXL-shaped text-to-image teacher, saved as a diffusers folder.

Trains two CLIP text encoders and a ``text_time`` UNet (ε-prediction, SDXL's
noise schedule) on shapes-world renders encoded by the `autoencoder` stage,
with caption dropout so that CFG works (dropped captions get SDXL's
zero embeddings, as ``force_zeros_for_empty_prompt`` does at inference).
An EMA of the weights is what gets saved.

With ``teacher.source`` set to a hub id or folder (SDXL or SD1.5 style), nothing
is trained: the stage checks that the teacher loads and records what it is.

Under ``accelerate launch`` (:mod:`tlcm.core.distributed`) every process renders the
step's global batch, trains on its contiguous shard and averages gradients, so the
result equals the one-process run at the same ``batch_size``; the main process
writes the checkpoints and the pipeline folder.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from diffusers.training_utils import EMAModel
from transformers import CLIPTokenizer

from models.caption_head import CaptionHead
from models.denoiser import Denoiser, encode_prompts
from models.diffusion import q_sample
from models.evaluator import classification_loss
from models.sdxl_shaped import build_scheduler, build_text_encoders, build_unet
from tlcm.core import distributed as D
from tlcm.shapes import render as R
from tlcm.shapes import world as W
from tlcm.core.identity import checkpointer
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError, atomic_dir, atomic_write_json
from tlcm.loaders.teacher_io import load_teacher
from tlcm.core.training import cosine_warmup, ensure_finite, optimizer_step, run_loop, step_generator

log = logging.getLogger("tlcm")


def _load_autoencoder(paths: Paths) -> AutoencoderKL:
    if not (paths.autoencoder / "config.json").is_file():
        raise ArtifactError(f"autoencoder not found in {paths.autoencoder}; run `tlcm stage autoencoder` first")
    return AutoencoderKL.from_pretrained(paths.autoencoder, use_safetensors=True).requires_grad_(False).eval()


def build_pipeline(params: Params, paths: Paths) -> StableDiffusionXLPipeline:
    """A freshly initialised shapes-world SDXL pipeline (trained VAE, new text encoders and UNet)."""
    p = params.teacher
    if not (paths.tokenizer / "vocab.json").is_file():
        raise ArtifactError(f"tokenizer not found in {paths.tokenizer}; run `tlcm stage world` first")
    tok = CLIPTokenizer.from_pretrained(paths.tokenizer)
    vae = _load_autoencoder(paths)
    torch.manual_seed(p.seed)
    te1, te2 = build_text_encoders(len(tok), p.text.hidden_size, p.text.num_hidden_layers, p.text.num_attention_heads,
                                   p.text.projection_dim, p.text.max_length, tok.bos_token_id, tok.eos_token_id)
    unet = build_unet(p.unet.block_out_channels, p.unet.layers_per_block, p.unet.attention_head_dim,
                      2 * p.text.hidden_size, p.text.projection_dim, p.unet.addition_time_embed_dim,
                      vae.config.latent_channels, params.world.image_size // 2 ** (len(vae.config.block_out_channels) - 1))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=build_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight for ε-prediction, min(SNR_t, γ) / SNR_t (Hang et al. 2023); γ = 0: uniform."""
    if gamma <= 0:
        return torch.ones(t.shape)
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return (snr.clamp(max=gamma) / snr).float()


def run(params: Params, paths: Paths) -> dict:
    p, wp = params.teacher, params.world
    if p.source.pretrained:
        pipe = load_teacher(p.source.location)
        info = {"source": p.source.location, "class": type(pipe).__name__,
                "unet_params_millions": sum(x.numel() for x in pipe.unet.parameters()) / 1e6}
        if D.is_main():
            atomic_write_json(paths.metrics / "teacher.json", info)
        D.barrier()
        return info

    world = D.world_size()
    D.check_batch(p.batch_size, "teacher.batch_size", world)
    dev = D.device()
    pipe = build_pipeline(params, paths)
    pipe.to(dev)
    unet, te1, te2, vae = pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae
    trainable = [*unet.parameters(), *te1.parameters(), *te2.parameters()]
    head = None
    if p.parse_weight > 0:  # training-only, seeded so that it does not depend on what ran before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            head = CaptionHead(unet.config.cross_attention_dim, te2.config.projection_dim,
                               {k: len(v) for k, v in W.LABEL_SPACES.items()}).to(dev)
        trainable += list(head.parameters())
    D.broadcast_from_main(trainable)
    for m in (unet, te1, te2):
        m.train()
    opt = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=0.01)
    ema = EMAModel(trainable, decay=p.ema_decay)
    model = Denoiser(unet, pipe.scheduler.alphas_cumprod.to(dev))
    sf = vae.config.scaling_factor
    latent_shape = (vae.config.latent_channels, unet.config.sample_size, unet.config.sample_size)

    def step_fn(step: int) -> dict[str, float]:
        for g in opt.param_groups:
            g["lr"] = p.lr * cosine_warmup(step, p.warmup_steps, p.steps)
        # the GLOBAL batch, drawn identically on every process; each trains on its contiguous shard
        gen = step_generator(p.seed, step)
        specs, imgs = R.train_batch(p.seed, step, p.batch_size, wp.two_object_frac, wp.image_size)
        B = len(specs)
        keep = torch.rand(B, generator=gen) >= p.cond_drop
        t = torch.randint(0, 1000, (B,), generator=gen)
        eps = torch.randn((B, *latent_shape), generator=gen)
        if p.offset_noise:  # per-channel constant offset: lets the model move an image's mean (dark/bright scenes)
            eps = eps + p.offset_noise * torch.randn((B, latent_shape[0], 1, 1), generator=gen)
        specs_global, keep_global = specs, keep
        specs, imgs = D.shard(list(specs)), D.shard(imgs)
        keep, t, eps = D.shard(keep).to(dev), D.shard(t).to(dev), D.shard(eps).to(dev)
        with torch.no_grad():
            z0 = vae.encode(R.to_unit_tensor(imgs).to(dev) * 2 - 1).latent_dist.mean * sf
        cond = encode_prompts(pipe, [s.caption() for s in specs]).masked(keep)
        pred = model.eps(q_sample(z0, eps, t, model.alphas_cumprod), t, cond)
        per_sample = F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))
        terms = {"eps_mse": per_sample.mean()}
        if head is not None:  # parse the kept captions (dropped ones are zeros); global counts, sharded labels
            labels = {k: torch.tensor([W.label_indices(s)[k] for s in specs_global]).masked_fill(~keep_global, -1)
                      for k in W.LABEL_SPACES}
            counts = {k: float((v >= 0).sum()) / world for k, v in labels.items()}
            parse = classification_loss(head(cond.prompt_embeds, cond.pooled),
                                        {k: D.shard(v).to(dev) for k, v in labels.items()}, counts)
            terms["parse_ce"] = sum(parse.values()) / len(parse)
        ensure_finite(terms, "teacher", step)
        weight = min_snr_weight(model.alphas_cumprod, t, p.min_snr_gamma).to(dev)
        loss = (weight * per_sample).mean()  # a mean over the shard: averaged gradients = the global mean's
        if head is not None:
            loss = loss + p.parse_weight * terms["parse_ce"]
        optimizer_step(opt, loss, trainable, max_norm=1.0)
        ema.step(trainable)
        return {k: v.item() for k, v in terms.items()}

    ckpt = checkpointer("teacher", params, paths)
    state = {"unet": unet, "te1": te1, "te2": te2, "opt": opt, "ema": ema}
    if head is not None:
        state["parse_head"] = head
    res = run_loop("teacher", p.steps, step_fn, state, ckpt, p.checkpoint_every, max_minutes=p.max_minutes)

    ema.copy_to(trainable)
    for m in (unet, te1, te2):
        m.eval()
    info = {"source": "train", "steps": res.steps_done, "train_seconds": res.seconds, "world_size": world,
            "final_eps_mse": res.history[-1]["eps_mse"] if res.history else None,
            **({"final_parse_ce": res.history[-1]["parse_ce"]} if head is not None and res.history else {}),
            "unet_params_millions": sum(x.numel() for x in unet.parameters()) / 1e6}
    if D.is_main():
        with atomic_dir(paths.teacher) as out:
            pipe.to("cpu").save_pretrained(out, safe_serialization=True)
        atomic_write_json(paths.metrics / "teacher.json", info)
        log.info("teacher: %d steps in %.0fs on %d process(es) -> %s", res.steps_done, res.seconds, world,
                 paths.teacher)
    D.barrier()
    return info

"""Stage `autoencoder`: the teacher's VAE (an ``AutoencoderKL``), trained on shapes-world renders.

Skipped (nothing to train) when ``teacher.source`` points at a real model.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from models.sdxl_shaped import build_vae
from tlcm.core import distributed as D
from tlcm.shapes import render as R
from tlcm.core.identity import checkpointer
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import atomic_dir, atomic_write_json
from tlcm.core.training import cosine_warmup, ensure_finite, optimizer_step, run_loop, step_generator

log = logging.getLogger("tlcm")


def run(params: Params, paths: Paths) -> dict:
    p, wp = params.autoencoder, params.world
    D.check_batch(p.batch_size, "autoencoder.batch_size")
    torch.manual_seed(p.seed)
    vae = build_vae(p.block_out_channels, p.layers_per_block, p.latent_channels, wp.image_size).to(D.device())
    D.broadcast_from_main(vae.parameters())
    opt = torch.optim.AdamW(vae.parameters(), lr=p.lr, weight_decay=0.0)

    def step_fn(step: int) -> dict[str, float]:
        for g in opt.param_groups:
            g["lr"] = p.lr * cosine_warmup(step, 100, p.steps)
        # the GLOBAL batch and its posterior noise on every process; this process's shard
        _, imgs = R.train_batch(p.seed, step, p.batch_size, wp.two_object_frac, wp.image_size)
        x = D.shard(R.to_unit_tensor(imgs) * 2 - 1).to(D.device())
        post = vae.encode(x).latent_dist
        noise = torch.randn((p.batch_size, *post.mean.shape[1:]), generator=step_generator(p.seed, step))
        rec = vae.decode(post.mean + post.std * D.shard(noise).to(x.device)).sample  # z ~ q(z|x)
        terms = {"mse": F.mse_loss(rec, x), "l1": F.l1_loss(rec, x), "kl": post.kl().mean() / x[0].numel()}
        ensure_finite(terms, "autoencoder", step)
        loss = terms["mse"] + terms["l1"] + p.kl_weight * terms["kl"]
        optimizer_step(opt, loss, vae.parameters(), max_norm=1.0)
        return {k: v.item() for k, v in terms.items()}

    ckpt = checkpointer("autoencoder", params, paths)
    res = run_loop("autoencoder", p.steps, step_fn, {"vae": vae, "opt": opt}, ckpt, p.checkpoint_every,
                   max_minutes=p.max_minutes)

    # SD's convention: scale latents to unit variance (SDXL uses 0.13025 for its VAE).
    vae.eval().to("cpu")
    with torch.no_grad():
        _, imgs = R.train_batch(p.seed + 1, 0, 256, wp.two_object_frac, wp.image_size)
        x = R.to_unit_tensor(imgs) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample.clamp(-1, 1)
        psnr = (10 * torch.log10(4.0 / F.mse_loss(rec, x))).item()
        scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    metrics = {"psnr_db": psnr, "scaling_factor": scale, "steps": res.steps_done, "train_seconds": res.seconds,
               "world_size": D.world_size()}
    if D.is_main():
        with atomic_dir(paths.autoencoder) as out:
            vae.save_pretrained(out, safe_serialization=True)
        atomic_write_json(paths.metrics / "autoencoder.json", metrics)
        log.info("autoencoder: reconstruction PSNR %.2f dB, scaling_factor %.4f", psnr, scale)
    D.barrier()
    return metrics

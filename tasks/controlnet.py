"""Stage `controlnet`: a small ControlNet on the teacher, trained briefly on the shapes world's edge maps.

The paper (§A.2) shows the TLCM LoRA driving a ControlNet that was made for the base model. This stage
makes one for the shapes-world teacher: ``ControlNetModel.from_unet`` of the teacher UNet (frozen
teacher, trainable copy of its encoder and zero convolutions), trained with the teacher's own ε loss on
renders whose edge map (:func:`models.controlnet.edge_map`) is the control; captions are dropped with
probability ``cond_drop`` so that the control alone carries the layout. The `evaluate` stage uses it
with the student LoRA (:mod:`tasks.applications`). With a real teacher, or ``enabled: false``, the stage
records that it skipped (a real base model would use a published ControlNet).

Outputs ``<artifacts>/controlnet/`` (a diffusers ``ControlNetModel`` folder) and
``<artifacts>/metrics/controlnet.json`` (held-out ε-MSE with and without the control).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from models.controlnet import build_controlnet, controlled_eps, edge_map
from models.denoiser import Denoiser, encode_prompts
from models.diffusion import q_sample
from tlcm.core import distributed as D
from tlcm.shapes import render as R
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.identity import checkpointer
from tlcm.core.storage import atomic_dir, atomic_write_json
from tlcm.loaders.teacher_io import load_frozen_teacher
from tlcm.core.training import cosine_warmup, ensure_finite, optimizer_step, run_loop, step_generator

log = logging.getLogger("tlcm")


def _batch(pipe, seed: int, step: int, n: int, wp, split: str = "train"):
    """(z_0, control, captions, t, ε, generator) for a render batch that depends only on (seed, step)."""
    gen = step_generator(seed, step)
    specs, imgs = R.train_batch(seed, step, n, wp.two_object_frac, wp.image_size, split=split)
    x = R.to_unit_tensor(imgs)
    with torch.no_grad():
        z0 = pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    t = torch.randint(0, 1000, (n,), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    return z0, edge_map(x), [s.caption() for s in specs], t, eps, gen


@torch.no_grad()
def heldout_mse(pipe, controlnet, params: Params, n: int = 64) -> dict[str, float]:
    """ε-MSE on fresh eval-split renders: the teacher alone, and the teacher with the ControlNet."""
    z0, control, captions, t, eps, _ = _batch(pipe, params.controlnet.seed + 1, 10**6, n, params.world, split="eval")
    c = encode_prompts(pipe, captions)
    z_t = q_sample(z0, eps, t, pipe.scheduler.alphas_cumprod)
    plain = Denoiser(pipe.unet, pipe.scheduler.alphas_cumprod).eps(z_t, t, c)
    ctrl = controlled_eps(pipe.unet, controlnet, z_t, t, c, control)
    return {"eps_mse_teacher": F.mse_loss(plain, eps).item(), "eps_mse_with_control": F.mse_loss(ctrl, eps).item()}


def run(params: Params, paths: Paths) -> dict:
    p = params.controlnet
    if not p.enabled or params.teacher.source.pretrained:
        why = "controlnet.enabled is false" if not p.enabled else "a real teacher (use a published ControlNet for it)"
        log.info("controlnet: skipped (%s)", why)
        info = {"trained": False, "reason": why}
        with atomic_dir(paths.controlnet) as out:  # the stage's output exists either way (a DVC out)
            (out / "skipped.txt").write_text(why + "\n")
        atomic_write_json(paths.metrics / "controlnet.json", info)
        atomic_write_json(paths.metrics / "controlnet_history.json", [])
        return info
    D.check_batch(p.batch_size, "controlnet.batch_size")
    dev = D.device()
    pipe = load_frozen_teacher(params.teacher, paths.teacher).to(dev)
    torch.manual_seed(p.seed)
    controlnet = build_controlnet(pipe.unet, pipe.vae_scale_factor).to(dev).train()
    D.broadcast_from_main(controlnet.parameters())
    opt = torch.optim.AdamW(controlnet.parameters(), lr=p.lr, weight_decay=0.0)
    ac = pipe.scheduler.alphas_cumprod.to(dev)

    def step_fn(step: int) -> dict[str, float]:
        for g in opt.param_groups:
            g["lr"] = p.lr * cosine_warmup(step, min(20, p.steps // 10), p.steps)
        # the GLOBAL batch on every process (renders, noise, dropout), then this process's shard
        z0, control, captions, t, eps, gen = _batch(pipe, p.seed, step, p.batch_size, params.world)
        keep = torch.rand(len(captions), generator=gen) >= p.cond_drop
        z0, control, t, eps, keep = (D.shard(x).to(dev) for x in (z0, control, t, eps, keep))
        with torch.no_grad():
            c = encode_prompts(pipe, D.shard(captions)).masked(keep)
        pred = controlled_eps(pipe.unet, controlnet, q_sample(z0, eps, t, ac), t, c, control)
        terms = {"eps_mse": F.mse_loss(pred, eps)}
        ensure_finite(terms, "controlnet", step)
        optimizer_step(opt, terms["eps_mse"], controlnet.parameters(), max_norm=1.0)
        return {k: v.item() for k, v in terms.items()}

    ckpt = checkpointer("controlnet", params, paths)
    res = run_loop("controlnet", p.steps, step_fn, {"controlnet": controlnet, "opt": opt}, ckpt, p.checkpoint_every,
                   max_minutes=p.max_minutes)
    controlnet.eval().to("cpu")
    pipe.to("cpu")
    info = {"trained": True, "steps": res.steps_done, "train_seconds": res.seconds, "world_size": D.world_size(),
            **heldout_mse(pipe, controlnet, params)}
    if D.is_main():
        with atomic_dir(paths.controlnet) as out:
            controlnet.save_pretrained(out, safe_serialization=True)
        atomic_write_json(paths.metrics / "controlnet.json", info)
    D.barrier()
    log.info("controlnet: %d steps in %.0fs; held-out ε-MSE %.4f with the control, %.4f without -> %s",
             res.steps_done, res.seconds, info["eps_mse_with_control"], info["eps_mse_teacher"], paths.controlnet)
    return info

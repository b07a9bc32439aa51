"""Where a teacher training step's time goes (issue 16 item 5: profile first).

    python experiments/profile_teacher.py --artifacts artifacts [--threads 2] [--steps 6]

Times the parts of one `teacher` step as tasks/teacher.py runs it (render, VAE encode, text encoders,
UNet forward, backward, optimiser + EMA) on the mini preset's shapes, and compares variants that could
make it faster: torch threads, channels_last, bf16 autocast (the CPU has AVX512-BF16 on this machine
kind), torch.compile of the UNet. Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from models.denoiser import Denoiser, encode_prompts
from models.diffusion import q_sample
from tasks.teacher import build_pipeline
from tlcm.shapes import render as R
from tlcm.core.params import load_params
from tlcm.core.paths import Paths


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def profile(params, paths, steps: int, variant: str) -> dict:
    p, wp = params.teacher, params.world
    torch.manual_seed(0)
    pipe = build_pipeline(params, paths)
    unet, vae = pipe.unet, pipe.vae
    trainable = [*unet.parameters(), *pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]
    opt = torch.optim.AdamW(trainable, lr=p.lr)
    ema = EMAModel(trainable, decay=p.ema_decay)
    if variant == "channels_last":
        unet.to(memory_format=torch.channels_last)
    fwd_unet = torch.compile(unet) if variant == "compile" else unet
    model = Denoiser(fwd_unet, pipe.scheduler.alphas_cumprod)
    bf16 = variant == "bf16"
    parts: dict[str, list[float]] = {}
    for step in range(steps + 2):
        t: dict[str, float] = {}
        (specs, imgs), t["render"] = timed(lambda: R.train_batch(p.seed, step, p.batch_size, wp.two_object_frac, wp.image_size))
        with torch.no_grad():
            z0, t["vae_encode"] = timed(lambda: vae.encode(R.to_unit_tensor(imgs) * 2 - 1).latent_dist.mean
                                        * vae.config.scaling_factor)
        if variant == "channels_last":
            z0 = z0.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            cond, t["text_encoders"] = timed(lambda: encode_prompts(pipe, [s.caption() for s in specs]))
            tt = torch.randint(0, 1000, (len(specs),))
            eps = torch.randn_like(z0)
            pred, t["unet_forward"] = timed(lambda: model.eps(q_sample(z0, eps, tt, model.alphas_cumprod), tt, cond))
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        _, t["backward"] = timed(loss.backward)
        _, t["optimizer_ema"] = timed(lambda: (opt.step(), ema.step(trainable)))
        if step >= 2:  # the first two steps warm up (and compile)
            for k, v in t.items():
                parts.setdefault(k, []).append(v)
    mean = {k: sum(v) / len(v) for k, v in parts.items()}
    return {"variant": variant, "threads": torch.get_num_threads(), "seconds_per_step": sum(mean.values()),
            "parts": mean, "batch_size": p.batch_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", default="eager,channels_last,bf16,compile")
    ap.add_argument("--out", default="experiments/profile_teacher.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params, paths = load_params("params.yaml"), Paths(Path(a.artifacts))
    rows = []
    for v in a.variants.split(","):
        rows.append(profile(params, paths, a.steps, v))
        print(json.dumps(rows[-1]), flush=True)
    Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

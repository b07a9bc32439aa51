"""Stage `latent_lpips`: train the latent LPIPS from scratch on VAE-encoded BAPPS 2AFC triplets (TLCM §4.3).

Every triplet (ref, p0, p1) of the `bapps` stage is encoded once by the
teacher's VAE (``latent_dist.mean * scaling_factor``, the latents the teacher
diffuses). The network (:class:`models.latent_lpips.LatentLPIPS`) and LPIPS's
ranking head are trained with LPIPS's BCE ranking loss against the judges
(Zhang et al. 2018), with two label-preserving augmentations: swapping p0/p1
(judge -> 1 - judge) and a joint horizontal flip. Reported on the held-out val
triplets: the 2AFC agreement of the latent LPIPS, of latent MSE (the baseline
the paper replaces) and of the pixel-space oracle (SSIM) itself.

Outputs: ``<artifacts>/latent_lpips/{model.safetensors, ranking_head.safetensors,
config.json, metrics.json}``; load with :func:`load_latent_lpips`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from models.latent_lpips import LatentLPIPS, RankingHead, ranking_loss, two_afc_score
from tlcm.core import distributed as D
from tlcm.loaders.bapps_io import Triplets, bapps_root, load_2afc
from tlcm.core.identity import checkpointer
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError, atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors
from tlcm.shapes.render import to_unit_tensor
from tlcm.shapes.synthetic_bapps import oracle_distance
from tlcm.core.training import cosine_warmup, ensure_finite, optimizer_step, run_loop, step_generator

log = logging.getLogger("tlcm")

MODEL_FILE, HEAD_FILE, CONFIG_FILE = "model.safetensors", "ranking_head.safetensors", "config.json"


def output_dir(paths: Paths) -> Path:
    return paths.root / "latent_lpips"


def load_vae(params: Params, paths: Paths) -> AutoencoderKL:
    """The teacher's VAE, frozen: the shapes-world ``autoencoder`` stage's output, or ``<source>/vae``."""
    src = params.teacher.source
    try:
        if src.trained:
            if not (paths.autoencoder / "config.json").is_file():
                raise ArtifactError(f"autoencoder not found in {paths.autoencoder}; run `tlcm stage autoencoder` first")
            vae = AutoencoderKL.from_pretrained(paths.autoencoder, use_safetensors=True)
        else:
            vae = AutoencoderKL.from_pretrained(src.location, subfolder="vae")
    except (OSError, ValueError) as e:
        where = paths.autoencoder if src.trained else f"{src.location} (subfolder vae)"
        raise ArtifactError(f"cannot load the teacher's VAE from {where}: {e}") from e
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the teacher's latents (N, C, h, w) = ``latent_dist.mean * scaling_factor``."""
    scale = float(vae.config.scaling_factor)
    out = [vae.encode(to_unit_tensor(images[i:i + batch]) * 2 - 1).latent_dist.mean * scale
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def encode_triplets(vae: AutoencoderKL, t: Triplets) -> dict[str, torch.Tensor]:
    return {"ref": encode(vae, t.ref), "p0": encode(vae, t.p0), "p1": encode(vae, t.p1),
            "judge": torch.from_numpy(t.judge).float()}


def build(params: Params, in_channels: int = 4) -> LatentLPIPS:
    return LatentLPIPS(in_channels, params.latent_lpips.width_divisor)


def load_latent_lpips(params: Params, paths: Paths) -> LatentLPIPS:
    """The trained latent LPIPS, frozen (eval, ``requires_grad_(False)``); call ``net(x, y) -> (N,)``
    on latents (N, C, H, W). Missing or corrupt files raise :class:`ArtifactError` naming them."""
    out = output_dir(paths)
    cfg_path = out / CONFIG_FILE
    cfg = read_json(cfg_path, "latent LPIPS", "run `tlcm stage latent_lpips` first")
    try:
        net = LatentLPIPS(int(cfg["in_channels"]), int(cfg["width_divisor"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"latent LPIPS config is corrupt: {cfg_path} ({e}); re-run `tlcm stage latent_lpips`") from e
    state = load_tensors(out / MODEL_FILE, what="latent LPIPS weights")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"latent LPIPS weights do not match {cfg_path}: {out / MODEL_FILE} ({e}); "
                            "re-run `tlcm stage latent_lpips`") from e
    return net.eval().requires_grad_(False)


@torch.no_grad()
def lpips_distances(net: LatentLPIPS, lat: dict[str, torch.Tensor], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    d0, d1 = [], []
    for i in range(0, len(lat["judge"]), batch):
        a, b = net.triplet_distances(lat["ref"][i:i + batch], lat["p0"][i:i + batch], lat["p1"][i:i + batch])
        d0.append(a)
        d1.append(b)
    return torch.cat(d0), torch.cat(d1)


def agreement(d0, d1, judge) -> float:
    return float(two_afc_score(d0, d1, judge).mean())


def run(params: Params, paths: Paths) -> dict:
    p = params.latent_lpips
    root = bapps_root(params, paths)
    train_t = load_2afc(root, "train", limit=p.max_train_triplets)
    val_t = load_2afc(root, "val")
    vae = load_vae(params, paths)
    lat = encode_triplets(vae, train_t)
    val = encode_triplets(vae, val_t)
    del vae
    n = len(train_t)
    log.info("latent_lpips: %d train / %d val triplets encoded to latents %s", n, len(val_t), tuple(lat["ref"].shape[1:]))

    D.check_batch(p.batch_size, "latent_lpips.batch_size")
    torch.manual_seed(p.seed)
    net = build(params, lat["ref"].shape[1])
    head = RankingHead()
    net.to(D.device()), head.to(D.device())
    D.broadcast_from_main([*net.parameters(), *head.parameters()])
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=p.lr)
    warmup = min(100, p.steps // 10)

    def step_fn(step: int) -> dict[str, float]:
        for g in opt.param_groups:
            g["lr"] = p.lr * cosine_warmup(step, warmup, p.steps, floor=0.05)
        gen = step_generator(p.seed, step)
        idx = torch.randint(n, (p.batch_size,), generator=gen)
        ref, p0, p1, judge = lat["ref"][idx], lat["p0"][idx], lat["p1"][idx], lat["judge"][idx]
        swap = torch.rand(p.batch_size, generator=gen) < 0.5  # p0 <-> p1, judge -> 1 - judge
        sw = swap.view(-1, 1, 1, 1)
        p0, p1 = torch.where(sw, p1, p0), torch.where(sw, p0, p1)
        judge = torch.where(swap, 1 - judge, judge)
        flip = (torch.rand(p.batch_size, generator=gen) < 0.5).view(-1, 1, 1, 1)
        ref, p0, p1 = (torch.where(flip, z.flip(-1), z) for z in (ref, p0, p1))
        ref, p0, p1, judge = (D.shard(z).to(D.device()) for z in (ref, p0, p1, judge))  # global batch above; this shard
        d0, d1 = net.triplet_distances(ref, p0, p1)
        loss = ranking_loss(head, d0, d1, judge)
        ensure_finite({"bce": loss}, "latent_lpips", step)
        optimizer_step(opt, loss, [*net.parameters(), *head.parameters()], max_norm=None)
        with torch.no_grad():
            agree = two_afc_score(d0, d1, judge).mean()
        return {"bce": loss.item(), "2afc": agree.item()}

    ckpt = checkpointer("latent_lpips", params, paths)
    res = run_loop("latent_lpips", p.steps, step_fn, {"net": net, "head": head, "opt": opt}, ckpt, p.checkpoint_every,
                   log_every=25, max_minutes=p.max_minutes)

    net.eval().to("cpu")
    head.eval().to("cpu")
    d0, d1 = lpips_distances(net, val)
    mse0 = (val["ref"] - val["p0"]).pow(2).mean(dim=(1, 2, 3))
    mse1 = (val["ref"] - val["p1"]).pow(2).mean(dim=(1, 2, 3))
    o0, o1 = oracle_distance(val_t.ref, val_t.p0), oracle_distance(val_t.ref, val_t.p1)
    j = val["judge"]
    metrics = {
        "val_2afc": {
            "latent_lpips": agreement(d0, d1, j),
            "latent_mse": agreement(mse0, mse1, j),
            "pixel_oracle_ssim": agreement(o0, o1, j),
        },
        "val_triplets": len(val_t),
        "train_triplets": n,
        "latent_shape": list(lat["ref"].shape[1:]),
        "steps": res.steps_done,
        "train_seconds": res.seconds,
        "final_train_bce": res.history[-1]["bce"] if res.history else None,
        "bapps_root": str(root),
        "world_size": D.world_size(),
    }
    config = {**net.config(), "taps": ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"],
              "pools_removed": 3, "latent_scaling": "latent_dist.mean * vae.config.scaling_factor",
              "teacher_source": str(params.teacher.source), "paper": "arXiv 2406.05768 §4.3"}
    if D.is_main():
        with atomic_dir(output_dir(paths)) as out:
            save_tensors(out / MODEL_FILE, net.state_dict())
            save_tensors(out / HEAD_FILE, head.state_dict())
            (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        atomic_write_json(paths.metrics / "latent_lpips.json", metrics)
    D.barrier()
    a = metrics["val_2afc"]
    log.info("latent_lpips: val 2AFC agreement latent LPIPS %.4f, latent MSE %.4f, pixel oracle (SSIM) %.4f",
             a["latent_lpips"], a["latent_mse"], a["pixel_oracle_ssim"])
    return metrics

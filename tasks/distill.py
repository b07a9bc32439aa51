"""The consistency-distillation loop shared by `mlcd`, `ilcd` and `lcm_baseline`.

Data-free: only prompts (the world's train prompts, or a prompt file for real
teachers) and Gaussian noise; every latent the student sees comes from the
teacher's ODE (MLCD, Alg. 1) or from the student itself re-noised (iLCD, Alg. 2).
One UNet in memory: the teacher is the same UNet with its adapters disabled.
"""
from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from models.denoiser import Denoiser, encode_prompts
from models.lora import FrozenTeacher, add_lora, lora_parameters
from models.tlcm import ilcd_terms, milestones, mlcd_pair, mlcd_terms
from tlcm import distributed as D
from tlcm.identity import checkpointer
from tlcm.lora_io import AdapterState, load_lora_into, save_lora
from tlcm.params import ConsistencyParams, Params
from tlcm.paths import Paths
from tlcm.storage import atomic_write_json
from tlcm.teacher_io import autocast, float32_, load_frozen_teacher
from tlcm.training import ensure_finite, run_loop, step_generator

log = logging.getLogger("tlcm")

Kind = Literal["mlcd", "ilcd"]


def mse_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x, y)


def make_distance(p: ConsistencyParams, params: Params, paths: Paths) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """d(·,·) of Eq. 7/10: latent MSE, or the trained latent LPIPS (mean over the batch: under several
    processes, the local shard's mean, whose average over processes is the global batch's)."""
    if p.loss == "mse":
        return mse_distance
    from tasks.latent_lpips import load_latent_lpips

    net = load_latent_lpips(params, paths).to(D.device())
    return lambda x, y: net(x, y).mean()


class QuickEval:
    """Periodic small evaluation (the consistency loss says little about progress, DESIGN §6):
    alignment accuracy of few-step samples on held-out prompts, judged by the evaluator."""

    def __init__(self, params: Params, paths: Paths, pipe, stage: str, n_prompts: int, steps: tuple[int, ...] = (2, 4)):
        from diffusers import LCMScheduler

        from models.scheduler import TLCMScheduler
        from tasks.evaluator import load_evaluator
        from tasks.world import read_prompts

        self.pipe, self.stage, self.steps = pipe, stage, steps
        self.specs = read_prompts(paths, "eval")[:n_prompts]
        self.net = load_evaluator(params, paths)
        cls = LCMScheduler if params.section(stage).num_segments == 1 else TLCMScheduler
        self.scheduler = cls.from_config(pipe.scheduler.config)
        self.history: list[dict] = []

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        from tasks.evaluator import accuracy
        from tasks.generate import student_samples
        from tlcm import tracking
        from tlcm import render as R

        out: dict = {"step": step}
        for n in self.steps:
            s = student_samples(self.pipe, [x.caption() for x in self.specs], n, 0, 64, self.scheduler)
            out[f"eval_alignment_{n}step"] = accuracy(self.net, R.to_unit_tensor(s.images), self.specs)["all"]
        self.history.append(out)
        tracking.log_step(self.stage, step, {k: v for k, v in out.items() if k != "step"})
        log.info("%s: step %d quick eval %s", self.stage, step, {k: round(v, 3) for k, v in out.items() if k != "step"})
        return out


def train_prompts(params: Params, paths: Paths) -> list[str]:
    """The data-free stages' only data: ``params.prompts`` (the world's train prompts, or a caption file)."""
    from tlcm.prompt_sources import read_prompts

    return read_prompts(params, paths)


def distill(params: Params, paths: Paths, stage: str, kind: Kind, init_from: str | None) -> dict:
    """Train the student LoRA for ``stage`` (its params section) and save it to ``paths.lora(stage)``.

    ``init_from``: the stage whose LoRA to continue (iLCD continues MLCD's); None = a fresh LoRA.
    Under ``accelerate launch`` (:mod:`tlcm.distributed`) each process trains on its shard of the
    global batch, gradients are averaged, and the main process writes the checkpoints and the LoRA.
    """
    p: ConsistencyParams = params.section(stage)
    world = D.world_size()
    D.check_batch(p.batch_size, f"{stage}.batch_size", world)
    dev = D.device()
    pipe = load_frozen_teacher(params.teacher, paths.teacher)
    pipe.to(dev)
    unet = pipe.unet
    if init_from is None:
        torch.manual_seed(p.seed)
        add_lora(unet, p.rank)
    else:
        load_lora_into(unet, paths.lora(init_from))
    unet.to(dev)
    trainable = lora_parameters(unet)
    float32_(trainable)
    for q in trainable:
        q.requires_grad_(True)
    D.broadcast_from_main(trainable)
    ac = pipe.scheduler.alphas_cumprod.to(dev)
    student = Denoiser(unet, ac)
    teacher = FrozenTeacher(Denoiser(unet, ac))
    ms = milestones(p.num_segments)
    distance = make_distance(p, params, paths)
    prompts = train_prompts(params, paths)
    opt = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=0.0)
    side, ch = unet.config.sample_size, unet.config.in_channels
    quick = None
    if (p.eval_every and D.is_main() and params.teacher.source == "train"
            and (paths.evaluator / "model.safetensors").is_file()):
        quick = QuickEval(params, paths, pipe, stage, p.eval_prompts)

    def step_fn(step: int) -> dict[str, float]:
        if quick is not None and step % p.eval_every == 0:
            quick(step)
        with autocast(params.teacher, dev):
            return _step(step)

    def _step(step: int) -> dict[str, float]:
        # the GLOBAL batch, drawn identically on every process, then this process's shard
        gen = step_generator(p.seed, step)
        B = p.batch_size
        idx = torch.randint(len(prompts), (B,), generator=gen)
        eps = torch.randn((B, ch, side, side), generator=gen)
        with torch.no_grad():
            cond = encode_prompts(pipe, [prompts[i] for i in D.shard(idx)])
        if kind == "mlcd":
            seg = torch.randint(p.num_segments, (B,), generator=gen)
            lo, hi = torch.tensor(ms)[seg], torch.tensor(ms)[seg + 1]
            t_m = lo + 1 + (torch.rand(B, generator=gen) * (hi - lo)).long().clamp(max=(hi - lo - 1))
            eps, t_m = D.shard(eps).to(dev), D.shard(t_m).to(dev)
            z_tm, z_tn, t_n, t_s = mlcd_pair(teacher, eps, t_m, p.skip, cond, p.guidance_scale, ms)
            terms = mlcd_terms(student, z_tm, z_tn, t_m, t_n, t_s, cond, distance)
        else:
            t_m = torch.tensor(ms)[torch.randint(1, p.num_segments + 1, (B,), generator=gen)]
            noise = torch.randn(eps.shape, generator=gen)
            eps, noise, t_m = D.shard(eps).to(dev), D.shard(noise).to(dev), D.shard(t_m).to(dev)
            terms = ilcd_terms(student, teacher, eps, noise, t_m, p.student_steps_q, p.teacher_steps_p, cond,
                               p.guidance_scale, ms, distance)
        ensure_finite(terms, stage, step)
        loss = terms["consistency"]  # a mean over the local shard: the mean of the shards' gradients is the global one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        D.average_gradients(trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return {k: v.item() for k, v in terms.items()}

    ckpt = checkpointer(stage, params, paths)
    lora_state = AdapterState(unet)
    res = run_loop(stage, p.steps, step_fn, {"lora": lora_state, "opt": opt}, ckpt, p.checkpoint_every,
                   max_minutes=p.max_minutes)
    if quick is not None:
        quick(res.steps_done)
    info = {"stage": stage, "kind": kind, "init_from": init_from, "teacher": params.teacher.source,
            "params": p.model_dump(mode="json"), "steps": res.steps_done, "train_seconds": res.seconds,
            "world_size": world, "real_images_used": 0}
    metrics = {"steps": res.steps_done, "train_seconds": res.seconds, **D.compute_record(),
               "final_consistency": res.history[-1]["consistency"] if res.history else None,
               "quick_evals": quick.history if quick is not None else []}
    if D.is_main():
        save_lora(paths.lora(stage), unet, info)
        atomic_write_json(paths.metrics / f"{stage}.json", metrics)
        log.info("%s: %d steps in %.0fs on %d process(es) -> %s", stage, res.steps_done, res.seconds, world,
                 paths.lora(stage))
    D.barrier()
    return metrics

"""What the technique stages (`mps`, `dmgan`) share: the student set-up on top of an earlier
stage's LoRA, the Eq. 9 batch, the ablation pass-through, and the save.

Same conventions as :mod:`tasks.distill`: one UNet in memory (teacher = adapters off), the
unified ``student`` LoRA continued from ``init_from``, data-free (prompts and noise only).
"""
from __future__ import annotations

import json
import logging
import resource
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator

from models.denoiser import Cond, Denoiser, encode_prompts
from models.lora import STUDENT, FrozenTeacher, lora_parameters
from models.tlcm import ilcd_inputs, milestones
from tasks.distill import make_distance, train_prompts
from tlcm.lora_io import load_lora_into, save_lora
from tlcm.params import Params
from tlcm.paths import Paths
from tlcm.storage import atomic_dir, atomic_write_json
from tlcm.teacher_io import autocast, float32_, load_frozen_teacher

log = logging.getLogger("tlcm")
M_SEGMENTS = 8


@dataclass
class Student:
    """The loaded pipeline and the views of its one UNet that the losses call."""
    accelerator: Accelerator
    pipe: object
    unet: object
    student: Denoiser
    teacher: FrozenTeacher
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    prompts: list[str]
    ms: list[int]
    shape: tuple[int, int, int]

    @property
    def trainable(self) -> list:
        return lora_parameters(self.unet, STUDENT)


def setup_student(params: Params, paths: Paths, init_from: str, section) -> Student:
    """``section``: the stage's params (its ``loss`` picks the consistency distance)."""
    pipe = load_frozen_teacher(params.teacher, paths.teacher)
    unet = pipe.unet
    load_lora_into(unet, paths.lora(init_from))
    unet.set_adapter(STUDENT)
    float32_(lora_parameters(unet, STUDENT))
    for q in lora_parameters(unet, STUDENT):
        q.requires_grad_(True)
    ac = pipe.scheduler.alphas_cumprod
    cfg = unet.config
    return Student(Accelerator(), pipe, unet, Denoiser(unet, ac), FrozenTeacher(Denoiser(unet, ac)),
                   make_distance(section, params, paths), train_prompts(params, paths), milestones(M_SEGMENTS),
                   (cfg.in_channels, cfg.sample_size, cfg.sample_size))


@dataclass
class Eq9Batch:
    prompts: list[str]
    cond: Cond
    z0: torch.Tensor  # ẑ_0: q-step student sample (no grad)
    z_t: torch.Tensor  # ẑ_{t_m} = FD(ẑ_0, t_m)
    t: torch.Tensor  # t_m, a milestone > 0


def eq9_batch(s: Student, batch_size: int, q: int, gen: torch.Generator) -> Eq9Batch:
    """Prompts, ẑ_0 = TLCM(ε, T, c) in q student steps, and ẑ_{t_m} at a random milestone (Eq. 9)."""
    idx = torch.randint(len(s.prompts), (batch_size,), generator=gen)
    prompts = [s.prompts[i] for i in idx]
    with torch.no_grad():
        cond = encode_prompts(s.pipe, prompts)
    eps = torch.randn((batch_size, *s.shape), generator=gen)
    noise = torch.randn(eps.shape, generator=gen)
    t_m = torch.tensor(s.ms)[torch.randint(1, len(s.ms), (batch_size,), generator=gen)]
    z0, z_t = ilcd_inputs(s.student, eps, noise, t_m, q, cond)
    return Eq9Batch(prompts, cond, z0, z_t, t_m)


def passthrough(paths: Paths, stage: str, init_from: str) -> dict:
    """``enabled: false``: the stage's LoRA is its input LoRA, unchanged (an ablation that keeps the DAG)."""
    src, meta_file = paths.lora(init_from), paths.lora(init_from) / "tlcm_lora.json"
    meta = json.loads(meta_file.read_text())
    with atomic_dir(paths.lora(stage)) as out:
        for f in src.iterdir():
            if f.is_file() and f.name != "tlcm_lora.json":
                shutil.copy2(f, out / f.name)
        (out / "tlcm_lora.json").write_text(json.dumps({**meta, "stage": stage, "passthrough_of": init_from,
                                                        "enabled": False}, indent=2, sort_keys=True, default=str))
    metrics = {"steps": 0, "train_seconds": 0.0, "enabled": False, "passthrough_of": init_from}
    atomic_write_json(paths.metrics / f"{stage}.json", metrics)
    log.info("%s: disabled (%s.enabled: false); %s is %s unchanged", stage, stage, paths.lora(stage), paths.lora(init_from))
    return metrics


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_student(s: Student, paths: Paths, stage: str, info: dict, metrics: dict) -> dict:
    save_lora(paths.lora(stage), s.accelerator.unwrap_model(s.unet), {"stage": stage, "real_images_used": 0, **info})
    metrics = {**metrics, "peak_rss_mib": peak_rss_mib(), "enabled": True}
    atomic_write_json(paths.metrics / f"{stage}.json", metrics)
    log.info("%s: %s steps in %.0fs -> %s (peak RSS %.0f MiB)", stage, metrics.get("steps"),
             metrics.get("train_seconds", 0.0), paths.lora(stage), metrics["peak_rss_mib"])
    return metrics



def autocast_steps(teacher_params, device, step: Callable[[int], dict[str, float]]) -> Callable[[int], dict[str, float]]:
    """The training step under the teacher's mixed precision (a no-op for float32 weights)."""
    def run(i: int) -> dict[str, float]:
        with autocast(teacher_params, device):
            return step(i)
    return run

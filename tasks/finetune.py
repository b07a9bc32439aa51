"""What the technique stages (`mps`, `dmgan`) share: the student (:func:`tasks.distill.student_of`) on top of an
earlier stage's LoRA, the Eq. 9 batch, the ablation pass-through, and the save.

Same conventions as :mod:`tasks.distill`: one UNet in memory (teacher = adapters off), the
unified ``student`` LoRA continued from ``init_from``, data-free (prompts and noise only), and the
multi-process contract of :mod:`tlcm.core.distributed`: every random draw of a step is made for the
GLOBAL batch on every process (:func:`draw_randn`, :func:`draw_randint`) and each process keeps its
shard, so N processes give the one-process result.
"""
from __future__ import annotations

import json
import logging
import resource
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from models.denoiser import Cond, encode_prompts
from models.tlcm import ilcd_inputs, sample_t_ilcd
from tasks.distill import Student
from tlcm.core import distributed as D
from tlcm.loaders.lora_io import save_lora
from tlcm.core.paths import Paths
from tlcm.core.storage import atomic_dir, atomic_write_json

if TYPE_CHECKING:  # the params classes need pydantic; these modules run without it (tlcm check-gpu)
    from tlcm.core.params import Params

log = logging.getLogger("tlcm")
M_SEGMENTS = 8  # the technique stages' milestones (TLCM's M)


def draw_randn(gen: torch.Generator, batch_size: int, *shape: int) -> torch.Tensor:
    """Standard normal draws for the GLOBAL batch (identical on every process); this process's shard."""
    return D.shard(torch.randn((batch_size, *shape), generator=gen)).to(D.device())


def draw_randint(gen: torch.Generator, low: int, high: int, batch_size: int) -> torch.Tensor:
    """Integers in [low, high) for the GLOBAL batch; this process's shard."""
    return D.shard(torch.randint(low, high, (batch_size,), generator=gen)).to(D.device())


@dataclass
class Eq9Batch:
    prompts: list[str]  # this process's shard
    global_prompts: list[str]  # the whole step's prompts (draws that depend on them stay global)
    cond: Cond
    z0: torch.Tensor  # ẑ_0: q-step student sample (no grad)
    z_t: torch.Tensor  # ẑ_{t_m} = FD(ẑ_0, t_m)
    t: torch.Tensor  # t_m, a milestone > 0


def eq9_batch(s: Student, batch_size: int, q: int, gen: torch.Generator) -> Eq9Batch:
    """Prompts, ẑ_0 = TLCM(ε, T, c) in q student steps, and ẑ_{t_m} at a random milestone (Eq. 9).

    ``batch_size`` is the global batch; the student runs on this process's shard only."""
    idx = torch.randint(len(s.prompts), (batch_size,), generator=gen)
    prompts = [s.prompts[i] for i in idx]
    mine = D.shard(prompts)
    with torch.no_grad():
        cond = encode_prompts(s.pipe, mine)
    eps = draw_randn(gen, batch_size, *s.shape)
    noise = draw_randn(gen, batch_size, *s.shape)
    t_m = D.shard(sample_t_ilcd(s.ms, batch_size, gen)).to(D.device())  # a milestone t_m > 0 (Alg. 2)
    z0, z_t = ilcd_inputs(s.student, eps, noise, t_m, q, cond)
    return Eq9Batch(mine, prompts, cond, z0, z_t, t_m)


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
    """The main process writes the LoRA and the metrics (atomically); the others wait."""
    world = D.world_size()
    metrics = {**metrics, "peak_rss_mib": peak_rss_mib(), "enabled": True, **D.compute_record()}
    if D.is_main():
        meta = {"stage": stage, "teacher": s.source, "real_images_used": 0, "world_size": world, **info}
        save_lora(paths.lora(stage), s.unet, meta)
        atomic_write_json(paths.metrics / f"{stage}.json", metrics)
        log.info("%s: %s steps in %.0fs on %d process(es) -> %s (peak RSS %.0f MiB per process)", stage,
                 metrics.get("steps"), metrics.get("train_seconds", 0.0), world, paths.lora(stage), metrics["peak_rss_mib"])
    D.barrier()
    return metrics

"""Stage `ilcd`: improved data-free LCD across the segment milestones (paper §4.2, Algorithm 2, Eq. 9–10).

Continues the LoRA that `mlcd` trained (one unified LoRA through all stages). Its batch: a milestone t_m
(:func:`models.tlcm.sample_t_ilcd`; ``timesteps: uniform``: t_m over the whole range and t_n one segment
below, Table 2's L_lcd2), ẑ_{t_m} = FD(ẑ_0, t_m) with ẑ_0 from q student steps (Eq. 9), the target
from p teacher CFG-DDIM steps over one segment; loss d(f_θ(ẑ_{t_m}), nograd f_θ(ẑ_{t_n})) (Eq. 10)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.tlcm import STAGE2_TIMESTEPS, ilcd_terms
from tasks.distill import Batches, Student, distill, prompts_and_noise
from tlcm.core import distributed as D
from tlcm.core.paths import Paths
from tlcm.core.training import step_generator

if TYPE_CHECKING:  # the params classes need pydantic; these modules run without it (tlcm check-gpu)
    from tlcm.core.params import IlcdParams, Params


def ilcd_batch(s: Student, p: IlcdParams, step: int) -> dict[str, torch.Tensor]:
    """Alg. 2: prompts, ε, t_m and the forward-diffusion noise for the global batch; this process's Eq. 10 terms."""
    gen = step_generator(p.seed, step)
    cond, eps = prompts_and_noise(s, p.batch_size, gen)
    sample_t, target_t = STAGE2_TIMESTEPS[p.timesteps]
    t_m = sample_t(s.ms, p.batch_size, gen)
    noise = torch.randn(eps.shape, generator=gen)
    eps, noise, t_m = (D.shard(x).to(D.device()) for x in (eps, noise, t_m))
    return ilcd_terms(s.student, s.teacher, eps, noise, t_m, p.student_steps_q, p.teacher_steps_p, cond,
                      p.guidance_scale, s.ms, s.distance, t_n=target_t(t_m, s.ms))


def batches(s: Student, p: IlcdParams) -> Batches:
    return Batches("ilcd", lambda step: ilcd_batch(s, p, step), lambda: {"teacher_path": "ilcd"})


def run(params: Params, paths: Paths) -> dict:
    return distill(params, paths, "ilcd", batches, init_from="mlcd")

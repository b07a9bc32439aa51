"""Stage `mlcd`: data-free multistep latent consistency distillation (paper §4.1, Algorithm 1, Eq. 7–8).

Its batch: t_m uniform within a random segment (:func:`models.tlcm.sample_t_mlcd`); z_{t_m} from z_T = ε by the
multistep denoising strategy with the CFG teacher (``mds: single``: one step, Table 2's L_mlcd-s) and z_{t_n} one CFG-DDIM step of ``skip`` below it
(:func:`models.tlcm.mlcd_pair`, ``teacher_path: mds``), or the same pairs read from the teacher-trajectory buffer
(``teacher_path: buffer``, :mod:`tasks.teacher_buffer`); loss d(g_θ(z_{t_m}), nograd g_θ(z_{t_n})) (Eq. 7).
`lcm_baseline` trains on the same batches with one segment.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.denoiser import encode_prompts
from models.tlcm import DENOISING, mlcd_pair, mlcd_terms, sample_t_mlcd
from tasks.distill import Batches, Student, distill, prompts_and_noise
from tasks.teacher_buffer import BufferRule, TeacherBuffer
from tlcm.core import distributed as D
from tlcm.core.paths import Paths
from tlcm.core.training import step_generator

if TYPE_CHECKING:  # the params classes need pydantic; these modules run without it (tlcm check-gpu)
    from tlcm.core.params import MlcdParams, Params


def mds_batch(s: Student, p: MlcdParams, step: int) -> dict[str, torch.Tensor]:
    """Alg. 1 from fresh noise: prompts, ε, t_m for the global batch; this process's pairs and Eq. 7 terms."""
    gen = step_generator(p.seed, step)
    cond, eps = prompts_and_noise(s, p.batch_size, gen)
    t_m = sample_t_mlcd(s.ms, p.batch_size, gen)
    eps, t_m = D.shard(eps).to(D.device()), D.shard(t_m).to(D.device())
    z_tm, z_tn, t_n, t_s = mlcd_pair(s.teacher, eps, t_m, p.skip, cond, p.guidance_scale, s.ms,
                                     denoising=DENOISING[p.mds])
    return mlcd_terms(s.student, z_tm, z_tn, t_m, t_n, t_s, cond, s.distance)


def buffer_batch(s: Student, buffer: TeacherBuffer, step: int) -> dict[str, torch.Tensor]:
    """Alg. 1's pairs read from the teacher-trajectory buffer; Eq. 7 terms."""
    b = buffer.pairs(step)
    with torch.no_grad():
        cond = encode_prompts(s.pipe, b.prompts)
    return mlcd_terms(s.student, b.z_tm, b.z_tn, b.t_m, b.t_n, b.t_s, cond, s.distance)


def batches(s: Student, p: MlcdParams) -> Batches:
    """MLCD's batches by ``p.teacher_path``: ``mds`` (Alg. 1 from fresh noise every step) or ``buffer``."""
    if p.teacher_path == "buffer":
        buffer = TeacherBuffer(p, s.pipe, s.teacher, s.prompts, s.ms, s.shape)
        return Batches("mlcd", lambda step: buffer_batch(s, buffer, step),
                       lambda: {"teacher_path": "buffer", "buffer": buffer.stats()}, {"buffer": BufferRule(p)})
    return Batches("mlcd", lambda step: mds_batch(s, p, step), lambda: {"teacher_path": "mds"})


def run(params: Params, paths: Paths) -> dict:
    return distill(params, paths, "mlcd", batches, init_from=None)

"""Stage `mps`: MPS preference optimisation (paper §4.3, Eq. 11) on the unified LoRA after `ilcd`.

Each step: ẑ_{t_m} from Eq. 9, x̂_0 = f_θ(ẑ_{t_m}) (one student evaluation, with grad), decoded by
the frozen VAE and scored by the frozen reward model under ``mps.condition`` for its own prompt
(c_pos) and an irrelevant one (c_neg). The loss keeps iLCD's consistency term beside L_mps, as the
paper's ablation combines them: L = w_c·L_ilcd + w_mps·L_mps. Gradients reach only the student LoRA.

s_0: MPS uses 16, near the top of its score range on preferred images. A different scorer needs
its own scale: with ``mps.margin: null`` s_0 is the reward model's mean score of clean, aligned
renders of held-out prompts under the condition (``margin_auto``, measured by the `reward` stage).
"""
from __future__ import annotations

import json
import logging
from typing import Callable, TYPE_CHECKING

import torch

from models.preference import irrelevant_prompts, mps_terms
from models.tlcm import f_theta_x0, ilcd_target
from tasks.distill import Student, autocast_steps, setup_student
from tasks.finetune import M_SEGMENTS, eq9_batch, passthrough, save_student
from tasks.student_eval import final_eval_block
from tlcm.core import distributed as D
from tlcm.loaders.lora_io import AdapterState
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import decode_latents, frozen_dtype, upcast_vae
from tlcm.core.training import ensure_finite, optimizer_step, run_loop, step_generator

if TYPE_CHECKING:  # the params classes need pydantic; these modules run without it (tlcm check-gpu)
    from tlcm.core.params import MpsParams, Params

log = logging.getLogger("tlcm")
INIT_FROM = "ilcd"


def decode_to_unit(vae, z0: torch.Tensor) -> torch.Tensor:
    """Latent x̂_0 → image in [0, 1] through the VAE decoder (differentiable; float32 where the VAE needs it)."""
    return (decode_latents(vae, z0) / 2 + 0.5).clamp(0, 1)


def margin(p, paths: Paths) -> float:
    """s0: ``mps.margin``, else the reward model's ``margin_auto`` for the condition (its config.json)."""
    if p.margin is not None:
        return float(p.margin)
    cfg = paths.reward / "config.json"
    auto = (json.loads(cfg.read_text()).get("margin_auto") or {}) if cfg.is_file() else {}
    if p.condition not in auto:
        raise ValueError(f"mps.margin is null but the reward model ({cfg}) records no margin for condition "
                         f"'{p.condition}' (it has {sorted(auto)}); set mps.margin in params.yaml (MPS checkpoints: 16)")
    return float(auto[p.condition])


def make_step(s: Student, scorer, s0: float, p: MpsParams, opt: torch.optim.Optimizer,
              teacher_params) -> Callable[[int], dict[str, float]]:
    """One `mps` training step (Eq. 11 + the iLCD term) under the teacher's mixed precision."""
    vae = s.pipe.vae.requires_grad_(False)
    upcast_vae(vae, always=False)  # float16 SDXL VAE -> float32 (bf16 stays: the decoder's activations are kept)

    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(p.seed, step)
        b = eq9_batch(s, p.batch_size, p.student_steps_q, gen)
        target = ilcd_target(s.student, s.teacher, b.z_t, b.t, p.teacher_steps_p, b.cond, p.guidance_scale, s.ms)
        x0 = f_theta_x0(s.student, b.z_t, b.t, b.cond)
        images = decode_to_unit(vae, x0)
        negs = D.shard(irrelevant_prompts(b.global_prompts, s.prompts, gen))
        s_pos = scorer.score(images, b.prompts, p.condition)
        s_neg = scorer.score(images, negs, p.condition)
        terms = {"consistency": s.distance(x0, target), **mps_terms(s_pos, s_neg, s0)}
        ensure_finite(terms, "mps", step)
        loss = p.consistency_weight * terms["consistency"] + p.mps_weight * (terms["mps_pos"] + terms["mps_neg"])
        optimizer_step(opt, loss, s.trainable, 1.0)
        return {**{k: v.item() for k, v in terms.items()}, "reward_pos": s_pos.mean().item(),
                "reward_neg": s_neg.mean().item()}

    return autocast_steps(teacher_params, step_fn)


def run(params: Params, paths: Paths) -> dict:
    p = params.mps
    if not p.enabled:
        return passthrough(paths, "mps", INIT_FROM)
    from tasks.reward import load_reward
    from tlcm.core.identity import checkpointer  # needs pydantic: the rigs import this module without it

    s = setup_student(params, paths, "mps", INIT_FROM, M_SEGMENTS)
    scorer = load_reward(params, paths).to(D.device(), frozen_dtype(params.teacher))  # frozen: teacher.dtype
    s0 = margin(p, paths)
    opt = torch.optim.AdamW(s.trainable, lr=p.lr, weight_decay=0.0)
    log.info("mps: s0 = %.3f (%s), condition '%s', %d steps", s0, "params" if p.margin is not None else "reward model's "
             "clean-render mean", p.condition, p.steps)
    ckpt = checkpointer("mps", params, paths)
    res = run_loop("mps", p.steps, make_step(s, scorer, s0, p, opt, params.teacher),
                   {"lora": AdapterState(s.unet), "opt": opt}, ckpt, p.checkpoint_every,
                   log_every=10, max_minutes=p.max_minutes)
    last = res.history[-1] if res.history else {}
    return save_student(s, paths, "mps", {"init_from": INIT_FROM, "params": p.model_dump(mode="json"), "s0": s0},
                        {"steps": res.steps_done, "train_seconds": res.seconds, "s0": s0,
                         "first": res.history[0] if res.history else {}, "last": last,
                         **final_eval_block(params, paths, s.pipe, "mps")})

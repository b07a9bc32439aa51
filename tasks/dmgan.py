"""Stage `dmgan`: data-free distribution matching + adversarial learning (paper §4.3, Eq. 12–13).

Generator = the unified student LoRA (continued from `mps`). One UNet in memory, three views:
the teacher (adapters off) is the real score with CFG; adapter ``fake`` is the fake score,
trained on detached student samples with the diffusion loss; the discriminator is the teacher's
encoder (down + mid blocks; adapters off, or a ``critic`` adapter when ``disc_tune: lora``) with a
small trainable head. Noisy inputs are data-free (Eq. 9): ẑ_{t_m} = FD(ẑ_0, t_m), ẑ_0 the q-step
student sample; z̃_0 = f_θ(ẑ_{t_m}) is one student step.

Each step: one generator update (L = w_c·L_ilcd + w_dm·L_dm + w_gan·L_gan^G), then
``critic_updates`` updates of the fake score and the discriminator, each with its own optimiser.
Per step it logs the DMD gradient norm, the fraction of non-finite gradient entries replaced,
and the discriminator's accuracy on real and fake; accuracy pinned at 1.0 for
``collapse_window`` steps is reported as a collapse in the stage log and metrics.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable, TYPE_CHECKING

import torch

from models import gan
from models.denoiser import Denoiser
from models.diffusion import q_sample
from models.dmd import dmd_gradient, dmd_loss, fake_score_loss
from models.lora import STUDENT, adapter_active, adapters_disabled, add_lora, lora_parameters
from models.tlcm import f_theta_x0, ilcd_target
from tasks.distill import Student, autocast_steps, setup_student
from tasks.finetune import M_SEGMENTS, draw_randint, draw_randn, eq9_batch, passthrough, save_student
from tasks.student_eval import final_eval_block
from tlcm.core import distributed as D
from tlcm.loaders.lora_io import AdapterState
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import float32_
from tlcm.core.training import ensure_finite, optimizer_step, run_loop, step_generator

if TYPE_CHECKING:  # the params classes need pydantic; these modules run without it (tlcm check-gpu)
    from tlcm.core.params import DmganParams, Params

log = logging.getLogger("tlcm")
INIT_FROM = "mps"
FAKE, CRITIC = "fake", "critic"


class Critics:
    """The fake score (adapter ``fake``) and the discriminator (encoder + head), with their optimisers."""

    def __init__(self, s: Student, p: DmganParams, text_dim: int):
        self.s, self.p, self.unet = s, p, s.unet
        torch.manual_seed(p.seed)  # the fake/critic LoRA A and the head start from the stage's seed
        add_lora(self.unet, p.fake_rank, FAKE)
        if p.disc_tune == "lora":
            add_lora(self.unet, p.fake_rank, CRITIC)
        self.unet.set_adapter(STUDENT)
        float32_([*lora_parameters(self.unet, FAKE), *lora_parameters(self.unet, CRITIC)])
        self.fake = Denoiser(self.unet, s.student.alphas_cumprod)
        self.head = gan.head_for(self.unet, text_dim).to(D.device())
        # random initial weights (fake/critic LoRA A, the head): every process starts from the main one's
        D.broadcast_from_main([*self.fake_params, *self.critic_params, *self.head.parameters()])
        self.opt_fake = torch.optim.AdamW(self.fake_params, lr=p.fake_lr, weight_decay=0.0)
        self.d_params = [*self.head.parameters(), *self.critic_params]
        self.opt_d = torch.optim.AdamW(self.d_params, lr=p.disc_lr, betas=(0.0, 0.99), weight_decay=0.0)

    @property
    def fake_params(self) -> list:
        return lora_parameters(self.unet, FAKE)

    @property
    def critic_params(self) -> list:
        return lora_parameters(self.unet, CRITIC) if self.p.disc_tune == "lora" else []

    def encoder(self):
        """The discriminator's encoder weights: the teacher's (adapters off) or the critic adapter."""
        return adapter_active(self.unet, CRITIC) if self.p.disc_tune == "lora" else adapters_disabled(self.unet)

    def logits(self, z: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
        return gan.discriminator_logits(self.unet, self.head, z, t, c)

    def fake_x0(self, x_t: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
        with adapter_active(self.unet, FAKE):
            return self.fake.x0(x_t, t, c)

    def update(self, z0_real: torch.Tensor, z0_fake: torch.Tensor, c, gen: torch.Generator) -> dict[str, float]:
        """One fake-score step (diffusion loss on detached student samples) and one discriminator step.

        The samples are this process's shard; the draws are made for the global batch."""
        p, ac, n = self.p, self.s.student.alphas_cumprod, self.p.batch_size
        out: dict[str, float] = {}
        if p.dm_weight > 0:
            tau = draw_randint(gen, p.dm_t_min, p.dm_t_max, n)
            noise = draw_randn(gen, n, *z0_fake.shape[1:])
            with adapter_active(self.unet, FAKE):  # forward and backward while the adapter is live
                loss = fake_score_loss(self.fake.eps(q_sample(z0_fake, noise, tau, ac), tau, c), noise)
                ensure_finite({"fake_score": loss}, "dmgan", -1)
                optimizer_step(self.opt_fake, loss, self.fake_params, None)
            out["fake_score_loss"] = loss.item()
        if p.gan_weight > 0:
            t_ = draw_randint(gen, 0, p.gan_t_max, n)
            zr = q_sample(z0_real, draw_randn(gen, n, *z0_real.shape[1:]), t_, ac)
            zf = q_sample(z0_fake, draw_randn(gen, n, *z0_fake.shape[1:]), t_, ac)
            with self.encoder():
                lr_, lf_ = self.logits(zr, t_, c), self.logits(zf, t_, c)
                loss = gan.d_loss(lr_, lf_, p.gan_loss)
                ensure_finite({"disc": loss}, "dmgan", -1)
                optimizer_step(self.opt_d, loss, self.d_params, None)
            # accuracy over the global batch (equal shards: the mean of the processes' accuracies)
            acc = D.mean_over_processes(dict(zip(("r", "f"), gan.accuracy(lr_.detach(), lf_.detach()))))
            acc_r, acc_f = acc["r"], acc["f"]
            out |= {"disc_loss": loss.item(), "disc_acc_real": acc_r, "disc_acc_fake": acc_f}
        return out


class CollapseWatch:
    """Counts windows of ``window`` consecutive steps with discriminator accuracy 1.0 on real and fake."""

    def __init__(self, window: int):
        self.recent: deque[bool] = deque(maxlen=window)
        self.collapses: list[int] = []

    def __call__(self, step: int, acc_real: float | None, acc_fake: float | None) -> None:
        if acc_real is None:
            return
        self.recent.append(acc_real >= 1.0 and acc_fake >= 1.0)
        if len(self.recent) == self.recent.maxlen and all(self.recent):
            self.collapses.append(step)
            log.warning("dmgan: discriminator collapse at step %d: accuracy 1.0 on real and fake for %d steps "
                        "(generator gets no useful signal; lower dmgan.disc_lr or dmgan.gan_weight)", step, len(self.recent))
            self.recent.clear()


def make_step(s: Student, critics: Critics, opt: torch.optim.Optimizer, p: DmganParams, watch: CollapseWatch,
              teacher_params) -> Callable[[int], dict[str, float]]:
    """One `dmgan` step (generator update, then ``critic_updates`` critic updates) under the teacher's mixed
    precision."""
    ac = s.student.alphas_cumprod

    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(p.seed, step)
        b = eq9_batch(s, p.batch_size, p.student_steps_q, gen)
        terms: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        if p.consistency_weight > 0:
            target = ilcd_target(s.student, s.teacher, b.z_t, b.t, p.teacher_steps_p, b.cond, p.guidance_scale, s.ms)
        x0 = f_theta_x0(s.student, b.z_t, b.t, b.cond)  # z̃_0: one student step from ẑ_{t_m}
        if p.consistency_weight > 0:
            terms["consistency"] = s.distance(x0, target)
        if p.dm_weight > 0:
            tau = draw_randint(gen, p.dm_t_min, p.dm_t_max, p.batch_size)
            with torch.no_grad():
                x_tau = q_sample(x0.detach(), draw_randn(gen, p.batch_size, *x0.shape[1:]), tau, ac)
                x0_real = s.teacher.x0(x_tau, tau, b.cond, p.guidance_scale)
                x0_fake = critics.fake_x0(x_tau, tau, b.cond)
            grad, bad = dmd_gradient(x0.detach(), x0_real, x0_fake)
            terms["dm"] = dmd_loss(x0, grad)
            stats |= {"dmd_grad_norm": grad.flatten(1).norm(dim=1).mean().item(), "dmd_nonfinite_frac": bad}
        gan_grad = None
        if p.gan_weight > 0:
            t_ = draw_randint(gen, 0, p.gan_t_max, p.batch_size)
            with critics.encoder():
                fake_logits = critics.logits(q_sample(x0, draw_randn(gen, p.batch_size, *x0.shape[1:]), t_, ac), t_,
                                             b.cond)
                terms["gan_g"] = gan.g_loss(fake_logits, p.gan_loss)
                # ∂L_gan/∂z̃_0 while the encoder's adapter state is live (gradient checkpointing recomputes
                # the encoder in backward); the student part of the graph is backpropagated below
                (gan_grad,) = torch.autograd.grad(p.gan_weight * terms["gan_g"], x0)
        ensure_finite(terms, "dmgan", step)
        weights = {"consistency": p.consistency_weight, "dm": p.dm_weight}
        loss = sum(weights[k] * v for k, v in terms.items() if k in weights)
        if gan_grad is not None:
            loss = loss + (x0 * gan_grad.detach()).sum()
        optimizer_step(opt, loss, s.trainable, 1.0)
        z0_real, z0_fake, cond = b.z0, x0.detach(), b.cond
        for i in range(p.critic_updates):
            if i > 0:  # fresh samples for every further critic update
                nb = eq9_batch(s, p.batch_size, p.student_steps_q, gen)
                with torch.no_grad():
                    z0_real, z0_fake, cond = nb.z0, f_theta_x0(s.student, nb.z_t, nb.t, nb.cond), nb.cond
            stats |= critics.update(z0_real, z0_fake, cond, gen)
        watch(step, stats.get("disc_acc_real"), stats.get("disc_acc_fake"))
        return {**{k: v.item() for k, v in terms.items()}, **stats}

    return autocast_steps(teacher_params, step_fn)


def text_dim_of(unet) -> int:
    """The width of the text summary the discriminator head projects (pooled text for SDXL, else the embeddings')."""
    cfg = unet.config
    return (cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            if cfg.addition_embed_type == "text_time" else cfg.cross_attention_dim)


def run(params: Params, paths: Paths) -> dict:
    p = params.dmgan
    if not p.enabled or (p.dm_weight == 0 and p.gan_weight == 0 and p.consistency_weight == 0):
        return passthrough(paths, "dmgan", INIT_FROM)
    from tlcm.core.identity import checkpointer  # needs pydantic: the rigs import this module without it

    s = setup_student(params, paths, "dmgan", INIT_FROM, M_SEGMENTS)
    critics = Critics(s, p, text_dim_of(s.unet))
    opt = torch.optim.AdamW(s.trainable, lr=p.lr, weight_decay=0.0)
    watch = CollapseWatch(p.collapse_window)
    state = {"lora": AdapterState(s.unet, STUDENT), "fake": AdapterState(s.unet, FAKE), "head": critics.head,
             "opt": opt, "opt_fake": critics.opt_fake, "opt_d": critics.opt_d}
    if p.disc_tune == "lora":
        state["critic"] = AdapterState(s.unet, CRITIC)
    ckpt = checkpointer("dmgan", params, paths)
    res = run_loop("dmgan", p.steps, make_step(s, critics, opt, p, watch, params.teacher), state, ckpt,
                   p.checkpoint_every, log_every=10, max_minutes=p.max_minutes)
    s.unet.set_adapter(STUDENT)
    return save_student(s, paths, "dmgan", {"init_from": INIT_FROM, "params": p.model_dump(mode="json")},
                        {"steps": res.steps_done, "train_seconds": res.seconds, "collapse_steps": watch.collapses,
                         "first": res.history[0] if res.history else {}, "last": res.history[-1] if res.history else {},
                         **final_eval_block(params, paths, s.pipe, "dmgan")})

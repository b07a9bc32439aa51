"""The consistency-distillation loop shared by `mlcd`, `ilcd` and `lcm_baseline` (each stage module supplies its
batches: Alg. 1 in `tasks/mlcd.py`, Alg. 2 in `tasks/ilcd.py`), and the student set-up every LoRA stage uses.

Data-free: only prompts (the world's train prompts, or a prompt file for real teachers) and Gaussian noise; every
latent the student sees comes from the teacher's ODE (MLCD, Alg. 1; with ``teacher_path: buffer`` from the
teacher-trajectory buffer, :mod:`tasks.teacher_buffer`) or from the student itself re-noised (iLCD, Alg. 2).
One UNet in memory: the teacher is the same UNet with its adapters disabled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, TYPE_CHECKING

import torch
import torch.nn.functional as F

from models.denoiser import Cond, Denoiser, encode_prompts
from models.lora import STUDENT, FrozenTeacher, add_lora, lora_parameters
from models.tlcm import milestones
from tasks.student_eval import QuickEval, final_eval_block, judged
from tlcm.core import distributed as D
from tlcm.core.evalcount import UNetCounter
from tlcm.loaders.lora_io import AdapterState, load_lora_into, save_lora
from tlcm.core.paths import Paths
from tlcm.core.storage import atomic_write_json
from tlcm.loaders.teacher_io import autocast, float32_, load_frozen_teacher
from tlcm.core.training import ensure_finite, optimizer_step, run_loop

if TYPE_CHECKING:  # the params classes need pydantic; these modules run without it (tlcm check-gpu)
    from tlcm.core.params import ConsistencyParams, Params

log = logging.getLogger("tlcm")


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


def train_prompts(params: Params, paths: Paths) -> list[str]:
    """The data-free stages' only data: ``params.prompts`` (the world's train prompts, or a caption file)."""
    from tlcm.loaders.prompt_sources import read_prompts

    return read_prompts(params, paths)


@dataclass
class Student:
    """The loaded pipeline and the views of its one UNet that the losses call: the student (adapter ``student``), the
    frozen teacher (every adapter off), the distance d(·,·), the prompts, the milestones and the latent shape."""
    pipe: object
    unet: object
    student: Denoiser
    teacher: FrozenTeacher
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    prompts: list[str]
    ms: list[int]
    shape: tuple[int, int, int]
    source: str  # params.teacher.source: what the LoRA is for

    @property
    def trainable(self) -> list:
        return lora_parameters(self.unet, STUDENT)


def student_of(pipe, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prompts: list[str], source: str,
               segments: int) -> Student:
    """The one student set-up of every LoRA stage: the ``student`` LoRA already on ``pipe.unet`` (fresh or loaded)
    made active, moved to the process's device, float32, trainable and equal on every process; and the views of
    the UNet that the losses call (milestones of ``segments`` segments)."""
    unet = pipe.unet
    unet.set_adapter(STUDENT)
    unet.to(D.device())
    trainable = lora_parameters(unet, STUDENT)
    float32_(trainable)
    for q in trainable:
        q.requires_grad_(True)
    D.broadcast_from_main(trainable)
    ac = pipe.scheduler.alphas_cumprod.to(D.device())
    cfg = unet.config
    return Student(pipe, unet, Denoiser(unet, ac), FrozenTeacher(Denoiser(unet, ac)), distance, prompts,
                   milestones(segments), (cfg.in_channels, cfg.sample_size, cfg.sample_size), source)


def autocast_steps(teacher_params, step: Callable[[int], dict[str, float]]) -> Callable[[int], dict[str, float]]:
    """The training step under the teacher's mixed precision (a no-op for float32 weights)."""
    def run(i: int) -> dict[str, float]:
        with autocast(teacher_params, D.device()):
            return step(i)
    return run


@dataclass
class Batches:
    """A consistency algorithm on a :class:`Student` (``batches(s, p)`` of `tasks/mlcd.py`, `tasks/ilcd.py`):
    ``terms(step)``, the loss terms of the step's batch (every random draw made for the GLOBAL batch from the step's
    generator; this process computes its shard); ``record()``, what the stage's metrics add; ``state``, what its
    checkpoints keep besides the LoRA and the optimiser."""
    name: str  # the algorithm, recorded with the LoRA
    terms: Callable[[int], dict[str, torch.Tensor]]
    record: Callable[[], dict]
    state: dict = field(default_factory=dict)


def prompts_and_noise(s: Student, batch_size: int, gen: torch.Generator) -> tuple[Cond, torch.Tensor]:
    """A data-free batch's first draws, for the GLOBAL batch: prompt indices, then ε (CPU). Returns this process's
    prompts encoded and the global ε (the caller draws the rest, then shards)."""
    idx = torch.randint(len(s.prompts), (batch_size,), generator=gen)
    eps = torch.randn((batch_size, *s.shape), generator=gen)
    with torch.no_grad():
        cond = encode_prompts(s.pipe, [s.prompts[i] for i in D.shard(idx)])
    return cond, eps


def make_step(s: Student, batches: Batches, opt: torch.optim.Optimizer, stage: str,
              teacher_params) -> Callable[[int], dict[str, float]]:
    """The training step (under the teacher's mixed precision): the loss terms, the NaN guard, one optimiser step
    of the student LoRA (its consistency term is a mean over the local shard: the processes' mean gradient is the
    global batch's; norm clipped to 1)."""
    def step(i: int) -> dict[str, float]:
        terms = batches.terms(i)
        ensure_finite(terms, stage, i)
        optimizer_step(opt, terms["consistency"], s.trainable, 1.0)
        return {k: v.item() for k, v in terms.items()}
    return autocast_steps(teacher_params, step)


def fresh_student(pipe, rank: int, seed: int) -> None:
    """A new ``student`` LoRA of ``rank`` on ``pipe.unet``, its random A drawn from ``seed`` (B starts at zero)."""
    torch.manual_seed(seed)
    add_lora(pipe.unet, rank)


def setup_student(params: Params, paths: Paths, stage: str, init_from: str | None, segments: int) -> Student:
    """The student of ``stage`` on the frozen teacher: a fresh LoRA (``init_from`` None: the section's ``rank`` and
    ``seed``) or the LoRA of stage ``init_from`` continued; the section's ``loss`` picks d(·,·)."""
    section = params.section(stage)
    D.check_batch(section.batch_size, f"{stage}.batch_size")
    pipe = load_frozen_teacher(params.teacher, paths.teacher)
    pipe.to(D.device())
    if init_from is None:
        fresh_student(pipe, section.rank, section.seed)
    else:
        load_lora_into(pipe.unet, paths.lora(init_from))
    distance, prompts = make_distance(section, params, paths), train_prompts(params, paths)
    return student_of(pipe, distance, prompts, str(params.teacher.source), segments)


def distill(params: Params, paths: Paths, stage: str, algorithm: Callable[[Student, ConsistencyParams], Batches],
            init_from: str | None) -> dict:
    """Train the student LoRA for ``stage`` (its params section) on the batches of ``algorithm`` and save it to
    ``paths.lora(stage)``.

    ``init_from``: the stage whose LoRA to continue (iLCD continues MLCD's); None = a fresh LoRA.
    Under ``accelerate launch`` (:mod:`tlcm.core.distributed`) each process trains on its shard of the
    global batch, gradients are averaged, and the main process writes the checkpoints and the LoRA.
    """
    from tlcm.core.identity import checkpointer  # needs pydantic: the rigs import this module without it

    p: ConsistencyParams = params.section(stage)
    world = D.world_size()
    s = setup_student(params, paths, stage, init_from, p.num_segments)
    pipe = s.pipe
    batches = algorithm(s, p)
    opt = torch.optim.AdamW(s.trainable, lr=p.lr, weight_decay=0.0)
    quick = None
    if p.eval_every and judged(params, paths):
        quick = QuickEval(params, paths, pipe, stage, p.eval_prompts)
    train_step = make_step(s, batches, opt, stage, params.teacher)

    def step_fn(step: int) -> dict[str, float]:
        if quick is not None and step % p.eval_every == 0:
            quick(step)
        return train_step(step)

    state = {"lora": AdapterState(pipe.unet), "opt": opt, **batches.state}
    ckpt = checkpointer(stage, params, paths)
    with UNetCounter(pipe.unet) as counter:
        res = run_loop(stage, p.steps, step_fn, state, ckpt, p.checkpoint_every, max_minutes=p.max_minutes)
    if quick is not None:
        quick(res.steps_done)
    final = final_eval_block(params, paths, pipe, stage)
    trained = (res.steps_done - res.resumed_from) * p.batch_size
    teacher_evals = D.mean_over_processes({"n": float(counter.rows("teacher"))})["n"] * world
    info = {"stage": stage, "kind": batches.name, "init_from": init_from, "teacher": str(params.teacher.source),
            "params": p.model_dump(mode="json"), "steps": res.steps_done, "train_seconds": res.seconds,
            "world_size": world, "real_images_used": 0}
    metrics = {"steps": res.steps_done, "train_seconds": res.seconds, **D.compute_record(),
               "final_consistency": res.history[-1]["consistency"] if res.history else None,
               "teacher_unet_evals_per_sample": teacher_evals / trained if trained else None,
               "quick_evals": quick.history if quick is not None else [], **batches.record(), **final}
    if D.is_main():
        save_lora(paths.lora(stage), pipe.unet, info)
        atomic_write_json(paths.metrics / f"{stage}.json", metrics)
        log.info("%s: %d steps in %.0fs on %d process(es), %.2f teacher UNet evaluations per pair -> %s", stage,
                 res.steps_done, res.seconds, world, metrics["teacher_unet_evals_per_sample"] or 0.0, paths.lora(stage))
    D.barrier()
    return metrics

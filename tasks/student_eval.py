"""What the LoRA stages measure of their own student (the consistency loss says little about progress, DESIGN §6):
the periodic quick evaluation during training and the end-of-training ``final_eval`` block of
``metrics/<stage>.json`` (alignment ± standard error and Fréchet distance at 2 and 4 steps on held-out prompts,
judged by the evaluator) — the number each row of the paper's ablations (experiments/ablations.py) reads, so
rows that retrain only one stage are comparable. The benchmark (`tlcm stage evaluate`) stays the reference."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from tlcm.core.paths import Paths

if TYPE_CHECKING:
    from tlcm.core.params import Params

log = logging.getLogger("tlcm")
FINAL_STEPS = (2, 4)  # Table 2/3 compare at 4 steps; 2 steps is where the segments' milestones matter most


def student_scheduler(params: Params, pipe, stage: str):
    """The sampler of the stage's model family: LCMScheduler for one segment (the LCM baseline), else TLCMScheduler."""
    from diffusers import LCMScheduler

    from models.scheduler import TLCMScheduler

    segments = getattr(params.section(stage), "num_segments", None)
    return (LCMScheduler if segments == 1 else TLCMScheduler).from_config(pipe.scheduler.config)


class QuickEval:
    """Periodic small evaluation: alignment of few-step samples on held-out prompts, judged by the evaluator."""

    def __init__(self, params: Params, paths: Paths, pipe, stage: str, n_prompts: int, steps: tuple[int, ...] = (2, 4)):
        from tasks.evaluator import load_evaluator
        from tlcm.loaders.world_io import read_prompts

        self.pipe, self.stage, self.steps = pipe, stage, steps
        self.specs = read_prompts(paths, "eval")[:n_prompts]
        self.net = load_evaluator(params, paths)
        self.scheduler = student_scheduler(params, pipe, stage)
        self.history: list[dict] = []

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        from tasks.evaluator import accuracy
        from tasks.generate import student_samples
        from tlcm.shapes import render as R
        from tlcm.tracking import runs as tracking

        out: dict = {"step": step}
        for n in self.steps:
            s = student_samples(self.pipe, [x.caption() for x in self.specs], n, 0, 64, self.scheduler)
            out[f"eval_alignment_{n}step"] = accuracy(self.net, R.to_unit_tensor(s.images), self.specs)["all"]
        self.history.append(out)
        tracking.log_step(self.stage, step, {k: v for k, v in out.items() if k != "step"})
        log.info("%s: step %d quick eval %s", self.stage, step, {k: round(v, 3) for k, v in out.items() if k != "step"})
        return out


@torch.no_grad()
def final_eval(params: Params, paths: Paths, pipe, stage: str, n_prompts: int) -> dict:
    """``{alignment_{n}step, alignment_{n}step_se, frechet_{n}step}`` for n in :data:`FINAL_STEPS`: the student as
    it is (LoRA active) on the first ``n_prompts`` held-out prompts, seed 0, against renders of the same prompts."""
    from tasks.benchmark_scores import frechet_distance
    from tasks.evaluator import accuracy, load_evaluator
    from tasks.generate import student_samples
    from tlcm.shapes import render as R
    from tlcm.report.benchmark_report import standard_error
    from tlcm.loaders.world_io import read_prompts

    specs = read_prompts(paths, "eval")[:n_prompts]
    net, scheduler = load_evaluator(params, paths), student_scheduler(params, pipe, stage)
    real = R.render_batch(specs, params.section(stage).seed + 11, params.world.image_size)
    out: dict = {"n_prompts": len(specs)}
    for n in FINAL_STEPS:
        s = student_samples(pipe, [x.caption() for x in specs], n, 0, 64, scheduler)
        a = accuracy(net, R.to_unit_tensor(s.images), specs)["all"]
        out |= {f"alignment_{n}step": a, f"alignment_{n}step_se": standard_error(a, len(specs)),
                f"frechet_{n}step": frechet_distance(net, real, s.images)}
    log.info("%s: final eval on %d held-out prompts %s", stage, len(specs),
             {k: round(v, 3) for k, v in out.items() if k != "n_prompts"})
    return out


def judged(params: Params, paths: Paths) -> bool:
    """Whether this process evaluates the student: the main one, of a shapes-world teacher with its evaluator."""
    from tlcm.core import distributed as D

    return D.is_main() and params.teacher.source.trained and (paths.evaluator / "model.safetensors").is_file()


def final_eval_block(params: Params, paths: Paths, pipe, stage: str) -> dict:
    """``{"final_eval": ...}`` for the stage's metrics, or ``{}`` where nothing judges it (``final_eval_prompts: 0``,
    a real teacher, a process other than the main one)."""
    n = params.section(stage).final_eval_prompts
    return {"final_eval": final_eval(params, paths, pipe, stage, n)} if n and judged(params, paths) else {}

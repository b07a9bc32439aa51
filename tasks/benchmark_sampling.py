"""The benchmark's rows, sampled the way users sample them: the reference (the teacher, DDIM + CFG), the
training-free baselines (each sampler's CFG scale chosen on held-out selection prompts the benchmark never uses)
and every student LoRA (loaded and fused into a fresh teacher, with its own scheduler)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from models.sampling import BASELINE_SAMPLERS, baseline_scheduler
from tasks.benchmark_scores import frechet_distance
from tasks.evaluator import accuracy
from tasks.generate import Samples, student_samples, teacher_ddim
from tlcm.shapes import render as R
from tlcm.shapes import world as W
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import frozen_dtype, load_for_sampling, resolve_teacher

log = logging.getLogger("tlcm")


@dataclass
class Row:
    """One sampled row of the benchmark: its images on the benchmark prompts (and the compositional ones)."""
    method: str
    steps: int
    guidance: float
    samples: Samples
    compositional: Samples | None = None
    kind: str = "student"  # the benchmark's "kind" column: "reference" | "baseline" | "student"
    extra: dict = field(default_factory=dict)  # e.g. the baseline's sampler and why it was selected
    seed_images: list[np.ndarray] = field(default_factory=list)  # the same row under other noise seeds
    grid_label: str | None = None  # its column in samples.png (None: not in the grid)


STUDENT_LABELS = {"lcm_baseline": "LCM-LoRA baseline (LCD, 1 segment)", "mlcd": "TLCM after mlcd",
                  "ilcd": "TLCM after ilcd", "mps": "TLCM after mps", "dmgan": "TLCM after dmgan"}


def student_rows(p) -> list[tuple[str, str, tuple[int, ...]]]:
    """(stage, row label, step counts) for every student LoRA the benchmark covers."""
    return [(st, STUDENT_LABELS.get(st, f"TLCM after {st}"), p.lcm_steps if st == "lcm_baseline" else p.student_steps)
            for st in p.student_stages]


def shipped_label(p) -> str | None:
    """The row label of the LoRA the pipeline ships (the last TLCM stage benchmarked)."""
    tlcm = [label for st, label, _ in student_rows(p) if st != "lcm_baseline"]
    return tlcm[-1] if tlcm else None


def load_student(source: str, lora_dir, stage: str, dtype: torch.dtype = torch.float32):
    """The user's way (tasks.generate.load_student_pipe): fresh teacher, LoRA loaded and fused, and the
    sampler of that model family (LCMScheduler for the LCM baseline, TLCMScheduler for TLCM), on the device."""
    from tasks.generate import load_student_pipe

    return load_student_pipe(source, lora_dir, "lcm" if stage == "lcm_baseline" else "tlcm", dtype)


def selection_specs(params: Params, eval_specs: list[W.Spec]) -> list[W.Spec]:
    """Held-out (eval-split) prompts for choosing the baselines' CFG scale, none with a benchmark caption."""
    taken = {s.caption() for s in eval_specs}
    pool = W.sample_specs(params.evaluate.seed + 1000, 8 * params.evaluate.selection_prompts, "eval",
                          params.world.two_object_frac)
    return [s for s in pool if s.caption() not in taken][: params.evaluate.selection_prompts]


def baseline_sweep(params: Params, pipe, net, specs: list[W.Spec]) -> tuple[list[dict], list[tuple[str, int, float, str]]]:
    """Every training-free (sampler, steps, CFG w) of the untrained teacher on the selection prompts, and the
    configurations carried to the benchmark: per sampler and step count, the best by alignment and by Fréchet."""
    p = params.evaluate
    prompts = [s.caption() for s in specs]
    real = R.render_batch(specs, p.seed + 13, params.world.image_size)
    sweep = []
    for name in p.baseline_samplers:
        sched = baseline_scheduler(name, pipe.scheduler.config)
        for n in p.baseline_steps:
            for w in p.baseline_guidance:
                s = student_samples(pipe, prompts, n, p.seed, p.batch_size, sched, guidance=w)
                sweep.append({"sampler": name, "steps": n, "guidance": w, "n_prompts": len(prompts),
                              "alignment": accuracy(net, R.to_unit_tensor(s.images), specs)["all"],
                              "frechet": frechet_distance(net, real, s.images)})
            log.info("evaluate: baseline sweep %s %d steps: %s", name, n,
                     {r["guidance"]: round(r["alignment"], 3) for r in sweep if r["sampler"] == name and r["steps"] == n})
    chosen: dict[tuple[str, int, float], list[str]] = {}
    for name in p.baseline_samplers:
        for n in p.baseline_steps:
            rs = [r for r in sweep if r["sampler"] == name and r["steps"] == n]
            best_a = max(rs, key=lambda r: (r["alignment"], -r["frechet"]))
            best_f = min(rs, key=lambda r: (r["frechet"], -r["alignment"]))
            for r, why in ((best_a, "alignment"), (best_f, "frechet")):
                r.setdefault("selected_by", []).append(why)
                chosen.setdefault((name, n, r["guidance"]), []).append(why)
    return sweep, [(name, n, w, "+".join(why)) for (name, n, w), why in chosen.items()]


def sample_rows(params: Params, paths: Paths, specs: list, comp_prompts: list[str] | None, net
                ) -> tuple[list[Row], list[dict]]:
    """The reference, the selected training-free baselines and every student LoRA, sampled the way users
    sample them; and the baselines' whole sweep on the selection prompts. ``specs``: shapes-world specs, or
    plain prompts for a real teacher (``net`` None: no judge, so no baseline sweep and no seed spread)."""
    p = params.evaluate
    prompts = [s if isinstance(s, str) else s.caption() for s in specs]
    source = resolve_teacher(params.teacher.source, paths.teacher)
    pipe = load_for_sampling(source, frozen_dtype(params.teacher))  # on the process's device, in teacher.dtype
    assert not getattr(pipe.unet, "peft_config", None), "teacher rows must run without any adapter"
    comp = (lambda f: f(comp_prompts)) if comp_prompts else (lambda f: None)  # noqa: E731
    n_ref = p.reference_steps
    log.info("evaluate: reference: teacher DDIM %d steps, w=%s, %d prompts", n_ref, p.guidance_scale, len(prompts))
    ref = lambda ps, seed=p.seed: teacher_ddim(pipe, ps, n_ref, p.guidance_scale, seed, p.batch_size)  # noqa: E731
    rows = [Row("teacher DDIM + CFG (reference)", n_ref, p.guidance_scale, ref(prompts), comp(ref), "reference",
                seed_images=[ref(prompts, p.seed + k).images for k in range(1, p.sample_seeds)] if net else [],
                grid_label=f"teacher {n_ref} st")]
    sweep: list[dict] = []
    if net is not None and p.baseline_samplers:
        sweep, chosen = baseline_sweep(params, pipe, net, selection_specs(params, specs))
        for name, n, w, why in chosen:
            sched = baseline_scheduler(name, pipe.scheduler.config)
            sample = lambda ps: student_samples(pipe, ps, n, p.seed, p.batch_size, sched, guidance=w)  # noqa: E731
            rows.append(Row(f"teacher + {BASELINE_SAMPLERS[name]}", n, w, sample(prompts), comp(sample), "baseline",
                            {"sampler": name, "selected_by": why},  # in the grid: the CFG scale chosen by alignment
                            grid_label=f"{name} w={w:g} {n} st" if "alignment" in why else None))
    shipped = shipped_label(p)
    for stage, label, steps in student_rows(p):
        student = load_student(source, paths.lora(stage), stage, frozen_dtype(params.teacher))
        for n in steps:
            log.info("evaluate: %s %d steps (LoRA fused), %d prompts", label, n, len(prompts))
            sample = lambda ps, seed=p.seed: student_samples(student, ps, n, seed, p.batch_size, student.scheduler)  # noqa: E731
            seeds = [sample(prompts, p.seed + k).images for k in range(1, p.sample_seeds)] if net and label == shipped else []
            rows.append(Row(label, n, 1.0, sample(prompts), comp(sample), "student", seed_images=seeds,
                            grid_label=f"{stage} {n} st"))
    return rows, sweep

"""Benchmark rows for the paper's §A.2 applications and for the stock sampling paths (the `evaluate`
stage calls :func:`benchmark_rows` once and appends what it returns to its table).

On the first ``applications.n_prompts`` held-out prompts, with the real render of each prompt as the
input picture, three diffusers pipelines run with the shipped LoRA (fused, ``TLCMScheduler``, CFG off) at
``applications.steps`` denoising steps, and with the teacher (DDIM, CFG ``evaluate.guidance_scale``) at
``applications.teacher_steps``, the reference:

- ``StableDiffusionXLImg2ImgPipeline`` at ``img2img_strength`` (0.5: the last half of the schedule);
- ``StableDiffusionXLInpaintPipeline`` with the right half of the picture masked (strength 1);
- ``StableDiffusionXLControlNetPipeline`` with the `controlnet` stage's ControlNet and the render's edge
  map as the control (and the same student without it, to show what the control does).

Columns, all read by the independent evaluator except ``edge_iou``: ``alignment`` (every prompted
attribute recognised), ``agree_teacher`` (the evaluator reads the same attributes as in the teacher's
picture for the same input and prompt), ``layout_kept`` (img2img: the layout read in the input is read in
the output), ``edge_iou`` (ControlNet: edge map of the output vs the control, intersection over union).

Stock paths (item 6 of issue 13): from the same z_T and the same noise generator, the shipped LoRA at 4
steps through the benchmark's own sampler (:func:`models.sampling.sample_with_scheduler`, which every
TLCM row of the benchmark uses), through a plain ``StableDiffusionXLPipeline`` with ``TLCMScheduler``,
and through stock ``LCMScheduler`` with ``timesteps=[999, 749, 499, 124]``; ``max_abs_diff`` is the
largest difference of their final latents from the benchmark sampler's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from models.controlnet import edge_map
from models.denoiser import encode_prompts
from models.evaluator import PROMPTED_HEADS, attribute_correct
from models.sampling import sample_with_scheduler, unet_evals
from models.scheduler import TLCMScheduler, tlcm_timesteps
from tasks.evaluator import aligned, labels_tensor
from tasks.generate import decode, load_student_pipe, model_and_noise
from tasks.register import SHIPPED_STAGE
from tlcm.shapes import render as R
from tlcm.shapes import world as W
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import frozen_dtype, load_for_sampling, resolve_teacher

log = logging.getLogger("tlcm")

STOCK_STEPS = 4


@torch.no_grad()
def agreement(net, images: torch.Tensor, reference: torch.Tensor, specs: list[W.Spec]) -> dict[str, float]:
    """Fraction of images whose evaluator reading equals the reading of ``reference`` (on the attributes
    each prompt names): ``all`` groups, and ``layout`` alone."""
    wanted = labels_tensor(specs)
    logits = net(reference)
    ref = {k: torch.where(wanted[k] >= 0, logits[k].argmax(-1), -1) for k in PROMPTED_HEADS}
    ok = attribute_correct(net(images), ref)
    return {"all": ok["all"].float().mean().item(), "layout": ok["layout"].float().mean().item()}


def edge_iou(images: torch.Tensor, control: torch.Tensor) -> float:
    a, b = edge_map(images)[:, 0] > 0, control[:, 0] > 0
    return ((a & b).sum((1, 2)) / (a | b).sum((1, 2)).clamp(min=1)).mean().item()


def _uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def img2img_inference_steps(steps: int, strength: float) -> int:
    """The smallest ``num_inference_steps`` n (1..8) for which img2img at ``strength`` runs ``steps`` steps
    (diffusers runs the last ⌊n · strength⌋ timesteps of the n-step schedule)."""
    for n in range(1, 9):
        if int(n * strength) == steps:
            return n
    raise ValueError(f"applications.steps: img2img at strength {strength} cannot run {steps} TLCM steps "
                     "(the table has 1..8 steps); pick other steps or applications.img2img_strength")


def _run(pipe, prompts, bs: int, seed: int, **kw) -> np.ndarray:
    """A diffusers pipeline over ``prompts`` in batches (per-batch inputs sliced), uint8 (N, H, W, 3)."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), bs):
        sl = {k: (v[i:i + bs] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        res = pipe(prompts[i:i + bs], generator=torch.Generator().manual_seed(seed + i), output_type="np", **sl)
        out.append(_uint8(res.images))
    return np.concatenate(out)


def img2img_images(pipe, prompts, x, steps: int, w: float, bs: int, seed: int, a, controlnet=None) -> np.ndarray:
    """``StableDiffusionXLImg2ImgPipeline`` at ``img2img_strength`` from the renders ``x``; the student (w = 1) gets
    the ``num_inference_steps`` that make it run ``steps`` steps, the teacher runs the end of a ``steps`` schedule."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    n = steps if w != 1.0 else img2img_inference_steps(steps, a.img2img_strength)
    p = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, dtype=pipe.dtype)
    return _run(p, prompts, bs, seed, image=x, strength=a.img2img_strength, num_inference_steps=n, guidance_scale=w)


def inpaint_images(pipe, prompts, x, steps: int, w: float, bs: int, seed: int, a, controlnet=None) -> np.ndarray:
    """``StableDiffusionXLInpaintPipeline`` repainting the right half of the renders ``x`` (strength 1)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    side = x.shape[-1]
    mask = torch.zeros(len(prompts), 1, side, side)
    mask[..., side // 2:] = 1.0
    p = StableDiffusionXLInpaintPipeline.from_pipe(pipe, dtype=pipe.dtype)
    return _run(p, prompts, bs, seed, image=x, mask_image=mask, strength=1.0, num_inference_steps=steps,
                guidance_scale=w, height=side, width=side)


def controlnet_images(pipe, prompts, x, steps: int, w: float, bs: int, seed: int, a, controlnet=None) -> np.ndarray:
    """``StableDiffusionXLControlNetPipeline`` with the edge maps of the renders ``x`` as the control."""
    from diffusers import StableDiffusionXLControlNetPipeline

    side = x.shape[-1]
    p = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=controlnet, dtype=pipe.dtype)
    return _run(p, prompts, bs, seed, image=edge_map(x), controlnet_conditioning_scale=a.controlnet_scale,
                num_inference_steps=steps, guidance_scale=w, height=side, width=side)


def without_control(student, prompts, label: str, a, e) -> list[tuple]:
    """The same student without the ControlNet (what the control adds)."""
    from tasks.generate import student_samples

    return [(f"controlnet: {label}, no ControlNet", n, 1.0,
             student_samples(student, prompts, n, e.seed, e.batch_size, student.scheduler).images) for n in a.steps]


@dataclass(frozen=True)
class Application:
    """One §A.2 application: ``images(pipe, prompts, x, steps, w, bs, seed, a, controlnet)`` through its diffusers
    pipeline; ``steps_run(n, w, a)``, the denoising steps a run at ``n`` steps takes; ``columns(net, images, x,
    specs)``, its own columns; ``more_runs(student, prompts, label, a, e)``, rows beside the student's and the
    teacher's."""
    images: Callable[..., np.ndarray]
    steps_run: Callable[[int, float, object], int] = lambda n, w, a: n
    columns: Callable[..., dict] = lambda net, images, x, specs: {}
    more_runs: Callable[..., list] = lambda student, prompts, label, a, e: []
    needs_controlnet: bool = False


APPLICATIONS: dict[str, Application] = {
    # the teacher (w != 1) runs the last img2img_strength of its schedule; the student its own steps
    "img2img": Application(img2img_images, lambda n, w, a: int(n * a.img2img_strength) if w != 1.0 else n,
                           lambda net, images, x, specs: {"layout_kept": agreement(net, images, x, specs)["layout"]}),
    "inpaint": Application(inpaint_images),
    "controlnet": Application(controlnet_images,
                              columns=lambda net, images, x, specs: {"edge_iou": edge_iou(images, edge_map(x))},
                              more_runs=without_control, needs_controlnet=True),
}


@torch.no_grad()
def stock_path_rows(student, net, specs, prompts, label: str, seed: int) -> list[dict]:
    """The benchmark sampler vs plain diffusers (TLCMScheduler) vs stock LCMScheduler(timesteps=...)."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    model, z_T = model_and_noise(student, len(prompts), seed)  # on the student's device
    gen = lambda: torch.Generator().manual_seed(seed + 1)  # noqa: E731 - the same noise stream for every path
    ts = tlcm_timesteps(STOCK_STEPS)
    ours = sample_with_scheduler(model, encode_prompts(student, prompts), TLCMScheduler.from_config(student.scheduler.config),
                                 STOCK_STEPS, z_T, 1.0, gen())
    # from_pipe casts the shared modules to float32 unless told the dtype
    plain = StableDiffusionXLPipeline.from_pipe(student, scheduler=TLCMScheduler.from_config(student.scheduler.config),
                                                dtype=student.dtype)
    lcm = StableDiffusionXLPipeline.from_pipe(student, scheduler=LCMScheduler.from_config(student.scheduler.config),
                                              dtype=student.dtype)
    for p in (plain, lcm):
        p.set_progress_bar_config(disable=True)
    z_user = lambda: z_T.to(student.dtype).clone()  # noqa: E731 - diffusers takes latents in the pipeline's dtype
    paths = {
        f"{label}: benchmark sampler (models.sampling + TLCMScheduler)": ours,
        f"{label}: StableDiffusionXLPipeline + TLCMScheduler": plain(
            prompts, num_inference_steps=STOCK_STEPS, guidance_scale=1.0, latents=z_user(), generator=gen(),
            output_type="latent").images,
        f"{label}: StableDiffusionXLPipeline + LCMScheduler(timesteps={ts})": lcm(
            prompts, timesteps=ts, guidance_scale=1.0, latents=z_user(), generator=gen(), output_type="latent").images,
    }
    rows = []
    for method, z0 in paths.items():
        images = R.to_unit_tensor(decode(student, z0))
        rows.append({"method": method, "kind": "stock_path", "steps": STOCK_STEPS, "guidance": 1.0, "unet_evals": STOCK_STEPS,
                     "alignment": aligned(net, images, specs).float().mean().item(),
                     "max_abs_diff": (z0 - ours).abs().max().item(), "real_images_used": 0})
    log.info("applications: stock paths vs benchmark sampler, max |Δ latents| %s",
             ", ".join(f"{r['max_abs_diff']:.2e}" for r in rows[1:]))
    return rows


@torch.no_grad()
def benchmark_rows(params: Params, paths: Paths, net, specs: list[W.Spec]) -> list[dict]:
    """Every application row and the stock-path rows, with the last student stage the benchmark evaluates
    (the shipped LoRA in a full run); empty when ``applications.enabled`` is false or no student is evaluated."""
    a, e = params.applications, params.evaluate
    stage = SHIPPED_STAGE if SHIPPED_STAGE in e.student_stages else (e.student_stages[-1] if e.student_stages else None)
    if not a.enabled or stage is None:
        log.info("applications: skipped (%s)", "applications.enabled is false" if not a.enabled
                 else "evaluate.student_stages is empty")
        return []
    specs = specs[:a.n_prompts]
    prompts = [s.caption() for s in specs]
    x = R.to_unit_tensor(R.render_batch(specs, e.seed + 21, params.world.image_size))
    source = resolve_teacher(params.teacher.source, paths.teacher)
    dtype = frozen_dtype(params.teacher)  # both pipelines on the process's device, frozen weights in teacher.dtype
    student = load_student_pipe(source, paths.lora(stage), dtype=dtype)
    label = f"TLCM after {stage}"
    rows = stock_path_rows(student, net, specs, prompts, label, e.seed)
    teacher = load_for_sampling(source, dtype)
    from diffusers import ControlNetModel, DDIMScheduler

    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing",
                                                  clip_sample=False)
    has_cn = (paths.controlnet / "config.json").is_file()
    cn = ControlNetModel.from_pretrained(paths.controlnet).to(teacher.device, dtype).eval() if has_cn else None
    for name, app in APPLICATIONS.items():
        if app.needs_controlnet and cn is None:
            continue
        log.info("applications: %s, teacher %d steps and TLCM %s steps, %d prompts", name, a.teacher_steps,
                 list(a.steps), len(prompts))
        ref = app.images(teacher, prompts, x, a.teacher_steps, e.guidance_scale, e.batch_size, e.seed, a, cn)
        runs = [(f"{name}: teacher DDIM + CFG", a.teacher_steps, e.guidance_scale, ref)]
        runs += [(f"{name}: {label}", n, 1.0, app.images(student, prompts, x, n, 1.0, e.batch_size, e.seed, a, cn))
                 for n in a.steps]
        runs += app.more_runs(student, prompts, label, a, e)
        ref_t = R.to_unit_tensor(ref)
        for method, n, w, imgs in runs:
            t = R.to_unit_tensor(imgs)
            run_steps = app.steps_run(n, w, a)
            rows.append({"method": method, "kind": "application", "steps": run_steps, "guidance": w,
                         "unet_evals": unet_evals(run_steps, w),
                         "alignment": aligned(net, t, specs).float().mean().item(),
                         "agree_teacher": agreement(net, t, ref_t, specs)["all"], "real_images_used": 0,
                         **app.columns(net, t, x, specs)})
    return rows

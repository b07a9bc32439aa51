"""The parts of `tlcm check-gpu` that run on SDXL-architecture networks (:mod:`tools.check_gpu`): (b) a few iterations
of each checked stage at one GPU's batch, timed, with the peak memory next to `tlcm plan`'s prediction; (c) the
benchmark's sampling at the teacher's resolution; and the bf16-vs-float32 agreement of one teacher CFG-DDIM step.
Also the presets read without pydantic (the GPU image has only torch, diffusers, peft, transformers, accelerate and
safetensors)."""
from __future__ import annotations

import copy
import gc
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

CHECK_STAGES = ("mlcd", "ilcd", "mps", "dmgan")
GiB = 2**30


# ---- params without pydantic ------------------------------------------------------------------------------------

class _Section(SimpleNamespace):
    def section(self, name: str):
        return getattr(self, name)


def _namespace(d: Any) -> Any:
    return _Section(**{k: _namespace(v) for k, v in d.items()}) if isinstance(d, dict) else d


def load_preset(params_file: str | Path, preset: str):
    """The resolved params of ``preset``: validated by :func:`tlcm.core.params.load_params` when pydantic is installed,
    else the same YAML merge (``params.yaml`` is the `mini` preset in full, the preset file overlays it) read as a
    plain namespace."""
    try:
        from tlcm.core.params import load_params
    except ImportError:
        import yaml

        def merge(a: dict, b: dict) -> dict:
            return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                            for k, v in b.items()}}

        base = yaml.safe_load(Path(params_file).read_text())
        over = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "presets" / f"{preset}.yaml")
                              .read_text())
        return _namespace({**merge(base, over), "preset": preset})
    return load_params(params_file, preset)


def _with(params, stage: str, **update):
    """``params`` with ``stage``'s section updated (pydantic models or the plain namespace)."""
    section = params.section(stage)
    if hasattr(section, "model_copy"):
        return params.model_copy(update={stage: section.model_copy(update=update)})
    out = copy.copy(params)
    setattr(out, stage, _Section(**{**vars(section), **update}))
    return out


# ---- the parts ----------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def _reset(nets, device: torch.device) -> None:
    """Drop every adapter (the next stage adds its own) and the last stage's memory."""
    unet = nets.pipe.unet
    if getattr(unet, "peft_config", None):
        unet.delete_adapters(list(unet.peft_config))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def stage_timing(stage: str, params, nets, iterations: int, device: torch.device) -> dict:
    """Seconds per iteration (after the first, which also makes the buffer's chunk and warms the kernels), the
    first iteration's extra seconds, and the peak GPU memory of ``iterations`` steps of ``stage``."""
    from tools.rig import stage_step

    _reset(nets, device)
    nets.scorer.to(device if stage == "mps" else "cpu")  # resident only where the stage uses it, as in the plan
    step, _ = stage_step(stage, params, nets)
    times = []
    for i in range(iterations):
        _sync(device)
        t = time.perf_counter()
        terms = step(i)
        _sync(device)
        times.append(time.perf_counter() - t)
    steady = sum(times[1:]) / max(1, len(times) - 1)
    section = params.section(stage)
    out = {"batch_per_gpu": section.batch_size, "iterations": iterations, "seconds_per_iteration": round(steady, 3),
           "first_iteration_extra_seconds": round(times[0] - steady, 2), "peak_gib": _peak_gib(device),
           "finite": all(v == v for v in terms.values())}
    if stage in ("mlcd", "lcm_baseline") and section.teacher_path == "buffer":
        out["buffer_chunk_seconds"] = out["first_iteration_extra_seconds"]
        out["seconds_per_iteration_with_chunks"] = round(steady + max(0.0, times[0] - steady) / section.buffer_refresh, 3)
    del step
    return out


def planned_gib(stage: str, params, tiny_params, costs, batch: int) -> dict:
    """`tlcm plan`'s prediction for ``stage`` on one GPU at ``batch`` (with and without gradient checkpointing)."""
    from tools.plan.counts import StageRecipe
    from tools.plan.estimates import memory_plan
    from tools.rig import count_evals

    section = params.section(stage)
    ranks = (params.mlcd.rank, params.dmgan.fake_rank) if stage == "dmgan" else (params.mlcd.rank,)
    recipe = StageRecipe(stage, section.steps, batch, count_evals(stage, params, tiny_params), ranks,
                           trains_head=stage == "dmgan")
    return {"plan_gib": memory_plan(costs, recipe, params.teacher.gradient_checkpointing).total_bytes(batch) / GiB,
            "plan_gib_without_checkpointing": memory_plan(costs, recipe, False).total_bytes(batch) / GiB}


def sampling(nets, params, n_prompts: int, device: torch.device) -> dict:
    """(c) The benchmark's sampling at the teacher's resolution: teacher DDIM + CFG at 25 steps and the TLCM
    scheduler at 4 (no LoRA: the weights are random; this times the sampler), decoding included."""
    from models.scheduler import TLCMScheduler
    from tasks.generate import student_samples, teacher_ddim
    from tlcm.loaders.teacher_io import upcast_vae

    _reset(nets, device)
    pipe = nets.pipe
    upcast_vae(pipe.vae, always=True)
    prompts = nets.prompts[:n_prompts]
    w = params.evaluate.guidance_scale
    rows = []
    for label, run in (("teacher DDIM + CFG", lambda: teacher_ddim(pipe, prompts, 25, w, 0, n_prompts)),
                       ("TLCM scheduler", lambda: student_samples(pipe, prompts, 4, 0, n_prompts,
                                                                  TLCMScheduler.from_config(pipe.scheduler.config)))):
        s = run()
        rows.append({"method": label, "steps": 25 if label.startswith("teacher") else 4,
                     "sec_per_image": round(s.seconds_per_image, 4), "unet_evals_per_image": s.unet_evals_per_image,
                     "image_shape": list(s.images.shape[1:])})
    return {"prompts": len(prompts), "resolution": pipe.unet.config.sample_size * pipe.vae_scale_factor,
            "vae_dtype": str(pipe.vae.dtype).removeprefix("torch."), "peak_gib": _peak_gib(device), "rows": rows}


@torch.no_grad()
def dtype_agreement(nets, params, device: torch.device, eps_tolerance: float = 0.05,
                    state_tolerance: float = 0.01) -> dict:
    """One teacher CFG-DDIM step (t = 999 → 979) from the same z_T with the same weights in the frozen dtype and in
    float32: relative RMS difference of one conditional ε evaluation (the network's numerics), of the CFG ε̃ (reported:
    CFG multiplies the conditional-minus-unconditional difference by w, and with random weights the two are close,
    so ε̃'s relative difference is several times ε's) and of the next state. They agree when ε and the next state are
    within their tolerances."""
    from models.denoiser import Denoiser, encode_prompts
    from models.diffusion import ddim_step

    _reset(nets, device)
    pipe = nets.pipe
    unet = pipe.unet
    unet32 = copy.deepcopy(unet).float()
    cfg = unet.config
    z = torch.randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                    generator=torch.Generator().manual_seed(0)).to(device)
    t, s = torch.tensor(999, device=device), torch.tensor(979, device=device)
    cond = encode_prompts(pipe, nets.prompts[:2])
    ac = pipe.scheduler.alphas_cumprod.to(device)
    out = {}
    for name, u in (("frozen", unet), ("float32", unet32)):
        model = Denoiser(u, ac)
        eps_cfg = model.eps_cfg(z, t, cond, params.evaluate.guidance_scale)
        out[name] = (model.eps(z, t, cond), eps_cfg, ddim_step(z, eps_cfg, t, s, ac))
    del unet32
    rel = lambda a, b: float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())  # noqa: E731
    e_rel, cfg_rel, z_rel = (rel(a, b) for a, b in zip(out["frozen"], out["float32"]))
    return {"dtype": str(next(unet.parameters()).dtype).removeprefix("torch."), "eps_rel_rms": e_rel,
            "eps_cfg_rel_rms": cfg_rel, "guidance_scale": params.evaluate.guidance_scale, "next_state_rel_rms": z_rel,
            "tolerance": {"eps": eps_tolerance, "next_state": state_tolerance},
            "agree": e_rel < eps_tolerance and z_rel < state_tolerance}


def sdxl_part(params, tiny_params, nets_fn: Callable[[], Any], gpus: int, iterations: int, device: torch.device,
              costs=None, deadline: float = float("inf")) -> dict:
    """(b) The four stages on SDXL-architecture networks at each GPU's batch of a ``gpus``-GPU launch."""
    nets = nets_fn()
    stages = {}
    for stage in CHECK_STAGES:
        if time.monotonic() > deadline:
            stages[stage] = {"skipped": "time budget spent"}
            continue
        batch = max(1, params.section(stage).batch_size // gpus)
        update = {"batch_size": batch}
        if stage == "mlcd" and params.mlcd.teacher_path == "buffer":  # this GPU's share of a chunk, as in the launch
            update["buffer_trajectories"] = max(batch, params.mlcd.buffer_trajectories // gpus)
        p = _with(params, stage, **update)
        stages[stage] = stage_timing(stage, p, nets, iterations, device)
        if costs is not None:
            stages[stage] |= planned_gib(stage, p, tiny_params, costs, batch)
    return {"gpus_in_launch": gpus, "dtype": params.teacher.dtype,
            "gradient_checkpointing": params.teacher.gradient_checkpointing, "stages": stages}, nets

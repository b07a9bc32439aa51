"""Stage rigs: each training stage's own step function (``make_step`` of `tasks/distill.py`, `tasks/mps.py`,
`tasks/dmgan.py`) on networks built in memory from configs, with random weights: no artifacts, no downloads.

`tlcm plan` runs them on a tiny SDXL-shaped teacher on the CPU to count what every stage evaluates
(:func:`count_evals`); `tlcm check-gpu` runs them on SDXL's own architecture on a GPU to time them and measure
their memory (:mod:`tools.check_gpu`). The counts and the memory do not depend on the weights' values.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from tlcm.core.evalcount import UNetCounter

RIG_STAGES = ("lcm_baseline", "mlcd", "ilcd", "mps", "dmgan")


@dataclass
class Networks:
    """One teacher in memory: the pipeline, prompts for the data-free stages, a scorer with the MPS interface and the
    consistency distance."""
    pipe: Any
    prompts: list[str]
    scorer: nn.Module
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _tokenizer(max_length: int):
    from tlcm.shapes import world as W
    from tlcm.shapes.tokenizer import write_tokenizer

    return write_tokenizer(W.words(), tempfile.mkdtemp(prefix="tlcm-rig-tok-"), max_length)


def _prompts(n: int = 64) -> list[str]:
    from tlcm.shapes import world as W

    return [s.caption() for s in W.sample_specs(0, n, None)]


def assemble(unet, vae, te1, te2, tok, scorer: nn.Module, distance, device, dtype: torch.dtype) -> Networks:
    """An SDXL pipeline of the given networks, frozen, on ``device``, weights in ``dtype`` (as the stages load one)."""
    from diffusers import StableDiffusionXLPipeline

    from models.sdxl_shaped import build_scheduler

    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=build_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, vae, te1, te2, scorer):
        nn.Module.to(m, device=device, dtype=dtype).requires_grad_(False).eval()
    return Networks(pipe, _prompts(), scorer, distance)


def tiny_networks(params, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Networks:
    """The `smoke` teacher's sizes (``params``: the smoke preset), random weights; the shapes reward model as
    scorer; latent MSE as the distance."""
    import torch.nn.functional as F

    from models.reward import ShapesReward
    from models.sdxl_shaped import build_text_encoders, build_unet, build_vae

    p, a, t = params.teacher, params.autoencoder, params.teacher.text
    tok = _tokenizer(t.max_length)
    torch.manual_seed(0)
    vae = build_vae(a.block_out_channels, a.layers_per_block, a.latent_channels, params.world.image_size)
    te1, te2 = build_text_encoders(len(tok), t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                                   t.projection_dim, t.max_length, tok.bos_token_id, tok.eos_token_id)
    unet = build_unet(p.unet.block_out_channels, p.unet.layers_per_block, p.unet.attention_head_dim,
                      2 * t.hidden_size, t.projection_dim, p.unet.addition_time_embed_dim, a.latent_channels,
                      params.world.image_size // 2 ** (len(a.block_out_channels) - 1))
    scorer = ShapesReward(len(tok), t.max_length, params.reward.width, params.world.image_size, tokenizer=tok)
    return assemble(unet, vae, te1, te2, tok, scorer, F.mse_loss, device, dtype)


def sdxl_networks(device: torch.device | str, dtype: torch.dtype) -> Networks:
    """SDXL's architecture (the configs in :mod:`tools.plan.configs`), random weights, built on ``device``: UNet, VAE, both text
    encoders (with the word-level tokenizer; its ids are valid CLIP ids), MPS's architecture as the scorer, and the
    full-width latent LPIPS as the distance (the `sdxl` preset's)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from models.latent_lpips import LatentLPIPS
    from models.reward import MPSNet
    from tools.plan import configs as P

    tok = _tokenizer(P.SDXL_TOKENS)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    c = P.MPS_CLIP_CONFIG
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**P.SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**P.SDXL_VAE_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**P.SDXL_TEXT_ENCODER_CONFIG, **ids))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**P.SDXL_TEXT_ENCODER_2_CONFIG, **ids))
        scorer = MPSNet(CLIPConfig(text_config=c["text_config"], vision_config=c["vision_config"],
                                   projection_dim=c["projection_dim"]), tokenizer=tok)
        lpips = LatentLPIPS(4, 1).requires_grad_(False).eval()
    return assemble(unet, vae, te1, te2, tok, scorer, lambda x, y: lpips(x, y).mean(), device, dtype)


def stage_step(stage: str, params, nets: Networks) -> tuple[Callable[[int], dict[str, float]], Any]:
    """(step function, UNet) of ``stage`` as its ``run`` builds them, on ``nets`` with a fresh student LoRA
    (`lcm_baseline`'s rank, or `mlcd`'s: the unified LoRA that `ilcd`, `mps` and `dmgan` continue)."""
    import importlib

    from tasks import dmgan, mps
    from tasks.distill import fresh_student, make_step, student_of
    from tasks.finetune import M_SEGMENTS

    pipe, section = nets.pipe, params.section(stage)
    if params.teacher.gradient_checkpointing:  # as load_frozen_teacher does
        pipe.unet.enable_gradient_checkpointing()
        pipe.vae.enable_gradient_checkpointing()
    if stage in ("lcm_baseline", "mlcd", "ilcd"):
        fresh_student(pipe, params.lcm_baseline.rank if stage == "lcm_baseline" else params.mlcd.rank, section.seed)
        s = student_of(pipe, nets.distance, nets.prompts, "rig", section.num_segments)
        batches = importlib.import_module(f"tasks.{stage}").batches(s, section)
        opt = torch.optim.AdamW(s.trainable, lr=section.lr, weight_decay=0.0)
        return make_step(s, batches, opt, stage, params.teacher), pipe.unet
    fresh_student(pipe, params.mlcd.rank, section.seed)
    s = student_of(pipe, nets.distance, nets.prompts, "rig", M_SEGMENTS)
    opt = torch.optim.AdamW(s.trainable, lr=section.lr, weight_decay=0.0)
    if stage == "mps":
        return mps.make_step(s, nets.scorer, 0.0, section, opt, params.teacher), pipe.unet
    critics = dmgan.Critics(s, section, dmgan.text_dim_of(pipe.unet))
    watch = dmgan.CollapseWatch(section.collapse_window)
    return dmgan.make_step(s, critics, opt, section, watch, params.teacher), pipe.unet


class RowCounter:
    """Rows a module evaluates, split by whether autograd records them (grad mode on and the input or a weight
    requires grad)."""

    def __init__(self, module: nn.Module):
        self.module, self.counts, self._h = module, Counter(), None

    def _pre(self, module, args, kwargs) -> None:
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None:
            return
        grad = torch.is_grad_enabled() and (x.requires_grad or any(q.requires_grad for q in module.parameters()))
        self.counts[grad] += x.shape[0]

    def __enter__(self) -> "RowCounter":
        self._h = self.module.register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._h.remove()


def count_evals(stage: str, params, tiny_params, steps: int = 2, batch_size: int | None = None):
    """:class:`tools.plan.counts.StageEvals` per sample per iteration of ``stage`` as ``params`` configures it (M, p, q, w,
    teacher path, critic updates, ...), counted while its real step runs ``steps`` times on the tiny teacher of
    ``tiny_params``. ``batch_size`` overrides the section's (per-sample counts do not depend on it; a large batch
    makes the MDS path's mean over random segments exact to a few hundredths). The teacher buffer's chunk, made at
    the first step and used for ``buffer_refresh`` steps, is spread over those steps."""
    from tools.plan.counts import StageEvals

    section = params.section(stage)
    if batch_size is not None:
        params = params.model_copy(update={stage: section.model_copy(update={"batch_size": batch_size})})
        section = params.section(stage)
    nets = tiny_networks(tiny_params)
    calls = Counter()
    nets.distance = _counted(nets.distance, calls)
    step, unet = stage_step(stage, params, nets)
    counters = {"unet": UNetCounter(unet), "text": RowCounter(nets.pipe.text_encoder),
                "vae": RowCounter(nets.pipe.vae.decoder), "scorer": RowCounter(nets.scorer)}
    deltas: list[dict[str, float]] = []
    for c in counters.values():
        c.__enter__()
    try:
        for i in range(steps):
            before = _flat(counters, calls)
            step(i)
            after = _flat(counters, calls)
            deltas.append({k: after.get(k, 0) - before.get(k, 0) for k in after})
    finally:
        for c in counters.values():
            c.__exit__()
    keys = set().union(*deltas)
    if getattr(section, "teacher_path", "mds") == "buffer" and stage != "ilcd":
        first, last = deltas[0], deltas[-1]
        per = {k: last.get(k, 0) + (first.get(k, 0) - last.get(k, 0)) / section.buffer_refresh for k in keys}
    else:
        per = {k: sum(d.get(k, 0) for d in deltas) / steps for k in keys}
    n = section.batch_size
    g = lambda k: per.get(k, 0) / n  # noqa: E731
    return StageEvals(teacher=g("teacher/0") + g("teacher/1"), student=g("student/0"), student_grad=g("student/1"),
                      fake=g("fake/0"), fake_grad=g("fake/1"),
                      encoder=g("encoder:teacher/0") + g("encoder:critic/0"),
                      encoder_grad=g("encoder:teacher/1") + g("encoder:critic/1"),
                      lpips=per.get("d", 0), text=g("text/0"), vae_decode_grad=g("vae/1"), scorer_grad=g("scorer/1"))


def _counted(distance, calls: Counter):
    def d(x, y):
        calls["d"] += 1
        return distance(x, y)
    return d


def _flat(counters: dict, calls: Counter) -> dict[str, int]:
    out = {f"{role}/{int(grad)}": n for (role, grad), n in counters["unet"].counts.items()}
    for name in ("text", "vae", "scorer"):
        out |= {f"{name}/{int(grad)}": n for grad, n in counters[name].counts.items()}
    return out | {"d": calls["d"]}

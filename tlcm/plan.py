"""Computed memory and throughput plan for the TLCM stages: SDXL on 80 GB A100s, and the `mini` teacher.

Nothing here allocates real weights or reads files. Every network is built on the ``meta`` device
from its config (the SDXL configs are written out below, as in
``stabilityai/stable-diffusion-xl-base-1.0``), and every number is counted on that meta graph:

* parameters: ``numel`` of the meta modules; LoRA parameters by attaching our adapter
  (:data:`models.lora.LORA_TARGETS`) with peft to the meta UNet;
* FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` over one call at batch 1 (forward, and
  the backward our training runs: grads only to the LoRA or to the input, the base frozen);
* activation memory: the bytes of the distinct storages autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``, weights excluded), with attention routed to the
  fused kernels an A100 runs (flash / memory-efficient: they save q, k, v, out and the
  log-sum-exp, never the attention matrix); with gradient checkpointing, diffusers'
  ``enable_gradient_checkpointing`` is given a *measuring* checkpoint function that runs each
  segment once and books memory as torch's non-reentrant checkpoint holds it (segment inputs
  kept, segment-internal saves dropped and recomputed in backward);
* peak live activation bytes of a no-grad forward (the teacher's solver steps): a dispatch
  mode that follows every storage an op creates until it is freed.

The per-stage evaluation counts are counted, not typed: each stage's own step function (``make_step`` in
``tasks/distill.py``, ``tasks/mps.py``, ``tasks/dmgan.py``) runs on a tiny in-memory teacher with a counting UNet
(:func:`tlcm.rig.count_evals`), so they follow OUR code paths, not the paper's prose. Throughput uses the
convention forward + backward = 3 forwards (the measured backward of a frozen-base LoRA is shown
next to it); memory and A100-hours are estimates from these counts, labelled as such in the tables.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

GiB = 2**30
A100_BF16_PEAK_FLOPS = 312e12  # dense bf16 tensor-core peak (NVIDIA A100 datasheet)
A100_MEMORY_BYTES = 80 * GiB  # "80 GB" A100: 81,920 MiB
PAPER_A100_HOURS = 70.0  # TLCM paper: ~70 A100-hours for the whole SDXL recipe

# ---- architectures (stabilityai/stable-diffusion-xl-base-1.0, written out; checked against its config.json files) ----

SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(  # CLIP ViT-L/14 text tower (CLIPTextModel)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = dict(  # OpenCLIP ViT-bigG/14 text tower (CLIPTextModelWithProjection)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5,
)
SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=1024, scaling_factor=0.13025,
)
# MPS (Kwai-Kolors) = CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) + a 4-layer cross model (models/reward.py).
MPS_CLIP_CONFIG: dict[str, Any] = dict(
    projection_dim=1024,
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5),
)
SDXL_TOKENS = 77
SDXL_POOLED_DIM = 1280  # text_encoder_2 projection = 2816 - 6 * 256


# ---- building on the meta device ------------------------------------------------------------------------------------

def on_meta(build: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """``build()`` with every parameter created on the meta device (no memory), then cast to ``dtype``, frozen."""
    with torch.device("meta"):
        module = build()
    nn.Module.to(module, dtype)  # plain nn.Module.to: diffusers' override only adds a float32-module warning
    return module.requires_grad_(False)


def build_unet(config: dict[str, Any], dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    return on_meta(lambda: UNet2DConditionModel(**config), dtype)


def build_vae(config: dict[str, Any], dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return on_meta(lambda: AutoencoderKL(**config), dtype)


def build_text_encoder(config: dict[str, Any], with_projection: bool, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return on_meta(lambda: cls(CLIPTextConfig(**config)), dtype)


def build_mps(config: dict[str, Any], dtype: torch.dtype):
    """The MPS scorer exactly as :class:`models.reward.MPSNet` builds it (CLIP + cross model)."""
    from transformers import CLIPConfig

    from models.reward import MPSNet

    clip = CLIPConfig(text_config=config["text_config"], vision_config=config["vision_config"],
                      projection_dim=config["projection_dim"])
    return on_meta(lambda: MPSNet(clip), dtype)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def attach_lora(unet, rank: int, name: str = "student") -> int:
    """Attach our LoRA (:func:`models.lora.add_lora`) to a meta UNet, trainable; returns its parameter count."""
    from models.lora import add_lora, lora_parameters

    dtype = next(unet.parameters()).dtype
    with torch.device("meta"):  # peft would otherwise initialise every adapter on the CPU first
        add_lora(unet, rank, name)
    params = lora_parameters(unet, name)
    for p in params:
        p.data = p.data.to(dtype)  # bf16 compute, as under autocast; the fp32 master copy is booked as optimizer state
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


# ---- measuring on the meta graph ------------------------------------------------------------------------------------

def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it)."""
    return t.untyped_storage()._cdata


def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to the fused kernels an A100 runs: flash for bf16/fp16 with head
    dim <= 256, memory-efficient otherwise (fp32; the VAE's single 512-dim head). Their autograd saves q, k, v, out and
    the log-sum-exp, not the (L × L) attention matrix of the math path a CPU/meta dispatch would pick. Calls with a
    mask or GQA keep the original function."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                      False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, dropout_p,
                                                                      is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class SavedTensorMeter:
    """Books every tensor autograd saves (by storage, weights excluded) while active, split into the saves outside any
    checkpointed segment and per segment. Also a diffusers ``gradient_checkpointing_func``: pass
    :meth:`checkpoint` to ``enable_gradient_checkpointing``; each segment then runs once, without recomputation, and
    its tensor inputs are booked as what torch's non-reentrant checkpoint keeps alive."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {storage_key(t) for t in exclude}
        self.outside: dict[int, torch.UntypedStorage] = {}
        self.inputs: dict[int, torch.UntypedStorage] = {}
        self.segments: list[dict[int, torch.UntypedStorage]] = []
        self._depth = 0

    def _book(self, t: torch.Tensor, into: dict[int, torch.UntypedStorage]) -> None:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            key = storage_key(t)
            if key not in self.exclude:
                into.setdefault(key, t.untyped_storage())  # holding the storage keeps its key unique

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self._book(t, self.segments[-1] if self._depth else self.outside)
        return t

    def checkpoint(self, module: Callable, *args: Any) -> Any:
        if self._depth == 0:
            for a in args:
                self._book(a, self.inputs)
            self.segments.append({})
        self._depth += 1
        try:
            return module(*args)
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def active(self) -> Iterator["SavedTensorMeter"]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self

    @staticmethod
    def _bytes(*groups: dict[int, torch.UntypedStorage]) -> int:
        merged: dict[int, torch.UntypedStorage] = {}
        for g in groups:
            merged.update(g)
        return sum(s.nbytes() for s in merged.values())

    @property
    def saved_bytes(self) -> int:
        """Without checkpointing: everything saved, each storage once."""
        return self._bytes(self.outside, *self.segments)

    @property
    def checkpointed_bytes(self) -> int:
        """With checkpointing, held from forward to backward: saves outside segments + segment inputs."""
        return self._bytes(self.outside, self.inputs)

    @property
    def largest_segment_bytes(self) -> int:
        """The largest segment's own saves: re-created, one segment at a time, during backward."""
        return max((self._bytes(s) for s in self.segments), default=0)


class LiveActivationBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create and that are still referenced (inputs and weights not counted)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.known = {storage_key(t) for t in exclude}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs or {})):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and storage_key(t) not in self.live:
                self.known.add(storage_key(t))
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                key = storage_key(t)
                if key not in self.known and key not in self.live:
                    self.live[key] = (StorageWeakRef(t.untyped_storage()), storage_bytes(t))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@dataclass(frozen=True)
class CallCost:
    """One network call at batch 1 on the meta graph. Zero where not measured (a no-grad-only call has no saves)."""
    fwd_flops: int
    bwd_flops: int = 0
    saved_bytes: int = 0
    saved_bytes_ckpt: int = 0
    segment_bytes: int = 0
    peak_nograd_bytes: int = 0


def measure_grad_call(call: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor],
                      meter: SavedTensorMeter | None = None) -> CallCost:
    """Forward (with grad) + backward of ``call()`` counted: FLOPs of each, and the saved-for-backward bytes.
    ``meter``: a :class:`SavedTensorMeter` already installed as the model's checkpoint function (else a fresh one,
    and the checkpointed numbers equal the plain ones)."""
    meter = meter or SavedTensorMeter(exclude)
    meter.exclude |= {storage_key(t) for t in exclude}
    with fused_attention():
        with FlopCounterMode(display=False) as fwd, meter.active():
            out = call()
        with FlopCounterMode(display=False) as bwd:
            out.float().sum().backward()
    ckpt = meter.checkpointed_bytes if meter.segments else meter.saved_bytes
    return CallCost(fwd.get_total_flops(), bwd.get_total_flops(), meter.saved_bytes, ckpt, meter.largest_segment_bytes)


def measure_checkpointed(model, call: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> CallCost:
    """:func:`measure_grad_call` with the diffusers model's own gradient checkpointing routed through a
    :class:`SavedTensorMeter` (one pass gives the plain and the checkpointed numbers)."""
    meter = SavedTensorMeter(exclude)
    model.enable_gradient_checkpointing(meter.checkpoint)
    try:
        return measure_grad_call(call, exclude, meter)
    finally:
        model.disable_gradient_checkpointing()


def measure_nograd_call(call: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> CallCost:
    """FLOPs and peak live activation bytes of ``call()`` under ``torch.no_grad``."""
    tracker = LiveActivationBytes(exclude)
    with fused_attention(), torch.no_grad(), FlopCounterMode(display=False) as fc, tracker:
        call()
    return CallCost(fc.get_total_flops(), peak_nograd_bytes=tracker.peak)


def module_tensors(*modules: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer (their storages are weights, not activations)."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def meta(shape: tuple[int, ...], dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.zeros(shape, device="meta", dtype=dtype, requires_grad=grad)


# ---- the networks of one teacher, measured -------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetCosts:
    """The UNet as teacher (adapters off), student (LoRA, forward + backward), and discriminator encoder."""
    params: int
    lora_params_per_rank: int  # LoRA parameters are linear in the rank
    rank: int
    teacher: CallCost  # no grad, adapters off: F_base and the solver's peak activation memory
    student: CallCost  # LoRA at ``rank``, grad to the LoRA only; saves with and without checkpointing
    encoder: CallCost  # down + mid blocks (models.gan.unet_encoder_features), grad to the input
    encoder_nograd_flops: int

    def lora_params(self, rank: int) -> int:
        return self.lora_params_per_rank * rank

    def lora_fwd_flops(self, rank: int) -> float:
        """LoRA's extra forward FLOPs (linear in the rank: every LoRA term is r-dimensional)."""
        return (self.student.fwd_flops - self.teacher.fwd_flops) * rank / self.rank

    def student_fwd_flops(self, rank: int) -> float:
        return self.teacher.fwd_flops + self.lora_fwd_flops(rank)


def unet_inputs(unet, batch: int, tokens: int, dtype: torch.dtype):
    """(z, t, Cond) for one call: latents at the config's sample size, ``tokens`` text tokens, SDXL ids if text_time."""
    from models.denoiser import Cond

    cfg = unet.config
    z = meta((batch, cfg.in_channels, cfg.sample_size, cfg.sample_size), dtype)
    t = torch.zeros(batch, device="meta", dtype=torch.long)
    embeds = meta((batch, tokens, cfg.cross_attention_dim), dtype)
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return z, t, Cond(embeds, meta((batch, pooled_dim), dtype), meta((batch, 6), dtype))
    return z, t, Cond(embeds, None, None)


def unet_call(unet, z: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
    """ε̂ exactly as :class:`models.denoiser.Denoiser` calls the UNet."""
    from models.denoiser import Denoiser

    return Denoiser(unet, None).eps(z, t, c)


def measure_unet(config: dict[str, Any], rank: int, tokens: int, dtype: torch.dtype) -> UNetCosts:
    """Build the UNet on meta, attach a rank-``rank`` LoRA, and measure the three ways our stages call it."""
    from models.gan import unet_encoder_features
    from models.lora import adapters_disabled

    unet = build_unet(config, dtype)
    params = param_count(unet)
    lora = attach_lora(unet, rank)
    weights = module_tensors(unet)
    z, t, c = unet_inputs(unet, 1, tokens, dtype)
    with adapters_disabled(unet):
        teacher = measure_nograd_call(lambda: unet_call(unet, z, t, c), weights)
    student = measure_checkpointed(unet, lambda: unet_call(unet, z, t, c), weights)
    for p in unet.parameters():
        p.requires_grad_(False)  # the discriminator's encoder: frozen weights, gradient to its input only
    zg = meta(tuple(z.shape), dtype, grad=True)
    with adapters_disabled(unet):  # its blocks checkpoint like the full UNet's
        encoder = measure_checkpointed(unet, lambda: unet_encoder_features(unet, zg, t, c), weights)
        enc_nograd = measure_nograd_call(lambda: unet_encoder_features(unet, z, t, c), weights)
    return UNetCosts(params, lora // rank, rank, teacher, student, encoder, enc_nograd.fwd_flops)


# ---- what each stage runs per sample per iteration (our code) ------------------------------------------------------

@dataclass(frozen=True)
class StageEvals:
    """Network calls per training iteration per sample, as our code makes them. CFG is 2 UNet evaluations (one batched
    call on [uncond, cond]); ``*_grad`` calls are forward + backward."""
    teacher: float  # UNet, adapters off, no grad (solver steps, real score)
    student: float  # UNet + student LoRA, no grad (ẑ_0 steps, targets)
    student_grad: float  # UNet + student LoRA, forward + backward
    fake: float = 0.0  # UNet + fake-score LoRA, no grad
    fake_grad: float = 0.0
    encoder: float = 0.0  # discriminator encoder (down + mid), no grad
    encoder_grad: float = 0.0  # encoder, gradient to its input (the generator's GAN term)
    lpips: float = 1.0  # latent LPIPS d(pred, target): one VGG pass on both, gradient through pred
    text: float = 1.0  # prompt encodings (both text encoders), no grad
    vae_decode_grad: float = 0.0  # VAE decoder, gradient to the latent (mps)
    scorer_grad: float = 0.0  # reward-model calls, gradient to the image (mps: c_pos and c_neg)


def unet_forward_equivalents(e: StageEvals, encoder_fraction: float) -> float:
    """UNet forward-equivalents per sample per iteration: forward + backward = 3, the encoder at its FLOP fraction."""
    return (e.teacher + e.student + e.fake + 3 * (e.student_grad + e.fake_grad)
            + encoder_fraction * (e.encoder + 3 * e.encoder_grad))


# ---- the plan's inputs: every network of one teacher + the recipe ---------------------------------------------------

@dataclass(frozen=True)
class NetCosts:
    """Everything a stage runs, measured at batch 1."""
    name: str
    dtype: torch.dtype
    unet: UNetCosts
    text_params: tuple[int, ...]
    text_flops: int
    vae_params: int
    vae_decoder_params: int
    vae_decode: CallCost  # grad to the latent; checkpointed numbers with the VAE's own checkpointing
    vae_decode_nograd_peak: int
    scorer_name: str
    scorer_params: int
    scorer: CallCost  # one score call, grad to the image
    lpips_params: int
    lpips: CallCost  # one d(pred, target) call, grad through pred
    head_params: int
    latent_numel: int = 0  # one latent (C × H × W): what the teacher buffer keeps per state


@dataclass(frozen=True)
class StageRecipe:
    stage: str
    iterations: int
    batch_size: int
    evals: StageEvals
    trainable_ranks: tuple[int, ...]  # LoRA adapters with optimizer state (student; + fake in dmgan)
    trains_head: bool = False
    in_paper: bool = True
    buffer_latents: int = 0  # latent states the teacher buffer keeps (one chunk, all on one GPU: an upper bound)


MDS_COUNT_BATCH = 512  # the MDS path's segments are random: its mean over 512 pairs (±0.2 evaluations at M = 8)


def counted_evals(stage: str, params, tiny_params) -> StageEvals:
    """``stage``'s evaluations per sample per iteration, counted by running its real step (``make_step``) on a tiny
    teacher with a counting UNet (:func:`tlcm.rig.count_evals`); cached per configuration."""
    section = params.section(stage)
    key = (stage, section.model_dump_json(exclude={"steps", "lr", "max_minutes", "checkpoint_every", "eval_every"}),
           params.ilcd.rank)
    if key not in _COUNTS:
        from tlcm.rig import count_evals

        mds = stage in ("mlcd", "lcm_baseline") and section.teacher_path == "mds"
        _COUNTS[key] = count_evals(stage, params, tiny_params, **({"steps": 1, "batch_size": MDS_COUNT_BATCH}
                                                                  if mds else {}))
    return _COUNTS[key]


_COUNTS: dict[tuple, StageEvals] = {}


def buffer_latents(section) -> int:
    """Latent states one chunk of the teacher buffer holds (0 on Alg. 1's path)."""
    if section.teacher_path != "buffer":
        return 0
    from models.tlcm import buffer_states_per_trajectory, milestones

    return section.buffer_trajectories * buffer_states_per_trajectory(milestones(section.num_segments), section.skip)


def params_recipe(params, tiny_params, evals: dict[str, StageEvals] | None = None,
                  mds_comparison: bool = False) -> list[StageRecipe]:
    """The stages as ``params`` (a :class:`tlcm.params.Params`) configures them: iterations, batch, LoRA ranks, and the
    evaluations their code makes (``evals``, or counted on the tiny teacher of ``tiny_params``). `lcm_baseline` is our
    comparison (MLCD's budget, one segment), not part of the paper's cost. ``mds_comparison``: with the teacher
    buffer on, also `mlcd` on Alg. 1's multistep-denoising path (a comparison row, not in the totals)."""
    b, m, i, d = params.lcm_baseline, params.mlcd, params.ilcd, params.dmgan
    e = evals if evals is not None else {st: counted_evals(st, params, tiny_params)
                                         for st in ("lcm_baseline", "mlcd", "ilcd", "mps", "dmgan")}
    out = [StageRecipe("lcm_baseline", b.steps, b.batch_size, e["lcm_baseline"], (b.rank,), in_paper=False,
                       buffer_latents=buffer_latents(b)),
           StageRecipe(f"mlcd ({m.teacher_path})", m.steps, m.batch_size, e["mlcd"], (m.rank,),
                       buffer_latents=buffer_latents(m))]
    if mds_comparison and m.teacher_path != "mds":
        mds = params.model_copy(update={"mlcd": m.model_copy(update={"teacher_path": "mds"})})
        out.append(StageRecipe("mlcd (mds: Alg. 1, for comparison)", m.steps, m.batch_size,
                               e.get("mlcd_mds") or counted_evals("mlcd", mds, tiny_params), (m.rank,), in_paper=False))
    return out + [
        StageRecipe("ilcd", i.steps, i.batch_size, e["ilcd"], (i.rank,)),
        StageRecipe("mps", params.mps.steps, params.mps.batch_size, e["mps"], (i.rank,)),
        StageRecipe("dmgan", d.steps, d.batch_size, e["dmgan"], (i.rank, d.fake_rank), trains_head=True),
    ]


def sdxl_params(params_file="params.yaml"):
    """The `sdxl` preset (configs/presets/sdxl.yaml over ``params_file``): the paper's recipe (DESIGN §2): MLCD 12,000
    iterations at batch 8, iLCD 2,000 (8), MPS 500 (8), DM+GAN 1,000 (4), rank 64, w = 8, M = 8, p = 3, q = 4."""
    from tlcm.params import load_params

    return load_params(params_file, "sdxl")


def smoke_params(params_file="params.yaml"):
    """The tiny teacher the evaluations are counted on."""
    from tlcm.params import load_params

    return load_params(params_file, "smoke")


# ---- throughput -----------------------------------------------------------------------------------------------------

def encoder_fraction(n: NetCosts) -> float:
    return n.unet.encoder_nograd_flops / n.unet.teacher.fwd_flops


def sample_flops(n: NetCosts, r: StageRecipe, measured_backward: bool = False) -> float:
    """FLOPs per sample per iteration. Backward = 2 × forward by convention, or the measured backward (frozen base:
    only input-gradients through the base layers, weight-gradients for the LoRA)."""
    e, u = r.evals, n.unet
    rank, fake_rank = r.trainable_ranks[0], r.trainable_ranks[-1]
    f_student, f_fake = u.student_fwd_flops(rank), u.student_fwd_flops(fake_rank)

    def fb(fwd: float, bwd: float) -> float:
        return fwd + (bwd if measured_backward else 2 * fwd)

    student_bwd = u.student.bwd_flops  # measured at u.rank; the rank's share of the backward is small
    return (e.teacher * u.teacher.fwd_flops + e.student * f_student + e.fake * f_fake
            + e.student_grad * fb(f_student, student_bwd) + e.fake_grad * fb(f_fake, student_bwd)
            + e.encoder * u.encoder_nograd_flops + e.encoder_grad * fb(u.encoder.fwd_flops, u.encoder.bwd_flops)
            + e.lpips * fb(n.lpips.fwd_flops, n.lpips.bwd_flops) + e.text * n.text_flops
            + e.vae_decode_grad * fb(n.vae_decode.fwd_flops, n.vae_decode.bwd_flops)
            + e.scorer_grad * fb(n.scorer.fwd_flops, n.scorer.bwd_flops))


def recompute_flops(n: NetCosts, r: StageRecipe) -> float:
    """Extra FLOPs per sample per iteration with gradient checkpointing: one more forward of every checkpointed
    grad-carrying call (student, fake score, encoder, VAE decoder; the scorer and LPIPS are not checkpointed)."""
    e, u = r.evals, n.unet
    return (e.student_grad * u.student_fwd_flops(r.trainable_ranks[0])
            + e.fake_grad * u.student_fwd_flops(r.trainable_ranks[-1])
            + e.encoder_grad * u.encoder.fwd_flops + e.vae_decode_grad * n.vae_decode.fwd_flops)


def a100_hours(flops: float, mfu: float) -> float:
    """Hours of one A100 at ``mfu`` × the dense bf16 peak."""
    return flops / (A100_BF16_PEAK_FLOPS * mfu) / 3600


@dataclass(frozen=True)
class Throughput:
    stage: str
    iterations: int
    batch_size: int
    unet_fwd_equivalents: float  # per sample per iteration
    flops_per_iteration: float
    flops_per_iteration_measured_bwd: float
    recompute_per_iteration: float  # extra with gradient checkpointing
    in_paper: bool

    @property
    def total_flops(self) -> float:
        return self.flops_per_iteration * self.iterations


def throughput(n: NetCosts, recipe: list[StageRecipe]) -> list[Throughput]:
    frac = encoder_fraction(n)
    return [Throughput(r.stage, r.iterations, r.batch_size, unet_forward_equivalents(r.evals, frac),
                       r.batch_size * sample_flops(n, r), r.batch_size * sample_flops(n, r, measured_backward=True),
                       r.batch_size * recompute_flops(n, r), r.in_paper) for r in recipe]


def implied_mfu(total_flops: float, hours: float = PAPER_A100_HOURS) -> float:
    """The MFU at which ``total_flops`` take ``hours`` A100-hours."""
    return total_flops / (hours * 3600 * A100_BF16_PEAK_FLOPS)


# ---- memory ---------------------------------------------------------------------------------------------------------

ADAMW_BYTES_PER_PARAM = 16  # fp32 master weight + fp32 grad + AdamW exp_avg + exp_avg_sq


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryPlan:
    """One stage on one GPU: bytes that do not scale with the batch, and bytes per sample (estimated from the
    measured counts)."""
    stage: str
    frozen_bytes: int  # frozen weights in the compute dtype
    trainable_bytes: int  # trainable params with fp32 master copy, grads and AdamW states
    activation_bytes: int  # per sample: saved for backward by every grad-carrying call alive at the peak
    transient_bytes: int  # per sample: the largest short-lived working set (no-grad solver call, recompute)
    checkpointing: bool
    buffer_bytes: int = 0  # the teacher buffer's states (float32 latents)

    @property
    def fixed_bytes(self) -> int:
        return self.frozen_bytes + self.trainable_bytes + self.buffer_bytes

    @property
    def per_sample_bytes(self) -> int:
        return self.activation_bytes + self.transient_bytes

    def total_bytes(self, batch: int) -> int:
        return self.fixed_bytes + batch * self.per_sample_bytes

    def max_batch(self, budget_bytes: float) -> int:
        """Largest per-GPU batch with ``total_bytes(batch) <= budget_bytes`` (0: not even one sample fits)."""
        return max(0, int((budget_bytes - self.fixed_bytes) // self.per_sample_bytes))


def memory_plan(n: NetCosts, r: StageRecipe, checkpointing: bool) -> MemoryPlan:
    """Frozen: one UNet (teacher, student and fake score are adapters on it), both text encoders, the latent LPIPS;
    for `mps` also the VAE and the scorer. Trainable: every LoRA in ``r.trainable_ranks`` (+ the discriminator head).
    Activations per sample: the student's grad forward (+ the encoder's in dmgan's generator step, + VAE decode and
    two scorer calls in mps) + LPIPS. Transient per sample: the biggest of a CFG solver call (2 × the no-grad peak),
    the largest recomputed segment (with checkpointing), the VAE decoder's no-grad peak (mps)."""
    e, u, b = r.evals, n.unet, dtype_bytes(n.dtype)
    frozen = (u.params + sum(n.text_params) + n.lpips_params) * b
    if e.vae_decode_grad:
        frozen += (n.vae_params + n.scorer_params) * b
    trainable = sum(u.lora_params(k) for k in r.trainable_ranks) * ADAMW_BYTES_PER_PARAM
    trainable += n.head_params * ADAMW_BYTES_PER_PARAM if r.trains_head else 0

    def saved(c: CallCost) -> int:
        return c.saved_bytes_ckpt if checkpointing else c.saved_bytes

    act = saved(u.student) + (saved(u.encoder) if e.encoder_grad else 0) + (n.lpips.saved_bytes if e.lpips else 0)
    if e.vae_decode_grad:
        act += saved(n.vae_decode) + int(e.scorer_grad) * saved(n.scorer)
    transient = [2 * u.teacher.peak_nograd_bytes]  # a CFG solver call runs the UNet on [uncond, cond]: 2× the batch
    if checkpointing:
        transient += [u.student.segment_bytes] + ([n.vae_decode.segment_bytes] if e.vae_decode_grad else [])
    if e.vae_decode_grad:
        transient.append(n.vae_decode_nograd_peak)
    latent = 4 * n.latent_numel  # the buffer keeps float32 latents
    return MemoryPlan(r.stage, frozen, trainable, act, max(transient), checkpointing, r.buffer_latents * latent)


def dmd2_layout_bytes(n: NetCosts) -> dict[str, int]:
    """DMD2's layout (Yin et al. 2024): a frozen real-score UNet + a fully trainable fake-score UNet + a fully
    trainable generator UNet, each trainable copy with fp32 weights, grads and AdamW states; plus the text encoders."""
    u, b = n.unet.params, dtype_bytes(n.dtype)
    return {"real score (frozen)": u * b, "fake score (trainable)": u * ADAMW_BYTES_PER_PARAM,
            "generator (trainable)": u * ADAMW_BYTES_PER_PARAM, "text encoders (frozen)": sum(n.text_params) * b}


# ---- measuring one teacher's networks -------------------------------------------------------------------------------

def measure_text(configs: Iterable[tuple[dict[str, Any], bool]], tokens: int, dtype: torch.dtype
                 ) -> tuple[tuple[int, ...], int]:
    """(parameter counts, forward FLOPs of one prompt through all of them, as ``encode_prompt`` runs them)."""
    counts, flops = [], 0
    for cfg, proj in configs:
        te = build_text_encoder(cfg, proj, dtype)
        counts.append(param_count(te))
        ids = torch.zeros(1, tokens, device="meta", dtype=torch.long)
        flops += measure_nograd_call(lambda: te(ids, output_hidden_states=True), module_tensors(te)).fwd_flops
    return tuple(counts), flops


def measure_vae(vae, dtype: torch.dtype) -> tuple[int, int, CallCost, int]:
    """(params, decoder params, decode with grad to the latent, decode no-grad peak); latents of side
    ``sample_size / 2^(levels - 1)``."""
    cfg = vae.config
    side = cfg.sample_size // 2 ** (len(cfg.block_out_channels) - 1)
    weights = module_tensors(vae)
    z = meta((1, cfg.latent_channels, side, side), dtype, grad=True)
    cost = measure_checkpointed(vae, lambda: vae.decode(z).sample, weights)
    peak = measure_nograd_call(lambda: vae.decode(z.detach()).sample, weights).peak_nograd_bytes
    decoder = param_count(vae.decoder) + param_count(vae.post_quant_conv)
    return param_count(vae), decoder, cost, peak


def measure_mps_scorer(image_side: int, dtype: torch.dtype) -> tuple[int, CallCost]:
    """One MPS call as ``MPSNet.score`` makes it (CLIP preprocessing of the decoded image, prompt and condition text),
    gradient to the image."""
    from models.reward import clip_preprocess

    net = build_mps(MPS_CLIP_CONFIG, dtype)
    ids = torch.zeros(1, SDXL_TOKENS, device="meta", dtype=torch.long)
    images = meta((1, 3, image_side, image_side), dtype, grad=True)
    size = MPS_CLIP_CONFIG["vision_config"]["image_size"]
    cost = measure_grad_call(lambda: net(clip_preprocess(images, size), ids, ids), module_tensors(net))
    return param_count(net), cost


def measure_lpips(channels: int, side: int, width_divisor: int, dtype: torch.dtype) -> tuple[int, CallCost]:
    """One ``LatentLPIPS(pred, target)`` call: one VGG pass on [pred, target], gradient through pred."""
    from models.latent_lpips import LatentLPIPS

    net = on_meta(lambda: LatentLPIPS(channels, width_divisor), dtype)
    x, y = meta((1, channels, side, side), dtype, grad=True), meta((1, channels, side, side), dtype)
    return param_count(net), measure_grad_call(lambda: net(x, y), module_tensors(net))


def head_param_count(unet_config: dict[str, Any]) -> int:
    """The discriminator head (:func:`models.gan.head_for`) on the UNet's deepest channels, projecting pooled text."""
    from models.gan import DiscriminatorHead

    text_dim = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    return param_count(on_meta(lambda: DiscriminatorHead(unet_config["block_out_channels"][-1], text_dim),
                               torch.float32))


def sdxl_costs(rank: int = 64, lpips_width_divisor: int = 1, dtype: torch.dtype = torch.bfloat16) -> NetCosts:
    """Every network of the `sdxl` preset at 1024² (128² latents, 77 tokens), batch 1, in ``dtype``."""
    unet = measure_unet(SDXL_UNET_CONFIG, rank, SDXL_TOKENS, dtype)
    text_params, text_flops = measure_text([(SDXL_TEXT_ENCODER_CONFIG, False), (SDXL_TEXT_ENCODER_2_CONFIG, True)],
                                           SDXL_TOKENS, dtype)
    vae_params, dec_params, vae_cost, vae_peak = measure_vae(build_vae(SDXL_VAE_CONFIG, dtype), dtype)
    scorer_params, scorer = measure_mps_scorer(SDXL_VAE_CONFIG["sample_size"], dtype)
    lpips_params, lpips = measure_lpips(4, SDXL_UNET_CONFIG["sample_size"], lpips_width_divisor, dtype)
    return NetCosts(f"SDXL 1024² ({str(dtype).removeprefix('torch.')})", dtype, unet, text_params, text_flops, vae_params, dec_params, vae_cost, vae_peak,
                    "MPS (CLIP ViT-H/14 + cross)", scorer_params, scorer, lpips_params, lpips,
                    head_param_count(SDXL_UNET_CONFIG), 4 * SDXL_UNET_CONFIG["sample_size"] ** 2)


def mini_unet_config(params) -> dict[str, Any]:
    """The `mini` teacher's UNet config as :func:`tasks.teacher.build_pipeline` makes it (no artifacts needed)."""
    from models.sdxl_shaped import build_unet as shaped_unet

    p, a = params.teacher, params.autoencoder
    side = params.world.image_size // 2 ** (len(a.block_out_channels) - 1)
    with torch.device("meta"):
        unet = shaped_unet(p.unet.block_out_channels, p.unet.layers_per_block, p.unet.attention_head_dim,
                           2 * p.text.hidden_size, p.text.projection_dim, p.unet.addition_time_embed_dim,
                           a.latent_channels, side)
    return {k: v for k, v in unet.config.items() if not k.startswith("_")}


def mini_costs(params) -> NetCosts:
    """The `mini` preset's networks (fp32, as the CPU runs them): teacher UNet, text encoders, VAE, the shapes-world
    reward model as the scorer, latent LPIPS at its width divisor."""
    from models.reward import ShapesReward
    from models.sdxl_shaped import build_vae as shaped_vae
    from tlcm import world as W
    from tlcm.tokenizer import BOS, EOS, build_vocab

    dtype, p, a = torch.float32, params.teacher, params.autoencoder
    unet_cfg = mini_unet_config(params)
    ids = build_vocab(W.words())[0]
    vocab, t = len(ids), p.text
    text_cfg = dict(vocab_size=vocab, hidden_size=t.hidden_size, intermediate_size=4 * t.hidden_size,
                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                    max_position_embeddings=t.max_length, projection_dim=t.projection_dim, hidden_act="gelu",
                    bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[EOS])
    unet = measure_unet(unet_cfg, params.mlcd.rank, t.max_length, dtype)
    text_params, text_flops = measure_text([(text_cfg, False), (text_cfg, True)], t.max_length, dtype)
    vae = on_meta(lambda: shaped_vae(a.block_out_channels, a.layers_per_block, a.latent_channels,
                                     params.world.image_size), dtype)
    vae_params, dec_params, vae_cost, vae_peak = measure_vae(vae, dtype)
    reward = on_meta(lambda: ShapesReward(vocab, t.max_length, params.reward.width, params.world.image_size), dtype)
    images = meta((1, 3, params.world.image_size, params.world.image_size), dtype, grad=True)
    scorer = measure_grad_call(lambda: _image_path_sum(reward, images), module_tensors(reward))
    lpips_params, lpips = measure_lpips(a.latent_channels, unet_cfg["sample_size"], params.latent_lpips.width_divisor,
                                        dtype)
    return NetCosts(f"`{params.preset}` teacher", dtype, unet, text_params, text_flops, vae_params, dec_params,
                    vae_cost, vae_peak, "shapes reward (image side)", param_count(reward), scorer, lpips_params, lpips,
                    head_param_count(unet_cfg), unet_cfg["in_channels"] * unet_cfg["sample_size"] ** 2)


def _image_path_sum(reward, images: torch.Tensor) -> torch.Tensor:
    """The shapes reward model's image side (``encode_images``), the only part the gradient to the image crosses;
    its text side runs without grad and is a few MFLOPs."""
    return sum(x.float().sum() for x in reward.encode_images(images))


# ---- markdown -------------------------------------------------------------------------------------------------------

def _si(x: float, unit: str = "") -> str:
    for div, p in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {p}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def networks_table(n: NetCosts) -> str:
    u = n.unet
    r = u.rank
    rows = [
        ["UNet (teacher, adapters off)", f"{u.params:,}", _si(u.teacher.fwd_flops, "FLOP"), "–", "–",
         _mib(u.teacher.peak_nograd_bytes)],
        [f"UNet + LoRA r{r} (student, grad to LoRA)", f"+{u.lora_params(r):,}", _si(u.student.fwd_flops, "FLOP"),
         f"{u.student.bwd_flops / u.student.fwd_flops:.2f}", f"{_mib(u.student.saved_bytes)} / "
         f"{_mib(u.student.saved_bytes_ckpt)} (+{_mib(u.student.segment_bytes)})", "–"],
        ["UNet encoder (discriminator, grad to input)", "(shared)", _si(u.encoder.fwd_flops, "FLOP"),
         f"{u.encoder.bwd_flops / u.encoder.fwd_flops:.2f}", f"{_mib(u.encoder.saved_bytes)} / "
         f"{_mib(u.encoder.saved_bytes_ckpt)} (+{_mib(u.encoder.segment_bytes)})", "–"],
        ["text encoders (both, one prompt)", " + ".join(f"{c:,}" for c in n.text_params), _si(n.text_flops, "FLOP"),
         "–", "–", "–"],
        [f"VAE decoder (grad to latent; VAE total {n.vae_params:,})", f"{n.vae_decoder_params:,}",
         _si(n.vae_decode.fwd_flops, "FLOP"), f"{n.vae_decode.bwd_flops / n.vae_decode.fwd_flops:.2f}",
         f"{_mib(n.vae_decode.saved_bytes)} / {_mib(n.vae_decode.saved_bytes_ckpt)} "
         f"(+{_mib(n.vae_decode.segment_bytes)})", _mib(n.vae_decode_nograd_peak)],
        [f"{n.scorer_name} (one call, grad to image)", f"{n.scorer_params:,}", _si(n.scorer.fwd_flops, "FLOP"),
         f"{n.scorer.bwd_flops / n.scorer.fwd_flops:.2f}", f"{_mib(n.scorer.saved_bytes)} / –", "–"],
        ["latent LPIPS (pred + target)", f"{n.lpips_params:,}", _si(n.lpips.fwd_flops, "FLOP"),
         f"{n.lpips.bwd_flops / n.lpips.fwd_flops:.2f}", f"{_mib(n.lpips.saved_bytes)} / –", "–"],
        ["discriminator head", f"{n.head_params:,}", "–", "–", "–", "–"],
    ]
    return _table(["network", "params", "fwd FLOPs (batch 1)", "bwd/fwd measured",
                   f"saved for backward MiB ({str(n.dtype).removeprefix('torch.')}): plain / checkpointed "
                   "(+largest recomputed segment)",
                   "no-grad peak MiB"], rows)


def _n(x: float) -> str:
    """A count to two decimals, without trailing zeros (counted means over pairs are not integers)."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def evals_table(recipe: list[StageRecipe], frac: float) -> str:
    rows = []
    for r in recipe:
        e = r.evals
        other = ", ".join(s for s in [f"{_n(e.vae_decode_grad)} VAE decode fwd+bwd" if e.vae_decode_grad else "",
                                      f"{_n(e.scorer_grad)} scorer fwd+bwd" if e.scorer_grad else "",
                                      f"{_n(e.lpips)} LPIPS", f"{_n(e.text)} prompt encoding"] if s)
        rows.append([r.stage, _n(e.teacher), _n(e.student), _n(e.student_grad), f"{_n(e.fake)} / {_n(e.fake_grad)}",
                     f"{_n(e.encoder)} / {_n(e.encoder_grad)}", other, f"{unet_forward_equivalents(e, frac):.2f}"])
    return _table(["stage", "teacher (CFG = 2)", "student no-grad", "student fwd+bwd", "fake no-grad / fwd+bwd",
                   "encoder no-grad / fwd+bwd", "other calls", "UNet fwd-equivalents"], rows)


def throughput_table(rows: list[Throughput], mfu: float) -> str:
    def hours(t: Throughput) -> list[float]:
        it = t.iterations
        return [a100_hours(t.total_flops, mfu), a100_hours(t.flops_per_iteration_measured_bwd * it, mfu),
                a100_hours((t.flops_per_iteration + t.recompute_per_iteration) * it, mfu)]

    out = []
    for t in rows:
        out.append([t.stage + ("" if t.in_paper else " (ours; not in the paper's cost)"), f"{t.iterations:,}",
                    str(t.batch_size), f"{t.unet_fwd_equivalents * t.batch_size:.1f}",
                    _si(t.flops_per_iteration, "FLOP"), _si(t.total_flops, "FLOP"),
                    *(f"{h:.1f}" for h in hours(t))])
    paper = [t for t in rows if t.in_paper]
    totals = [sum(col) for col in zip(*(hours(t) for t in paper))]
    out.append(["**paper stages total**", "", "", "", "", _si(sum(t.total_flops for t in paper), "FLOP"),
                *(f"**{h:.1f}**" for h in totals)])
    return _table(["stage", "iterations", "batch", "UNet fwd-eq / iteration", "FLOPs / iteration", "FLOPs total",
                   f"A100-h @ {mfu:.0%} MFU (bwd = 2 fwd)", "same, measured bwd",
                   "same, + checkpoint recompute"], out)


def memory_table(n: NetCosts, recipe: list[StageRecipe], budget: float, gpus: int = 4) -> str:
    def gib(plan: MemoryPlan, batch: int) -> str:
        total = plan.total_bytes(batch)
        return _gib(total) + (" ✗" if total > budget else "")

    rows = []
    for r in recipe:
        ck, plain = memory_plan(n, r, True), memory_plan(n, r, False)
        per_gpu = math.ceil(r.batch_size / gpus)
        rows.append([r.stage, _gib(ck.frozen_bytes), _gib(ck.trainable_bytes),
                     f"{_gib(plain.activation_bytes)} / {_gib(ck.activation_bytes)}",
                     f"{_gib(plain.transient_bytes)} / {_gib(ck.transient_bytes)}",
                     f"{plain.max_batch(budget)} / {ck.max_batch(budget)}",
                     f"{r.batch_size}: {gib(plain, r.batch_size)} / {gib(ck, r.batch_size)}",
                     f"{per_gpu}: {gib(plain, per_gpu)} / {gib(ck, per_gpu)}"])
    return _table(["stage", "frozen weights GiB", "trainable (fp32 + grad + AdamW) GiB",
                   "activations / sample GiB (plain / ckpt)", "transient / sample GiB (plain / ckpt)",
                   "max batch on 1 GPU (plain / ckpt)", "1 GPU at recipe batch: GiB plain / ckpt",
                   f"{gpus} GPUs, per-GPU batch: GiB plain / ckpt"], rows)


def dmd2_table(n: NetCosts, recipe: list[StageRecipe], budget: float) -> str:
    d = dmd2_layout_bytes(n)
    ours = memory_plan(n, next(r for r in recipe if r.stage == "dmgan"), True)
    rows = [[k, _gib(v)] for k, v in d.items()]
    rows.append(["**DMD2-style fixed total (before any activation)**", f"**{_gib(sum(d.values()))}**"])
    rows.append(["ours (dmgan): one UNet + student & fake LoRA + head, fixed total",
                 f"**{_gib(ours.fixed_bytes)}**"])
    rows.append([f"budget on one 80 GB A100 after headroom", _gib(budget)])
    return _table(["layout", "GiB"], rows)


def cpu_table(n: NetCosts, recipe: list[StageRecipe]) -> str:
    """Per stage at the recipe's batch, as our code runs on a CPU today (no checkpointing; whole pipeline resident)."""
    rows = []
    for r in recipe:
        m = memory_plan(n, r, checkpointing=False)
        pipeline = (n.vae_params if not r.evals.vae_decode_grad else 0) * dtype_bytes(n.dtype)
        flops = r.batch_size * sample_flops(n, r)
        rows.append([r.stage, f"{r.iterations:,}", str(r.batch_size), _si(flops, "FLOP"),
                     _si(flops * r.iterations, "FLOP"), _mib(m.fixed_bytes + pipeline), _mib(m.activation_bytes),
                     _mib(m.transient_bytes), _mib(m.total_bytes(r.batch_size) + pipeline)])
    return _table(["stage", "steps", "batch", "FLOPs / iteration", "FLOPs total", "weights + LoRA state MiB",
                   "activations / sample MiB", "transient / sample MiB", "computed total MiB at batch"], rows)


@dataclass(frozen=True)
class Plan:
    """One teacher's measured networks + a recipe. ``gpu``: the A100 tables; else the CPU table (the `mini` preset)."""
    costs: NetCosts
    recipe: list[StageRecipe]
    gpu: bool = True
    mfu: float = 0.40
    headroom: float = 0.10  # of the 80 GiB: CUDA context, allocator fragmentation, workspaces, AdamW temporaries

    @property
    def budget(self) -> float:
        return A100_MEMORY_BYTES * (1 - self.headroom)


def sdxl_plan(mfu: float = 0.40, headroom: float = 0.10, dtype: torch.dtype = torch.bfloat16,
              params_file="params.yaml") -> Plan:
    """The `sdxl` preset's recipe on SDXL: networks measured on the meta device, evaluations counted on a tiny teacher
    (about a minute of CPU, no memory). ``dtype``: bf16 (the plan) or fp32."""
    params = sdxl_params(params_file)
    return Plan(sdxl_costs(params.mlcd.rank, dtype=dtype),
                params_recipe(params, smoke_params(params_file), mds_comparison=True), True, mfu, headroom)


def mini_plan(params, params_file="params.yaml") -> Plan:
    """The `mini` preset's stages as ``params`` sets them (fp32, CPU)."""
    return Plan(mini_costs(params), params_recipe(params, smoke_params(params_file), mds_comparison=True), gpu=False)


def throughput_note(n: NetCosts, plan: Plan) -> str:
    total = sum(t.total_flops for t in throughput(n, plan.recipe) if t.in_paper)
    return (f"Paper: ~{PAPER_A100_HOURS:.0f} A100-hours (4×A100). Ours: A100 dense bf16 peak "
            f"{A100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s at an assumed {plan.mfu:.0%} MFU (hours scale as 1/MFU). "
            f"The paper's {PAPER_A100_HOURS:.0f} h for the same FLOPs would mean {implied_mfu(total):.0%} MFU.")


def markdown_tables(plan: Plan) -> str:
    """Every table of one plan as markdown: networks, calls per stage, throughput, memory (+ DMD2 comparison)."""
    n = plan.costs
    frac = encoder_fraction(n)
    parts = [f"### {n.name}: networks (meta device, batch 1)", networks_table(n),
             f"Discriminator encoder (down + mid blocks) = {frac:.1%} of a teacher forward's FLOPs. Saved bytes are "
             "per sample; checkpointed = held from forward to backward with the model's gradient checkpointing, "
             "(+…) = the largest segment, re-created one at a time in backward.",
             f"### {n.name}: network calls per iteration per sample (counted on our code: each stage's step on a tiny "
             f"teacher with a counting UNet; the MDS path's random segments over {MDS_COUNT_BATCH} pairs)",
             evals_table(plan.recipe, frac)]
    if not plan.gpu:
        parts += [f"### {n.name}: compute and memory per stage (computed, {str(n.dtype).removeprefix('torch.')}, "
                  "no checkpointing, as the CPU run does)", cpu_table(n, plan.recipe)]
        return "\n\n".join(parts) + "\n"
    parts += [f"### {n.name}: throughput (paper iterations and batch sizes)",
              throughput_table(throughput(n, plan.recipe), plan.mfu),
              throughput_note(n, plan),
              f"### {n.name}: memory on one 80 GB A100 (computed from the counts; budget {_gib(plan.budget)} GiB = "
              f"80 GiB − {plan.headroom:.0%} headroom; ✗ = over budget)",
              memory_table(n, plan.recipe, plan.budget),
              f"### {n.name}: DMD2-style layout vs ours", dmd2_table(n, plan.recipe, plan.budget)]
    return "\n\n".join(parts) + "\n"

"""What each stage runs per sample per iteration (:class:`StageEvals`), counted on our own step functions (not
typed: :func:`tools.rig.count_evals` runs each stage's ``make_step`` on a tiny teacher with a counting UNet), and the
recipe: the stages as a preset configures them (:func:`params_recipe`)."""
from __future__ import annotations

from dataclasses import dataclass


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
    teacher with a counting UNet (:func:`tools.rig.count_evals`); cached per configuration."""
    section = params.section(stage)
    key = (stage, section.model_dump_json(exclude={"steps", "lr", "max_minutes", "checkpoint_every", "eval_every"}),
           params.mlcd.rank)
    if key not in _COUNTS:
        from tools.rig import count_evals

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
    """The stages as ``params`` (a :class:`tlcm.core.params.Params`) configures them: iterations, batch, LoRA ranks, and the
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
        StageRecipe("ilcd", i.steps, i.batch_size, e["ilcd"], (m.rank,)),  # the unified LoRA: mlcd's rank
        StageRecipe("mps", params.mps.steps, params.mps.batch_size, e["mps"], (m.rank,)),
        StageRecipe("dmgan", d.steps, d.batch_size, e["dmgan"], (m.rank, d.fake_rank), trains_head=True),
    ]


def sdxl_params(params_file="params.yaml"):
    """The `sdxl` preset (configs/presets/sdxl.yaml over ``params_file``): the paper's recipe (DESIGN §2): MLCD 12,000
    iterations at batch 8, iLCD 2,000 (8), MPS 500 (8), DM+GAN 1,000 (4), rank 64, w = 8, M = 8, p = 3, q = 4."""
    from tlcm.core.params import load_params

    return load_params(params_file, "sdxl")


def smoke_params(params_file="params.yaml"):
    """The tiny teacher the evaluations are counted on."""
    from tlcm.core.params import load_params

    return load_params(params_file, "smoke")

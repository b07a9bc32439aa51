"""The plan as `tlcm plan` prints it: :class:`Plan` (one teacher's measured networks + a recipe), the `sdxl` and
`mini` plans, and their markdown tables."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tools.plan.counts import (MDS_COUNT_BATCH, StageRecipe, params_recipe, sdxl_params, smoke_params,
                              unet_forward_equivalents)
from tools.plan.estimates import (A100_BF16_PEAK_FLOPS, A100_MEMORY_BYTES, PAPER_A100_HOURS, GiB, MemoryPlan,
                                 Throughput, a100_hours, dmd2_layout_bytes, dtype_bytes, encoder_fraction,
                                 implied_mfu, memory_plan, sample_flops, throughput)
from tools.plan.networks import NetCosts, mini_costs, sdxl_costs


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

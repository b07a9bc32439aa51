"""tools/plan/: the meta-device counters against direct formulas and real instances, and the per-stage counts.
Tiers: the meters and the arithmetic are ``math``; the two counting tests run the stages' step functions (``stage``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tools.plan import configs, counts, estimates, meters, networks, report
from tools.plan.estimates import GiB


@pytest.fixture(scope="module")
def tiny_unet_config() -> dict:
    """A two-level SDXL-shaped UNet (text_time, cross-attention in the second level), built for real once."""
    from models.sdxl_shaped import build_unet

    torch.manual_seed(0)
    real = build_unet((8, 16), 1, 4, 12, 8, 4, 4, 8)
    return {k: v for k, v in real.config.items() if not k.startswith("_")}


@pytest.mark.math
def test_flop_counter_equals_conv_formula():
    conv = configs.on_meta(lambda: nn.Conv2d(6, 10, 3, padding=1), torch.float32)
    x = meters.meta((2, 6, 12, 12), torch.float32)
    cost = meters.measure_nograd_call(lambda: conv(x), meters.module_tensors(conv))
    assert cost.fwd_flops == 2 * 2 * 10 * 6 * 3 * 3 * 12 * 12  # 2·N·C_out·C_in·k²·H·W (bias not counted)
    assert cost.peak_nograd_bytes == 2 * 10 * 12 * 12 * 4  # the output is the only activation


@pytest.mark.math
def test_meta_counts_equal_a_real_tiny_instance(tiny_unet_config):
    from diffusers import UNet2DConditionModel

    from models.lora import add_lora, lora_parameters

    torch.manual_seed(0)
    real = UNet2DConditionModel(**tiny_unet_config)
    meta = configs.build_unet(tiny_unet_config, torch.bfloat16)
    assert configs.param_count(meta) == configs.param_count(real)
    assert all(p.is_meta for p in meta.parameters())
    add_lora(real, 4)
    assert configs.attach_lora(meta, 4) == sum(p.numel() for p in lora_parameters(real))


@pytest.mark.math
def test_saved_tensor_meter_counts_storages_once_and_skips_weights():
    w = torch.zeros(8, 3, device="meta", requires_grad=True)
    x = meters.meta((5, 8), torch.float32)
    meter = meters.SavedTensorMeter([w])
    with meter.active():
        y = x @ w  # saves x (for w's grad) and w (excluded)
        z = y * y  # saves y twice: one storage
    assert meter.saved_bytes == 5 * 8 * 4 + 5 * 3 * 4
    assert z.shape == (5, 3)


@pytest.mark.math
def test_fused_attention_saves_no_attention_matrix():
    q = meters.meta((1, 2, 64, 8), torch.bfloat16, grad=True)
    meter = meters.SavedTensorMeter()
    with meters.fused_attention(), meter.active():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    assert meter.saved_bytes < 64 * 64 * 2 * 2  # q (= k = v), out, log-sum-exp; never (64 × 64) per head
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored


@pytest.mark.math
def test_checkpoint_meter_matches_plain_run_and_torch_checkpoint(tiny_unet_config):
    """One measured run gives both: its union equals a run without checkpointing, and its checkpointed bytes (saves
    outside the segments + segment inputs) equal what torch's real non-reentrant checkpoint holds on the meta graph
    (its ``_NoopSaveInputs`` saves the segment inputs through the outer hooks)."""
    unet = configs.build_unet(tiny_unet_config, torch.float32)
    configs.attach_lora(unet, 2)
    weights = meters.module_tensors(unet)
    z, t, c = networks.unet_inputs(unet, 1, 5, torch.float32)
    call = lambda: networks.unet_call(unet, z, t, c)  # noqa: E731

    plain = meters.measure_grad_call(call, weights)
    meter = meters.SavedTensorMeter(weights)
    unet.enable_gradient_checkpointing(meter.checkpoint)
    measured = meters.measure_grad_call(call, weights, meter)
    assert measured.saved_bytes == plain.saved_bytes
    assert measured.fwd_flops == plain.fwd_flops and measured.bwd_flops == plain.bwd_flops
    assert len(meter.segments) > 0 and measured.saved_bytes_ckpt < measured.saved_bytes

    unet.enable_gradient_checkpointing()  # torch.utils.checkpoint, non-reentrant, on meta tensors
    real = meters.SavedTensorMeter(weights)
    with meters.fused_attention():  # the recompute in backward must take the same attention path
        with real.active():
            out = call()
        out.float().sum().backward()
    assert real.saved_bytes == measured.saved_bytes_ckpt


@pytest.fixture(scope="module")
def recipes():
    """The sdxl preset's sections (M = 8, p = 3, q = 4, w = 8) and the tiny teacher the counts run on."""
    return counts.sdxl_params(), counts.smoke_params()


def _count(recipes, stage, steps=1, batch_size=2, **update):
    from tools.rig import count_evals

    params, tiny = recipes
    if update:
        params = params.model_copy(update={stage: params.section(stage).model_copy(update=update)})
    return count_evals(stage, params, tiny, steps=steps, batch_size=batch_size)


@pytest.mark.stage  # runs the stages' own step functions on a tiny teacher (10-20 s)
def test_counted_evaluations_equal_the_algorithms_by_hand(recipes):
    """What `tlcm plan` multiplies by FLOPs is counted on the stages' real step functions; by hand (M = 8, p = 3,
    q = 4, CFG = 2 evaluations): iLCD 2p teacher, q + 1 student (q steps for ẑ_0, the target f_θ(ẑ_tn)), 1 with
    gradient; MPS the same + a VAE decode and 2 scorer calls with gradient; DM+GAN 2p + 2 teacher (target, real
    score), 1 fake + 1 fake update, the encoder on real and fake (no grad) and once with gradient (GAN term)."""
    ilcd = _count(recipes, "ilcd")
    assert (ilcd.teacher, ilcd.student, ilcd.student_grad, ilcd.lpips, ilcd.text) == (6, 5, 1, 1, 1)
    assert counts.unet_forward_equivalents(ilcd, 0.5) == 14
    mps = _count(recipes, "mps")
    assert (mps.teacher, mps.student, mps.student_grad, mps.vae_decode_grad, mps.scorer_grad) == (6, 5, 1, 1, 2)
    dm = _count(recipes, "dmgan")
    assert (dm.teacher, dm.student, dm.student_grad, dm.fake, dm.fake_grad, dm.encoder, dm.encoder_grad) == \
        (8, 5, 1, 1, 1, 2, 1)
    assert _count(recipes, "dmgan", critic_updates=2).student == 10  # a fresh Eq. 9 batch for the second update


@pytest.mark.stage  # runs the stages' own step functions on a tiny teacher (10-20 s)
def test_counted_mlcd_paths(recipes):
    """Alg. 1's MDS path: L = M − s steps to t_m (s uniform: mean 4.5) + one skip step, CFG: 2·5.5 = 11 per pair
    (counted on 128 random pairs: within 4 standard errors, 1.6); one segment: exactly 2·(1 + 1); w = 1 halves it.
    The buffer: a chunk's CFG steps (every point of every path after z_999) over the pairs it serves."""
    from tasks.teacher_buffer import draw_chunk
    from models.tlcm import PAD, milestones

    tiny = recipes[1]
    side = tiny.world.image_size // 2 ** (len(tiny.autoencoder.block_out_channels) - 1)
    LATENT = (tiny.autoencoder.latent_channels, side, side)  # the tiny teacher's latent (tools.rig.tiny_networks)
    mds = _count(recipes, "mlcd", batch_size=128, teacher_path="mds")
    assert abs(mds.teacher - 11) < 1.6 and (mds.student, mds.student_grad) == (1, 1)
    assert _count(recipes, "lcm_baseline", teacher_path="mds").teacher == 4
    assert _count(recipes, "lcm_baseline", teacher_path="mds", guidance_scale=1.0).teacher == 2
    params, _ = recipes
    # counted at skip 100 (~14 CFG steps per trajectory instead of ~57: the same code, fewer UNet calls)
    m = params.mlcd.model_copy(update={"batch_size": 4, "buffer_trajectories": 8, "buffer_refresh": 40, "skip": 100})
    buf = _count(recipes, "mlcd", steps=2, batch_size=4, buffer_trajectories=8, buffer_refresh=40, skip=100)
    chunk = draw_chunk(0, m.seed, 8, 4, 40, 64, LATENT, milestones(8), m.skip)
    cfg_steps = int((chunk.path[:, 1:] != PAD).sum())
    assert buf.teacher == pytest.approx(2 * cfg_steps / (40 * 4))
    assert (buf.student, buf.student_grad) == (1, 1) and buf.text == pytest.approx(1 + 8 / (40 * 4))
    # at the sdxl preset's own buffer settings (skip 20), by the same formula: at least 3x fewer than Alg. 1's path
    p = params.mlcd
    chunk = draw_chunk(0, p.seed, p.buffer_trajectories, p.batch_size, p.buffer_refresh, 64, LATENT,
                       milestones(p.num_segments), p.skip)
    per_pair = 2 * int((chunk.path[:, 1:] != PAD).sum()) / (p.buffer_refresh * p.batch_size)
    assert mds.teacher / per_pair > 3


@pytest.mark.math
def test_memory_plan_and_hours_arithmetic():
    m = estimates.MemoryPlan("x", frozen_bytes=6 * GiB, trainable_bytes=4 * GiB, activation_bytes=4 * GiB,
                             transient_bytes=GiB, checkpointing=True)
    assert m.total_bytes(2) == 20 * GiB
    assert m.max_batch(72 * GiB) == 12 and m.max_batch(9 * GiB) == 0
    assert estimates.a100_hours(estimates.A100_BF16_PEAK_FLOPS * 0.4 * 3600, 0.4) == pytest.approx(1.0)
    assert estimates.implied_mfu(estimates.A100_BF16_PEAK_FLOPS * 3600 * 7, 70) == pytest.approx(0.1)


def _costs() -> networks.NetCosts:
    call = meters.CallCost(10**12, 2 * 10**12, GiB, GiB // 8, GiB // 16, 0)
    unet = networks.UNetCosts(2 * 10**9, 10**6, 64, meters.CallCost(9 * 10**11, peak_nograd_bytes=GiB // 10), call,
                              call, 4 * 10**11)
    return networks.NetCosts("test", torch.bfloat16, unet, (10**8, 6 * 10**8), 10**11, 8 * 10**7, 5 * 10**7, call,
                             GiB, "scorer", 10**9, call, 10**7, call, 10**6)


@pytest.mark.math
def test_markdown_tables_from_given_costs(recipes):
    e = counts.StageEvals(teacher=6, student=5, student_grad=1)
    recipe = counts.params_recipe(recipes[0], recipes[1], {k: e for k in ("lcm_baseline", "mlcd", "mlcd_mds", "ilcd",
                                                                           "mps", "dmgan")}, mds_comparison=True)
    text = report.markdown_tables(report.Plan(_costs(), recipe))
    for heading in ("networks", "calls per iteration", "throughput", "memory on one 80 GB A100", "DMD2-style"):
        assert heading in text
    assert "**paper stages total**" in text and "| mlcd (buffer) | 12,000 | 8 |" in text
    assert "mlcd (mds: Alg. 1, for comparison) (ours; not in the paper's cost)" in text
    cpu = report.markdown_tables(report.Plan(_costs(), recipe, gpu=False))
    assert "computed total MiB at batch" in cpu and "A100" not in cpu

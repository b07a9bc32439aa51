"""tlcm/plan.py: the meta-device counters against direct formulas and real instances, and the per-stage counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tlcm import plan as P


@pytest.fixture(scope="module")
def tiny_unet_config() -> dict:
    """A two-level SDXL-shaped UNet (text_time, cross-attention in the second level), built for real once."""
    from models.sdxl_shaped import build_unet

    torch.manual_seed(0)
    real = build_unet((8, 16), 1, 4, 12, 8, 4, 4, 8)
    return {k: v for k, v in real.config.items() if not k.startswith("_")}


def test_flop_counter_equals_conv_formula():
    conv = P.on_meta(lambda: nn.Conv2d(6, 10, 3, padding=1), torch.float32)
    x = P.meta((2, 6, 12, 12), torch.float32)
    cost = P.measure_nograd_call(lambda: conv(x), P.module_tensors(conv))
    assert cost.fwd_flops == 2 * 2 * 10 * 6 * 3 * 3 * 12 * 12  # 2·N·C_out·C_in·k²·H·W (bias not counted)
    assert cost.peak_nograd_bytes == 2 * 10 * 12 * 12 * 4  # the output is the only activation


def test_meta_counts_equal_a_real_tiny_instance(tiny_unet_config):
    from diffusers import UNet2DConditionModel

    from models.lora import add_lora, lora_parameters

    torch.manual_seed(0)
    real = UNet2DConditionModel(**tiny_unet_config)
    meta = P.build_unet(tiny_unet_config, torch.bfloat16)
    assert P.param_count(meta) == P.param_count(real)
    assert all(p.is_meta for p in meta.parameters())
    add_lora(real, 4)
    assert P.attach_lora(meta, 4) == sum(p.numel() for p in lora_parameters(real))


def test_saved_tensor_meter_counts_storages_once_and_skips_weights():
    w = torch.zeros(8, 3, device="meta", requires_grad=True)
    x = P.meta((5, 8), torch.float32)
    meter = P.SavedTensorMeter([w])
    with meter.active():
        y = x @ w  # saves x (for w's grad) and w (excluded)
        z = y * y  # saves y twice: one storage
    assert meter.saved_bytes == 5 * 8 * 4 + 5 * 3 * 4
    assert z.shape == (5, 3)


def test_fused_attention_saves_no_attention_matrix():
    q = P.meta((1, 2, 64, 8), torch.bfloat16, grad=True)
    meter = P.SavedTensorMeter()
    with P.fused_attention(), meter.active():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    assert meter.saved_bytes < 64 * 64 * 2 * 2  # q (= k = v), out, log-sum-exp; never (64 × 64) per head
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored


def test_checkpoint_meter_matches_plain_run_and_torch_checkpoint(tiny_unet_config):
    """One measured run gives both: its union equals a run without checkpointing, and its checkpointed bytes (saves
    outside the segments + segment inputs) equal what torch's real non-reentrant checkpoint holds on the meta graph
    (its ``_NoopSaveInputs`` saves the segment inputs through the outer hooks)."""
    unet = P.build_unet(tiny_unet_config, torch.float32)
    P.attach_lora(unet, 2)
    weights = P.module_tensors(unet)
    z, t, c = P.unet_inputs(unet, 1, 5, torch.float32)
    call = lambda: P.unet_call(unet, z, t, c)  # noqa: E731

    plain = P.measure_grad_call(call, weights)
    meter = P.SavedTensorMeter(weights)
    unet.enable_gradient_checkpointing(meter.checkpoint)
    measured = P.measure_grad_call(call, weights, meter)
    assert measured.saved_bytes == plain.saved_bytes
    assert measured.fwd_flops == plain.fwd_flops and measured.bwd_flops == plain.bwd_flops
    assert len(meter.segments) > 0 and measured.saved_bytes_ckpt < measured.saved_bytes

    unet.enable_gradient_checkpointing()  # torch.utils.checkpoint, non-reentrant, on meta tensors
    real = P.SavedTensorMeter(weights)
    with P.fused_attention():  # the recompute in backward must take the same attention path
        with real.active():
            out = call()
        out.float().sum().backward()
    assert real.saved_bytes == measured.saved_bytes_ckpt


def test_stage_evals_by_hand_m8_p3_q4():
    assert P.mds_mean_steps(8) == 4.5  # L = 8 − s, s uniform on 0..7
    mlcd = P.mlcd_evals(8, 8.0)
    assert (mlcd.teacher, mlcd.student, mlcd.student_grad) == (11, 1, 1)  # 2·(4.5 + 1) CFG; target; prediction
    assert P.unet_forward_equivalents(mlcd, 0.5) == 15
    assert P.mlcd_evals(1, 8.0).teacher == 4  # lcm_baseline: one step to t_m, one skip step
    assert P.mlcd_evals(8, 1.0).teacher == 5.5  # w = 1: no unconditional half
    ilcd = P.ilcd_evals(3, 4, 8.0)
    assert (ilcd.teacher, ilcd.student, ilcd.student_grad) == (6, 5, 1)
    assert P.unet_forward_equivalents(ilcd, 0.5) == 14
    mps = P.mps_evals(3, 4, 8.0)
    assert (mps.vae_decode_grad, mps.scorer_grad) == (1, 2) and P.unet_forward_equivalents(mps, 0.5) == 14
    dm = P.dmgan_evals(3, 4, 8.0)
    assert (dm.teacher, dm.student, dm.student_grad, dm.fake, dm.fake_grad, dm.encoder, dm.encoder_grad) == \
        (8, 5, 1, 1, 1, 2, 1)
    assert P.unet_forward_equivalents(dm, 0.5) == 8 + 5 + 1 + 3 * 2 + 0.5 * (2 + 3)
    assert P.dmgan_evals(3, 4, 8.0, critic_updates=2).student == 10  # a fresh Eq. 9 batch for the second update


def test_memory_plan_and_hours_arithmetic():
    m = P.MemoryPlan("x", frozen_bytes=6 * P.GiB, trainable_bytes=4 * P.GiB, activation_bytes=4 * P.GiB,
                     transient_bytes=P.GiB, checkpointing=True)
    assert m.total_bytes(2) == 20 * P.GiB
    assert m.max_batch(72 * P.GiB) == 12 and m.max_batch(9 * P.GiB) == 0
    assert P.a100_hours(P.A100_BF16_PEAK_FLOPS * 0.4 * 3600, 0.4) == pytest.approx(1.0)
    assert P.implied_mfu(P.A100_BF16_PEAK_FLOPS * 3600 * 7, 70) == pytest.approx(0.1)


def _costs() -> P.NetCosts:
    call = P.CallCost(10**12, 2 * 10**12, P.GiB, P.GiB // 8, P.GiB // 16, 0)
    unet = P.UNetCosts(2 * 10**9, 10**6, 64, P.CallCost(9 * 10**11, peak_nograd_bytes=P.GiB // 10), call, call,
                       4 * 10**11)
    return P.NetCosts("test", torch.bfloat16, unet, (10**8, 6 * 10**8), 10**11, 8 * 10**7, 5 * 10**7, call, P.GiB,
                      "scorer", 10**9, call, 10**7, call, 10**6)


def test_markdown_tables_from_given_costs():
    text = P.markdown_tables(P.Plan(_costs(), P.paper_recipe()))
    for heading in ("networks", "calls per iteration", "throughput", "memory on one 80 GB A100", "DMD2-style"):
        assert heading in text
    assert "**paper stages total**" in text and "| mlcd | 12,000 | 8 |" in text
    cpu = P.markdown_tables(P.Plan(_costs(), P.paper_recipe(), gpu=False))
    assert "computed total MiB at batch" in cpu and "A100" not in cpu

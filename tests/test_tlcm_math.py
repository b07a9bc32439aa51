"""Golden values for TLCM's segment math (models/tlcm.py) with a toy linear ε-model."""
from types import SimpleNamespace

import pytest
import torch

from models.denoiser import Cond, Denoiser
from models.diffusion import alphas_cumprod_scaled_linear, ddim_step, q_sample, x0_from_eps
from models.scheduler import TLCMScheduler, tlcm_timesteps
from models.tlcm import (DENOISING, STAGE2_TIMESTEPS, f_theta_x0, g_theta, ilcd_terms, lower_milestone, mds_steps,
                         milestones, mlcd_pair, one_segment_below, sample_t_ilcd, sample_t_mlcd, sample_t_uniform,
                         single_step,
                         mlcd_terms, segment_of, student_sample_x0, teacher_ddim_path)

pytestmark = pytest.mark.math

AC = alphas_cumprod_scaled_linear()


class ToyUNet:
    """ε̂(z, t, c) = a·z + b·c (c: mean of the prompt embedding); unconditional c = 0."""

    def __init__(self, a=0.5, b=1.0):
        self.a, self.b = a, b
        self.calls = 0

    def __call__(self, z, t, encoder_hidden_states, added_cond_kwargs=None):
        self.calls += 1
        c = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.a * z + self.b * c)


def cond(n=2, v=0.1):
    return Cond(torch.full((n, 3, 4), v), torch.zeros(n, 2), torch.zeros(n, 6))


def test_milestones_match_official_inference():
    assert milestones(8) == [0, 124, 249, 374, 499, 624, 749, 874, 999]
    assert milestones(1) == [0, 999]


def test_segments_and_lower_milestones():
    ms = milestones(8)
    t = torch.tensor([1, 124, 125, 499, 500, 874, 875, 999])
    assert segment_of(t, ms).tolist() == [0, 0, 1, 3, 4, 6, 7, 7]
    assert lower_milestone(t, ms).tolist() == [0, 0, 124, 374, 499, 749, 874, 874]
    # multistep denoising strategy: more teacher steps for smaller t_m (Alg. 1: L = M − s)
    assert mds_steps(segment_of(t, ms), 8).tolist() == [8, 8, 7, 5, 4, 2, 1, 1]


def test_g_theta_is_a_ddim_jump_to_the_lower_milestone_and_x0_at_zero():
    m = Denoiser(ToyUNet(), AC)
    z, c = torch.randn(2, 4, 2, 2), cond()
    t, ts = torch.tensor([600, 100]), torch.tensor([499, 0])
    eps = 0.5 * z + 0.1
    expect = torch.stack([ddim_step(z[:1], eps[:1], t[:1], ts[:1], AC)[0],
                          x0_from_eps(z[1:], eps[1:], t[1:], AC)[0]])  # milestone 0 = the clean end
    assert torch.allclose(g_theta(m, z, t, ts, c), expect, atol=1e-6)


def test_f_theta_is_identity_at_t0():
    m = Denoiser(ToyUNet(), AC)
    z = torch.randn(2, 4, 2, 2)
    out = f_theta_x0(m, z, torch.tensor([0, 300]), cond())
    assert torch.equal(out[0], z[0])
    assert torch.allclose(out[1], x0_from_eps(z[1:], 0.5 * z[1:] + 0.1, torch.tensor([300]), AC)[0], atol=1e-6)


def test_t_sampling_mlcd_covers_every_timestep_of_its_segment_and_ilcd_only_milestones():
    """Alg. 1: t_m in (t_step^s, t_step^{s+1}] with every segment and every integer t in 1..999 drawn; Alg. 2: t_m
    a milestone above 0, every one drawn. Both are functions of the generator alone."""
    ms = milestones(8)
    t = sample_t_mlcd(ms, 200_000, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(range(1, 1000))
    seg = segment_of(t, ms)
    assert ((torch.tensor(ms)[seg] < t) & (t <= torch.tensor(ms)[seg + 1])).all()
    assert torch.equal(t, sample_t_mlcd(ms, 200_000, torch.Generator().manual_seed(0)))
    one = sample_t_mlcd(milestones(1), 5000, torch.Generator().manual_seed(1))  # the LCD baseline: one segment
    assert one.min() >= 1 and one.max() <= 999
    t = sample_t_ilcd(ms, 10_000, torch.Generator().manual_seed(2))
    assert set(t.tolist()) == set(ms[1:])


def test_teacher_path_per_sample_step_counts():
    m = Denoiser(ToyUNet(), AC)
    z = torch.randn(2, 4, 2, 2)
    c = cond()
    out = teacher_ddim_path(m, z, torch.tensor([999, 999]), torch.tensor([499, 499]), torch.tensor([1, 2]), c, 1.0)
    one = ddim_step(z[:1], 0.5 * z[:1] + 0.1, torch.tensor([999]), torch.tensor([499]), AC)
    z1 = ddim_step(z[1:], 0.5 * z[1:] + 0.1, torch.tensor([999]), torch.tensor([749]), AC)
    two = ddim_step(z1, 0.5 * z1 + 0.1, torch.tensor([749]), torch.tensor([499]), AC)
    assert torch.allclose(out[:1], one, atol=1e-5) and torch.allclose(out[1:], two, atol=1e-5)


def test_mlcd_pair_boundary_clamps_t_n_to_the_milestone_and_the_target_is_the_solver_state():
    teacher, student = Denoiser(ToyUNet(), AC), Denoiser(ToyUNet(a=0.3), AC)
    ms, c = milestones(8), cond()
    eps = torch.randn(2, 4, 2, 2)
    t_m = torch.tensor([130, 700])  # 130 - 20 = 110 < 124: boundary; 700 - 20 = 680 inside (624, 749]
    z_tm, z_tn, t_n, t_s = mlcd_pair(teacher, eps, t_m, 20, c, 1.0, ms)
    assert t_n.tolist() == [124, 680] and t_s.tolist() == [124, 624]
    terms = mlcd_terms(student, z_tm, z_tn, t_m, t_n, t_s, c, lambda x, y: ((x - y) ** 2).flatten(1).mean(1))
    pred = g_theta(student, z_tm, t_m, t_s, c)
    target0 = z_tn[0]
    target1 = g_theta(student, z_tn[1:], t_n[1:], t_s[1:], c)[0]
    assert torch.allclose(terms["consistency"], torch.stack([((pred[0] - target0) ** 2).mean(),
                                                            ((pred[1] - target1) ** 2).mean()]), atol=1e-6)


def test_mlcd_gradient_flows_only_through_the_prediction():
    unet = torch.nn.Conv2d(4, 4, 1)
    wrapped = lambda z, t, encoder_hidden_states, added_cond_kwargs=None: SimpleNamespace(sample=unet(z))  # noqa: E731
    student = Denoiser(wrapped, AC)
    ms, c = milestones(8), cond()
    z_tm, z_tn = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t_m, t_n, t_s = torch.tensor([700, 700]), torch.tensor([680, 680]), torch.tensor([624, 624])
    loss = mlcd_terms(student, z_tm, z_tn, t_m, t_n, t_s, c, torch.nn.functional.mse_loss)["consistency"]
    loss.backward()
    assert unet.weight.grad is not None and unet.weight.grad.abs().sum() > 0


def test_student_sample_renoises_with_the_same_eps():
    m = Denoiser(ToyUNet(a=0.0, b=0.0), AC)  # ε̂ = 0: x̂0 = z_t / sqrt(ᾱ_t)
    eps = torch.randn(1, 4, 2, 2)
    x0 = student_sample_x0(m, eps, 2, cond(1))
    # step 1: x0 = ε / sqrt(ᾱ_999); z_499 = sqrt(ᾱ_499) x0 + sqrt(1 − ᾱ_499) ε; step 2: x0 = z_499 / sqrt(ᾱ_499)
    x0_1 = eps / AC[999].sqrt()
    z = AC[499].sqrt() * x0_1 + (1 - AC[499]).sqrt() * eps
    assert torch.allclose(x0, (z / AC[499].sqrt()).float(), atol=1e-4)


def test_ilcd_target_at_milestone_zero_is_the_teacher_state():
    """In the lowest segment the target milestone is 0, where f_θ is the identity: the target is the
    teacher's own state after p CFG-DDIM steps from ẑ_{t_m} = FD(ẑ_0, t_m) to the clean end, and the
    prediction is the student's x̂_0 at t_m (computed by hand with the toy ε-model)."""
    teacher, student = Denoiser(ToyUNet(), AC), Denoiser(ToyUNet(a=0.2), AC)
    ms, c = milestones(8), cond(1)
    eps, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    seen = {}
    ilcd_terms(student, teacher, eps, noise, torch.tensor([124]), 4, 3, c, 1.0, ms,
               lambda x, y: seen.setdefault("pair", (x, y)) and ((x - y) ** 2).mean())
    pred, target = seen["pair"]
    z_tm = q_sample(student_sample_x0(student, eps, 4, c), noise, torch.tensor([124]), AC)
    z = z_tm
    for t1, t2 in ((124, 83), (83, 41), (41, -1)):  # 124 → 0 in p = 3 uniform steps; milestone 0 = the clean end
        z = ddim_step(z, 0.5 * z + 0.1, torch.tensor([t1]), torch.tensor([t2]), AC)  # teacher ε̂ = 0.5 z + c
    assert torch.allclose(target, z.float(), atol=1e-5)
    assert torch.allclose(pred, x0_from_eps(z_tm, 0.2 * z_tm + 0.1, torch.tensor([124]), AC).float(), atol=1e-5)
    assert not torch.allclose(pred, target, atol=1e-3)  # student and teacher differ: the loss is not trivially 0


@pytest.mark.parametrize("n,expect", [(2, [999, 499]), (3, [999, 499, 124]), (4, [999, 749, 499, 124]),
                                      (8, [999, 874, 749, 624, 499, 374, 249, 124])])
def test_scheduler_timesteps(n, expect):
    assert tlcm_timesteps(n) == expect
    s = TLCMScheduler()
    s.set_timesteps(n)
    assert s.timesteps.tolist() == expect


def test_scheduler_config_round_trip(tmp_path):
    s = TLCMScheduler(renoise="ddim")
    s.save_pretrained(tmp_path)
    s2 = TLCMScheduler.from_pretrained(tmp_path)
    assert s2.config.renoise == "ddim" and s2.config.num_segments == 8
    from diffusers import EulerDiscreteScheduler

    from models.sdxl_shaped import SDXL_SCHEDULER_CONFIG

    s3 = TLCMScheduler.from_config(EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).config)
    assert torch.allclose(s3.alphas_cumprod, AC.float())


def test_scheduler_step_ddim_mode_and_last_step_returns_x0():
    s = TLCMScheduler(renoise="ddim")
    s.set_timesteps(2)
    z, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    prev = s.step(eps, 999, z).prev_sample
    assert torch.allclose(prev, ddim_step(z, eps, torch.tensor([999]), torch.tensor([499]), AC), atol=1e-5)
    last = s.step(eps, 499, z)
    assert torch.allclose(last.prev_sample, last.denoised)


def test_table2_ablation_switches_single_step_denoising_and_whole_range_timesteps():
    """L_mlcd-s reaches z_{t_m} from ε in one teacher step whatever the segment; L_lcd2 draws t_m over the whole range
    and takes t_n one segment (T/M = 125) below it, crossing milestones; the defaults are the paper's Alg. 1 and 2."""
    ms = milestones(8)
    seg = segment_of(torch.tensor([10, 130, 700, 999]), ms)
    assert DENOISING["multi"] is mds_steps and single_step(seg, 8).tolist() == [1, 1, 1, 1]
    assert STAGE2_TIMESTEPS["milestones"] == (sample_t_ilcd, lower_milestone)
    t = sample_t_uniform(ms, 100_000, torch.Generator().manual_seed(0))
    assert t.min() == 1 and t.max() == 999 and len(t.unique()) == 999  # every timestep, never 0
    assert one_segment_below(torch.tensor([999, 700, 130, 100]), ms).tolist() == [874, 575, 5, 0]

    teacher, c = Denoiser(ToyUNet(), AC), cond()
    eps, t_m = torch.randn(2, 4, 2, 2), torch.tensor([130, 700])
    z_tm = mlcd_pair(teacher, eps, t_m, 20, c, 1.0, ms, denoising=single_step)[0]
    one = ddim_step(eps, 0.5 * eps + 0.1, torch.tensor([999, 999]), t_m, AC)  # one CFG-DDIM jump 999 → t_m
    assert torch.allclose(z_tm, one.float(), atol=1e-5)
    assert not torch.allclose(mlcd_pair(teacher, eps, t_m, 20, c, 1.0, ms)[0], z_tm, atol=1e-3)  # MDS differs

    student = Denoiser(ToyUNet(a=0.2), AC)
    e1, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    seen = {}
    ilcd_terms(student, teacher, e1, noise, torch.tensor([300]), 4, 1, cond(1), 1.0, ms,
               lambda x, y: seen.setdefault("pair", (x, y)) and ((x - y) ** 2).mean(), t_n=torch.tensor([175]))
    z_tm = q_sample(student_sample_x0(student, e1, 4, cond(1)), noise, torch.tensor([300]), AC)
    z_tn = ddim_step(z_tm, 0.5 * z_tm + 0.1, torch.tensor([300]), torch.tensor([175]), AC)  # p = 1 step to t_n
    assert torch.allclose(seen["pair"][1], x0_from_eps(z_tn, 0.2 * z_tn + 0.1, torch.tensor([175]), AC).float(), atol=1e-5)

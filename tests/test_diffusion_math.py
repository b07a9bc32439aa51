"""Golden values for the DDPM/DDIM math, computed by hand."""
import math

import pytest
import torch

from models.diffusion import alpha_bar, alphas_cumprod_scaled_linear, cfg, ddim_step, q_sample, x0_from_eps
from models.sampling import trailing_timesteps, unet_evals

pytestmark = pytest.mark.math

AC = torch.tensor([0.9, 0.64, 0.36, 0.25], dtype=torch.float64)  # toy ᾱ_t, T = 4


def test_alpha_bar_has_clean_end():
    assert alpha_bar(AC, -1).item() == 1.0
    assert alpha_bar(AC, torch.tensor([1, 3])).tolist() == pytest.approx([0.64, 0.25])


def test_sdxl_schedule_endpoints():
    ac = alphas_cumprod_scaled_linear()
    assert ac[0].item() == pytest.approx(1 - 0.00085)
    assert ac[999].item() == pytest.approx(0.0046601, rel=1e-4)  # SD/SDXL's well-known terminal ᾱ
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.allclose(ac.float(), ref, atol=1e-6)


def test_q_sample_eq1():
    # sqrt(.64)*1 + sqrt(.36)*1 = 1.4
    assert q_sample(torch.ones(1, 1), torch.ones(1, 1), torch.tensor([1]), AC).item() == pytest.approx(1.4)


def test_x0_and_ddim_step_by_hand():
    z, eps, t = torch.ones(1, 1), torch.full((1, 1), 0.5), torch.tensor([2])  # ᾱ_2 = .36
    assert x0_from_eps(z, eps, t, AC).item() == pytest.approx((1 - 0.8 * 0.5) / 0.6)  # = 1.0
    # to s = 0 (ᾱ = .9): sqrt(.9)*1.0 + sqrt(.1)*0.5
    assert ddim_step(z, eps, t, torch.tensor([0]), AC).item() == pytest.approx(math.sqrt(0.9) + math.sqrt(0.1) * 0.5)
    assert ddim_step(z, eps, t, torch.tensor([-1]), AC).item() == pytest.approx(1.0)  # to the clean end: x̂0


def test_ddim_inverts_forward_diffusion_with_true_noise():
    z0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    zt = q_sample(z0, eps, torch.tensor([3, 3]), AC)
    assert torch.allclose(ddim_step(zt, eps, torch.tensor([3, 3]), torch.tensor([1, 1]), AC),
                          q_sample(z0, eps, torch.tensor([1, 1]), AC), atol=1e-6)


def test_cfg():
    assert cfg(torch.tensor(1.0), torch.tensor(3.0), 2.0).item() == 5.0
    assert cfg(torch.tensor(1.0), torch.tensor(3.0), 1.0).item() == 3.0


def test_trailing_timesteps_and_eval_count():
    assert trailing_timesteps(2) == [999, 499]
    assert trailing_timesteps(4) == [999, 749, 499, 249]
    assert len(trailing_timesteps(25)) == 25 and trailing_timesteps(25)[0] == 999
    assert unet_evals(25, 5.0) == 50 and unet_evals(4, 1.0) == 4

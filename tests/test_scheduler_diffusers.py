"""TLCMScheduler against diffusers' own scheduler standard (re-created in ``scheduler_common``), and
what pipelines ask of a scheduler: custom ``timesteps=[...]``, ``set_begin_index`` for img2img and
inpainting, v-prediction, ``trained_betas``, conversion to and from the other schedulers, and a
clear error for a step count outside 1..8."""
import numpy as np
import pytest
import scheduler_common
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

from models.scheduler import TLCMScheduler, tlcm_timesteps
from models.sdxl_shaped import SDXL_SCHEDULER_CONFIG

pytestmark = pytest.mark.math

SDXL_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.0120, beta_schedule="scaled_linear",
                   prediction_type="epsilon")


class TLCMSchedulerTest(scheduler_common.SchedulerCommonTest):
    """Overrides exactly what diffusers' ``LCMSchedulerTest`` needs to: the default step count (TLCM samples
    in 1..8 steps, as LCM's test uses 10 rather than 50) and ``test_add_noise_device``, whose hard-coded
    step count does not fit a few-step scheduler."""
    scheduler_classes = (TLCMScheduler,)
    forward_default_kwargs = (("num_inference_steps", 4),)

    def get_scheduler_config(self, **kwargs):
        return {**SDXL_CONFIG, **kwargs}

    def test_add_noise_device(self, num_inference_steps=8):
        s = self._scheduler()
        s.set_timesteps(num_inference_steps)
        sample = self.dummy_sample
        scaled = s.scale_model_input(sample, 0.0)
        self.assertEqual(sample.shape, scaled.shape)
        self.assertEqual(s.add_noise(scaled, torch.randn(scaled.shape), s.timesteps[5][None]).shape, scaled.shape)


class LCMSchedulerTest(TLCMSchedulerTest):
    """The same checks on diffusers' own LCMScheduler (which passes diffusers' suite): evidence that the
    re-created checks are the real ones. Same overrides as diffusers' LCMSchedulerTest (10 steps)."""
    scheduler_classes = (LCMScheduler,)
    forward_default_kwargs = (("num_inference_steps", 10),)


# ---- what pipelines use ---------------------------------------------------------------------

def test_official_table_is_the_default_and_fresh_noise_the_default_step():
    s = TLCMScheduler.from_config(EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).config)
    assert s.config.renoise == "fresh" and s.config.num_segments == 8
    for n, ts in {2: [999, 499], 3: [999, 499, 124], 4: [999, 749, 499, 124]}.items():
        s.set_timesteps(n)
        assert s.timesteps.tolist() == ts == tlcm_timesteps(n)


@pytest.mark.parametrize("n", [0, 9, 50, -1, 2.5, True])
def test_step_count_outside_the_table_names_the_range(n):
    with pytest.raises(ValueError, match=r"1\.\.8 steps"):
        TLCMScheduler().set_timesteps(n)


def test_custom_timesteps_as_pipelines_pass_them():
    s = TLCMScheduler()
    s.set_timesteps(timesteps=[999, 600, 250])
    assert s.timesteps.tolist() == [999, 600, 250] and s.num_inference_steps == 3 and s.custom_timesteps
    assert [int(s.previous_timestep(t)) for t in s.timesteps] == [600, 250, -1]
    for bad in ([999, 999], [500, 600], [1000, 10], []):
        with pytest.raises(ValueError, match="timesteps"):
            s.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(4, timesteps=[999, 499])


def test_custom_timesteps_match_stock_lcm_scheduler():
    """LCMScheduler(timesteps=[999, 749, 499, 124]) takes the same steps as TLCM's 4-step table, up to LCM's
    boundary-condition scalings (c_skip ≈ 1e-7 at t = 124)."""
    tl, lcm = TLCMScheduler(), LCMScheduler(**SDXL_CONFIG)
    tl.set_timesteps(4)
    lcm.set_timesteps(timesteps=[999, 749, 499, 124])
    assert lcm.timesteps.tolist() == tl.timesteps.tolist()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    za, zb = z.clone(), z.clone()
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in tl.timesteps:
        eps = torch.tanh(za) * 0.5  # any ε-model
        za = tl.step(eps, t, za, generator=ga).prev_sample
        zb = lcm.step(torch.tanh(zb) * 0.5, t, zb, generator=gb).prev_sample
    assert (za - zb).abs().max() < 1e-4, (za - zb).abs().max()


def test_begin_index_starts_part_way_like_img2img():
    """img2img with strength s runs the last ⌊n·s⌋ timesteps; the pipeline calls set_begin_index."""
    s = TLCMScheduler(renoise="ddim")
    s.set_timesteps(4)
    s.set_begin_index(2)
    z, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out = s.step(eps, s.timesteps[2], z)
    a499, a124 = s.alphas_cumprod[499], s.alphas_cumprod[124]
    x0 = (z - (1 - a499).sqrt() * eps) / a499.sqrt()
    assert torch.allclose(out.prev_sample, a124.sqrt() * x0 + (1 - a124).sqrt() * eps, atol=1e-5)
    assert s.step_index == 3
    last = s.step(eps, s.timesteps[3], out.prev_sample)
    assert torch.allclose(last.prev_sample, last.denoised)


def test_v_prediction_and_sample_prediction_recover_the_same_x0():
    """The same clean x_0 and noise, given as ε, v or x_0, give the same step."""
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    outs = []
    for pt in ("epsilon", "v_prediction", "sample"):
        s = TLCMScheduler(prediction_type=pt, renoise="ddim")
        s.set_timesteps(4)
        t = s.timesteps[1]
        z = s.add_noise(x0, eps, t[None])
        out = {"epsilon": eps, "v_prediction": s.get_velocity(x0, eps, t[None]), "sample": x0}[pt]
        outs.append(s.step(out, t, z, return_dict=False))
    for prev, den in outs[1:]:
        assert torch.allclose(den, outs[0][1], atol=1e-4) and torch.allclose(prev, outs[0][0], atol=1e-4)
    assert torch.allclose(outs[0][1], x0, atol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        TLCMScheduler(prediction_type="flow")


def test_trained_betas_and_other_schedules():
    betas = np.linspace(1e-4, 0.02, 1000)
    s = TLCMScheduler(trained_betas=betas)
    assert torch.allclose(s.alphas_cumprod, DDIMScheduler(trained_betas=betas).alphas_cumprod)
    for schedule in ("linear", "squaredcos_cap_v2"):
        kw = dict(beta_schedule=schedule, beta_start=1e-4, beta_end=0.02)
        assert torch.allclose(TLCMScheduler(**kw).alphas_cumprod, DDIMScheduler(**kw).alphas_cumprod)
    with pytest.raises(ValueError, match="beta_schedule"):
        TLCMScheduler(beta_schedule="exp")


def test_step_at_a_timestep_outside_the_schedule_says_so():
    s = TLCMScheduler()
    s.set_timesteps(2)
    with pytest.raises(ValueError, match=r"timestep 300 is not in this scheduler's timesteps \[999, 499\]"):
        s.step(torch.zeros(1, 4, 2, 2), 300, torch.zeros(1, 4, 2, 2))


def test_conversion_keeps_tlcm_settings_through_another_scheduler():
    s = TLCMScheduler(renoise="ddim", num_segments=8, prediction_type="v_prediction")
    back = TLCMScheduler.from_config(DDIMScheduler.from_config(s.config).config)
    assert back.config.renoise == "ddim" and back.config.prediction_type == "v_prediction"
    assert EulerDiscreteScheduler in s.compatibles and LCMScheduler in s.compatibles

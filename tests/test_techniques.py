"""Issue 4: the MPS, DM and GAN math (golden values) and the `dmgan` stage on the smoke preset."""
import json
import math
import shutil

import pytest
import torch

from models import gan
from models.dmd import dmd_gradient, dmd_loss, fake_score_loss
from models.preference import irrelevant_prompts, mps_terms


@pytest.mark.math
def test_mps_terms_golden():
    s_pos, s_neg = torch.tensor([3.0, 7.0]), torch.tensor([-1.0, 2.0])
    t = mps_terms(s_pos, s_neg, s0=5.0)
    assert t["mps_pos"].item() == pytest.approx((2.0 + 0.0) / 2)  # max(5-3,0), max(5-7,0)
    assert t["mps_neg"].item() == pytest.approx((0.0 + 2.0) / 2)  # max(-1,0), max(2,0)


@pytest.mark.math
def test_irrelevant_prompts_differ_and_are_deterministic():
    pool = ["a", "b", "c"]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    n1, n2 = irrelevant_prompts(["a", "b", "a"], pool, g1), irrelevant_prompts(["a", "b", "a"], pool, g2)
    assert n1 == n2 and all(x != y for x, y in zip(["a", "b", "a"], n1))


@pytest.mark.math
def test_dmd_gradient_golden_and_surrogate():
    x = torch.tensor([[[[1.0, 3.0]]]])
    real = torch.tensor([[[[0.0, 1.0]]]])
    fake = torch.tensor([[[[2.0, 1.0]]]])
    grad, bad = dmd_gradient(x, real, fake)
    # (fake - real) / mean|x - real| = [2, 0] / mean(1, 2) = [4/3, 0]
    assert torch.allclose(grad, torch.tensor([[[[4 / 3, 0.0]]]])) and bad == 0.0
    xp = x.clone().requires_grad_(True)
    dmd_loss(xp, grad).backward()
    assert torch.allclose(xp.grad, grad / x.numel())  # ∂/∂x of 0.5·mean‖x − sg(x − g)‖² = g / numel
    # a descent step moves x towards the real score's x̂0 and away from the fake one
    assert (x - 0.1 * grad - fake).abs().sum() > (x - fake).abs().sum()


@pytest.mark.math
def test_dmd_gradient_replaces_nonfinite():
    x = torch.zeros(1, 1, 1, 2)
    grad, bad = dmd_gradient(x, torch.zeros_like(x), torch.ones_like(x))  # mean|x − real| = 0 → inf
    assert bad == 1.0 and torch.isfinite(grad).all() and grad.abs().sum() == 0


@pytest.mark.math
def test_gan_losses_golden():
    r, f = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = torch.nn.functional.softplus
    assert gan.d_loss(r, f, "nonsaturating").item() == pytest.approx((sp(-r).mean() + sp(f).mean()).item())
    assert gan.d_loss(r, f, "hinge").item() == pytest.approx(((0 + 2) / 2) + ((1.5 + 0) / 2))
    assert gan.g_loss(f, "hinge").item() == pytest.approx(1.25)
    assert gan.g_loss(f, "nonsaturating").item() == pytest.approx(sp(-f).mean().item())
    assert gan.accuracy(r, f) == (0.5, 0.5)
    assert fake_score_loss(torch.ones(2), torch.zeros(2)).item() == 1.0


def test_encoder_features_equal_the_unets_own_mid_block(smoke_artifacts):
    """The discriminator's encoder is exactly the first half of UNet2DConditionModel.forward."""
    from models.denoiser import encode_prompts
    from tlcm.loaders.teacher_io import load_teacher

    pipe = load_teacher(smoke_artifacts.teacher)
    unet = pipe.unet
    c = encode_prompts(pipe, ["a red circle", "a blue square"])
    z, t = torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size), torch.tensor([10, 700])
    seen = {}
    hook = unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        unet(z, t, encoder_hidden_states=c.prompt_embeds,
             added_cond_kwargs={"text_embeds": c.pooled, "time_ids": c.time_ids})
        ours = gan.unet_encoder_features(unet, z, t, c)
    hook.remove()
    assert torch.allclose(ours, seen["mid"], atol=1e-6)


def _lora(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_disabled_stage_passes_its_input_through(own_chain, smoke_params):
    from tasks import mps

    params = smoke_params.model_copy(update={"mps": smoke_params.mps.model_copy(update={"enabled": False})})
    m = mps.run(params, own_chain)
    assert m["enabled"] is False
    a, b = _lora(own_chain.lora("ilcd")), _lora(own_chain.lora("mps"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("disc_tune,gan_loss", [("frozen", "nonsaturating"), ("lora", "hinge")])
def test_dmgan_stage_trains_only_the_student_lora(own_chain, smoke_params, disc_tune, gan_loss):
    from diffusers import StableDiffusionXLPipeline

    from tasks import dmgan, mps

    paths = own_chain  # dmgan's input: the iLCD LoRA passed through a disabled mps stage
    mps.run(smoke_params.model_copy(update={"mps": smoke_params.mps.model_copy(update={"enabled": False})}), paths)
    shutil.rmtree(paths.checkpoints("dmgan"), ignore_errors=True)  # train from the start, whatever the chain holds
    params = smoke_params.model_copy(update={"dmgan": smoke_params.dmgan.model_copy(
        update={"disc_tune": disc_tune, "gan_loss": gan_loss, "critic_updates": 2, "lr": 1e-3})})
    m = dmgan.run(params, paths)
    last = m["last"]
    for key in ("consistency", "dm", "gan_g", "dmd_grad_norm", "dmd_nonfinite_frac", "fake_score_loss",
                "disc_acc_real", "disc_acc_fake"):
        assert key in last, key
    before, after = _lora(paths.lora("mps")), _lora(paths.lora("dmgan"))
    assert before.keys() == after.keys(), "only the student adapter is saved (not fake/critic)"
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student LoRA did not move"
    # the saved LoRA loads into a plain diffusers pipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(paths.teacher)
    pipe.load_lora_weights(paths.lora("dmgan"))
    meta = json.loads((paths.lora("dmgan") / "tlcm_lora.json").read_text())
    assert meta["init_from"] == "mps" and meta["real_images_used"] == 0


@pytest.mark.math
def test_collapse_watch_reports_a_pinned_discriminator(caplog):
    from tasks.dmgan import CollapseWatch

    w = CollapseWatch(3)
    for step, acc in enumerate([1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]):
        w(step, acc, 1.0)
    assert w.collapses == [5]
    assert "discriminator collapse at step 5" in caplog.text


def test_bf16_frozen_teacher_with_checkpointing_trains_float32_loras(student_chain, smoke_params, tmp_path):
    """The sdxl memory plan (bf16 frozen weights, autocast, gradient checkpointing) on the small teacher:
    mlcd and dmgan train, losses stay finite, the saved LoRAs are float32."""
    from tasks import dmgan, mlcd
    from tlcm.core.paths import Paths

    paths = Paths(tmp_path)
    for d in ("world", "teacher", "latent_lpips", "lora_ilcd"):
        (tmp_path / d).symlink_to(getattr(student_chain, "root") / d)
    t = smoke_params.teacher.model_copy(update={"dtype": "bfloat16", "gradient_checkpointing": True})
    params = smoke_params.model_copy(update={"teacher": t, "mps": smoke_params.mps.model_copy(update={"enabled": False})})
    m = mlcd.run(params, paths)
    assert m["final_consistency"] is not None and math.isfinite(m["final_consistency"])
    from tasks import mps

    mps.run(params, paths)  # disabled: passes lora_ilcd through as dmgan's input
    d = dmgan.run(params, paths)
    assert d["last"] and all(math.isfinite(v) for v in d["last"].values()), d["last"]
    for st in ("mlcd", "dmgan"):
        assert {v.dtype for v in _lora(paths.lora(st)).values()} == {torch.float32}
    # both trained: mlcd moved its B matrices off the zero start, dmgan moved its input LoRA
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in _lora(paths.lora("mlcd")).items())
    before, after = _lora(paths.lora("mps")), _lora(paths.lora("dmgan"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_mps_stage_optimises_the_reward_with_the_measured_margin(own_chain, smoke_params):
    from tasks import mps

    paths = own_chain  # with the smoke reward model
    shutil.rmtree(paths.checkpoints("mps"), ignore_errors=True)  # train from the start, whatever the chain holds
    params = smoke_params.model_copy(update={"mps": smoke_params.mps.model_copy(update={"lr": 1e-3})})
    m = mps.run(params, paths)
    auto = json.loads((paths.reward / "config.json").read_text())["margin_auto"]["overall"]
    assert m["s0"] == pytest.approx(auto)
    for k in ("consistency", "mps_pos", "mps_neg", "reward_pos", "reward_neg"):
        assert k in m["last"], k
    before, after = _lora(paths.lora("ilcd")), _lora(paths.lora("mps"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    fixed = params.model_copy(update={"mps": params.mps.model_copy(update={"margin": 16.0})})
    assert mps.margin(fixed.mps, paths) == 16.0

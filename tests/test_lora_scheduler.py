"""The LoRA file users load and the TLCMScheduler inside plain diffusers pipelines."""
import torch
from diffusers import StableDiffusionXLPipeline

from models.denoiser import Denoiser, encode_prompts
from models.lora import FrozenTeacher, add_lora, adapters_disabled, lora_parameters
from models.sampling import sample_with_scheduler
from models.scheduler import TLCMScheduler
from tlcm.loaders.lora_io import load_lora_into, save_lora

PROMPTS = ["a small red cross on the left on a black background", "a blue circle above a green square on a white background"]


def _student(teacher_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher_dir)
    add_lora(pipe.unet, rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.normal_(0, 0.05)  # B starts at zero: perturb so that the LoRA changes the output
    return pipe


def _eps(unet, pipe, z, t):
    with torch.no_grad():
        return Denoiser(unet, pipe.scheduler.alphas_cumprod).eps(z, t, encode_prompts(pipe, PROMPTS))


def test_lora_round_trips_through_diffusers_load_lora_weights(smoke_artifacts, tmp_path):
    pipe = _student(smoke_artifacts.teacher)
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 120])
    trained = _eps(pipe.unet, pipe, z, t)
    with adapters_disabled(pipe.unet):
        plain = _eps(pipe.unet, pipe, z, t)
    assert (trained - plain).abs().max() > 1e-3  # the adapter really does something
    save_lora(tmp_path / "lora", pipe.unet, {"stage": "test"})

    user = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    user.load_lora_weights(tmp_path / "lora")
    assert torch.allclose(_eps(user.unet, user, z, t), trained, atol=1e-5)
    user.fuse_lora()  # merged for speed: same function
    assert torch.allclose(_eps(user.unet, user, z, t), trained, atol=1e-4)

    resumed = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    load_lora_into(resumed.unet, tmp_path / "lora")  # how iLCD continues MLCD's LoRA
    assert torch.allclose(_eps(resumed.unet, resumed, z, t), trained, atol=1e-5)


def test_frozen_teacher_has_adapters_disabled(smoke_artifacts):
    pipe = _student(smoke_artifacts.teacher)
    plain = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([700, 300])
    c = encode_prompts(pipe, PROMPTS)
    with torch.no_grad():
        via_view = FrozenTeacher(Denoiser(pipe.unet, pipe.scheduler.alphas_cumprod)).eps(z, t, c)
        reference = Denoiser(plain.unet, plain.scheduler.alphas_cumprod).eps(z, t, c)
        student = Denoiser(pipe.unet, pipe.scheduler.alphas_cumprod).eps(z, t, c)
    assert torch.allclose(via_view, reference, atol=1e-5)
    assert not torch.allclose(student, reference, atol=1e-3)  # and the adapter is back on afterwards


def test_tlcm_scheduler_in_the_sdxl_pipeline_matches_our_sampler(smoke_artifacts):
    pipe = _student(smoke_artifacts.teacher)
    pipe.scheduler = TLCMScheduler.from_config(pipe.scheduler.config, renoise="ddim")
    z_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    for n in (2, 4, 8):
        ref = pipe(PROMPTS, num_inference_steps=n, guidance_scale=1.0, latents=z_T.clone(), output_type="latent").images
        with torch.no_grad():
            ours = sample_with_scheduler(Denoiser(pipe.unet, pipe.scheduler.alphas_cumprod), encode_prompts(pipe, PROMPTS),
                                         TLCMScheduler.from_config(pipe.scheduler.config), n, z_T)
        assert torch.allclose(ref, ours, atol=1e-4), (n, (ref - ours).abs().max())
    # fresh re-noising (the default) is seeded by the pipeline's generator
    pipe.scheduler = TLCMScheduler.from_config(pipe.scheduler.config, renoise="fresh")
    a = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, latents=z_T.clone(), output_type="np",
             generator=torch.Generator().manual_seed(3)).images
    b = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, latents=z_T.clone(), output_type="np",
             generator=torch.Generator().manual_seed(3)).images
    assert a.shape == (2, 32, 32, 3) and (a == b).all()

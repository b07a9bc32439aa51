"""SD1.5-style teachers (one CLIPTextModel, a UNet without text_time): load, distil (mlcd -> ilcd), sample.

A tiny random ``StableDiffusionPipeline`` folder stands in for SD1.5; ``teacher.source`` points at it.
"""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def sd15_folder(smoke_artifacts, tmp_path_factory):
    """A small SD1.5-shaped pipeline (the world's tokenizer, a random VAE/text encoder/UNet) saved as a folder."""
    from transformers import CLIPTokenizer

    from models.sdxl_shaped import build_sd15_pipeline, build_vae

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(smoke_artifacts.tokenizer)
    vae = build_vae((8, 16), 1, 4, 32)
    pipe = build_sd15_pipeline(tok, vae, text_hidden=16, unet_block_out_channels=(8, 16), sample_size=16)
    folder = tmp_path_factory.mktemp("sd15") / "teacher"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd15_distilled(sd15_folder, smoke_artifacts, smoke_params, tmp_path_factory):
    """mlcd then ilcd (smoke preset, latent MSE) against the SD1.5 folder, in a fresh artifacts root."""
    from tasks.registry import run_stage
    from tlcm.core.params import Source
    from tlcm.core.paths import Paths

    root = tmp_path_factory.mktemp("sd15_artifacts")
    (root / "world").symlink_to(smoke_artifacts.world)
    paths = Paths(root)
    upd = {k: smoke_params.section(k).model_copy(update={"loss": "mse"}) for k in ("mlcd", "ilcd")}
    upd["teacher"] = smoke_params.teacher.model_copy(update={"source": Source(location=str(sd15_folder))})
    params = smoke_params.model_copy(update=upd)
    run_stage("teacher", params, paths)  # a given teacher: checks that it loads and records what it is
    for stage in ("mlcd", "ilcd"):
        run_stage(stage, params, paths)
    return params, paths


def test_load_teacher_accepts_sd15_and_encodes_with_empty_prompt_uncond(sd15_folder):
    from diffusers import StableDiffusionPipeline

    from models.denoiser import Denoiser, encode_prompts
    from tlcm.loaders.teacher_io import load_teacher

    pipe = load_teacher(str(sd15_folder))
    assert isinstance(pipe, StableDiffusionPipeline) and not hasattr(pipe, "text_encoder_2")
    assert pipe.unet.config.addition_embed_type is None
    cond = encode_prompts(pipe, ["a red circle", "a blue square"])
    assert cond.pooled is None and cond.time_ids is None and cond.prompt_embeds.shape[0] == 2
    # CFG's unconditional is the empty prompt's embedding, as StableDiffusionPipeline does (not zeros)
    _, neg = pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 1, True)
    torch.testing.assert_close(cond.unconditional().prompt_embeds, neg)
    z = torch.randn(2, 4, 16, 16)
    e = Denoiser(pipe.unet, pipe.scheduler.alphas_cumprod).eps_cfg(z, torch.tensor(500), cond, 3.0)
    assert e.shape == z.shape and torch.isfinite(e).all()


def test_distillation_on_sd15_publishes_a_diffusers_lora(sd15_distilled, sd15_folder):
    """mlcd and ilcd train against the SD1.5 teacher; plain diffusers loads the LoRA and samples 2 steps."""
    from diffusers import StableDiffusionPipeline

    from models.scheduler import TLCMScheduler
    from tlcm.loaders.lora_io import load_lora_into

    params, paths = sd15_distilled
    assert json.loads((paths.metrics / "teacher.json").read_text())["class"] == "StableDiffusionPipeline"
    for stage in ("mlcd", "ilcd"):
        m = json.loads((paths.metrics / f"{stage}.json").read_text())
        assert m["steps"] == params.section(stage).steps and m["final_consistency"] >= 0
        meta = json.loads((paths.lora(stage) / "tlcm_lora.json").read_text())
        assert meta["teacher"] == str(sd15_folder) and meta["real_images_used"] == 0

    pipe = StableDiffusionPipeline.from_pretrained(sd15_folder)
    pipe.set_progress_bar_config(disable=True)
    z, t, text = torch.randn(1, 4, 16, 16), torch.tensor([700]), torch.randn(1, 24, 16)
    with torch.no_grad():
        plain = pipe.unet(z, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(paths.lora("ilcd"))
        with_lora = pipe.unet(z, t, encoder_hidden_states=text).sample
        ours = StableDiffusionPipeline.from_pretrained(sd15_folder)
        load_lora_into(ours.unet, paths.lora("ilcd"))
        trained = ours.unet(z, t, encoder_hidden_states=text).sample
    assert (with_lora - plain).abs().max() > 0  # the LoRA really changes the SD1.5 UNet ...
    torch.testing.assert_close(with_lora, trained, rtol=0, atol=1e-6)  # ... into exactly the trained student
    pipe.fuse_lora()
    pipe.scheduler = TLCMScheduler.from_config(pipe.scheduler.config)
    out = pipe("a small red circle on the left on a black background", num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    img = out.images[0]
    assert img.shape == (32, 32, 3) and (img >= 0).all() and (img <= 1).all()


def test_generate_with_sd15_teacher_and_lora(sd15_distilled, sd15_folder, tmp_path):
    """`tasks/generate.py` (what `tlcm generate` calls): the SD1.5 teacher with CFG, and the student LoRA."""
    from tasks.generate import generate

    params, paths = sd15_distilled
    t = generate(params, paths, ["a red circle"], 2, 3.0, 0, str(sd15_folder), tmp_path / "teacher.png")
    s = generate(params, paths, ["a red circle"], 2, None, 0, str(sd15_folder), tmp_path / "student.png",
                 str(paths.lora("ilcd")))
    assert t.stat().st_size > 100 and s.stat().st_size > 100


def test_mps_and_dmgan_on_sd15(sd15_distilled, sd15_folder):
    """The technique stages against the SD1.5 teacher: the reward model scores decoded x̂0, the
    discriminator head reads the cross-attention text (no pooled embedding), and the LoRA each
    publishes loads into plain ``StableDiffusionPipeline`` and changes its UNet."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from tasks.registry import run_stage

    params, paths = sd15_distilled
    upd = {k: params.section(k).model_copy(update={"loss": "mse", "lr": 1e-3}) for k in ("mps", "dmgan")}
    params = params.model_copy(update=upd)
    for stage in ("reward", "mps", "dmgan"):
        run_stage(stage, params, paths)
    for stage, before in (("mps", "ilcd"), ("dmgan", "mps")):
        m = json.loads((paths.metrics / f"{stage}.json").read_text())
        assert m["steps"] == params.section(stage).steps and m["enabled"] is True
        a = load_file(paths.lora(before) / "pytorch_lora_weights.safetensors")
        b = load_file(paths.lora(stage) / "pytorch_lora_weights.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4
    assert {"dm", "gan_g", "disc_acc_real"} <= set(json.loads((paths.metrics / "dmgan.json").read_text())["last"])
    pipe = StableDiffusionPipeline.from_pretrained(sd15_folder)
    pipe.load_lora_weights(paths.lora("dmgan"))
    assert json.loads((paths.lora("dmgan") / "tlcm_lora.json").read_text())["teacher"] == str(sd15_folder)


def test_sd15_mlcd_on_two_processes_matches_one_process(sd15_distilled, tmp_path_factory, tmp_path):
    """The multi-process contract holds for the SD1.5 teacher too (1e-5, as for the SDXL-shaped one)."""
    import yaml
    from conftest import run_cli
    from safetensors.torch import load_file

    from tasks.registry import run_stage
    from tlcm.core.params import load_params
    from tlcm.core.paths import Paths

    params, paths = sd15_distilled
    d = params.model_dump(mode="json")
    d["preset"] = "mini"
    d["mlcd"].update(batch_size=4, steps=2, checkpoint_every=1)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    roots = []
    for name in ("one", "two"):
        root = tmp_path_factory.mktemp(f"sd15_mlcd_{name}")
        (root / "world").symlink_to(paths.world)
        roots.append(Paths(root))
    run_stage("mlcd", load_params(f), roots[0])
    r = run_cli("stage", "mlcd", "--params", str(f), "--artifacts", str(roots[1].root), "--num-processes", "2",
                timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((roots[1].metrics / "mlcd.json").read_text())["world_size"] == 2
    a, b = (load_file(p.lora("mlcd") / "pytorch_lora_weights.safetensors") for p in roots)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"sd15 mlcd: max |1 process - 2 processes| = {diff:.3g}")
    assert a.keys() == b.keys() and diff < 1e-5

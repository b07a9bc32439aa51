"""Every bootstrap stage on the smoke preset, the teacher loaded the way SDXL is, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli

from tlcm.core.storage import ArtifactError


def test_teacher_is_a_real_sdxl_pipeline_folder(smoke_artifacts):
    from diffusers import StableDiffusionXLPipeline

    idx = json.loads((smoke_artifacts.teacher / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    img = pipe("a red circle left of a blue square on a gray background", num_inference_steps=2,
               guidance_scale=3.0, output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


def test_own_ddim_sampler_matches_diffusers_pipeline(smoke_artifacts):
    """Our DDIM+CFG sampler is the same computation as diffusers' SDXL pipeline with a trailing DDIMScheduler."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from models.denoiser import Denoiser, encode_prompts
    from models.sampling import sample_ddim, trailing_timesteps

    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                             clip_sample=False)
    prompts = ["a small red cross on the left on a black background", "a blue circle above a green square on a white background"]
    z_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, latents=z_T.clone(), output_type="latent").images
    with torch.no_grad():
        ours = sample_ddim(Denoiser(pipe.unet, pipe.scheduler.alphas_cumprod), encode_prompts(pipe, prompts),
                           trailing_timesteps(4), 3.0, z_T)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_evaluate_writes_table_grid_and_metrics(own_artifacts, smoke_params):
    from tasks.registry import run_stage

    smoke_artifacts = own_artifacts  # with the reward model (the reward column); the teacher rows need no LoRA
    params = smoke_params.model_copy(update={"evaluate": smoke_params.evaluate.model_copy(update={"student_stages": ()})})
    run_stage("evaluate", params, smoke_artifacts)
    bench = json.loads((smoke_artifacts.benchmark / "benchmark.json").read_text())
    rows, p = bench["rows"], params.evaluate
    assert rows[0]["method"].startswith("real renders")
    (ref,) = [r for r in rows if r["kind"] == "reference"]
    assert ref["steps"] == p.reference_steps and ref["guidance"] == p.guidance_scale and ref["unet_evals"] == 2 * ref["steps"]
    assert len(ref["alignment_per_seed"]) == p.sample_seeds
    # the whole sweep ran on the selection prompts; per sampler and step count the best by alignment and by
    # Fréchet distance were carried to the benchmark prompts
    sweep = bench["baseline_sweep"]
    assert len(sweep) == len(p.baseline_samplers) * len(p.baseline_steps) * len(p.baseline_guidance)
    baselines = [r for r in rows if r["kind"] == "baseline"]
    for name in p.baseline_samplers:
        for n in p.baseline_steps:
            cands = [r for r in sweep if r["sampler"] == name and r["steps"] == n]
            best_a = max(cands, key=lambda r: (r["alignment"], -r["frechet"]))
            carried = [r for r in baselines if r["sampler"] == name and r["steps"] == n]
            assert any(r["guidance"] == best_a["guidance"] and "alignment" in r["selected_by"] for r in carried)
    for r in [ref] + baselines:
        assert 0.0 <= r["alignment"] <= 1.0 and np.isfinite(r["frechet"]) and r["sec_per_image"] > 0
        assert 0.0 <= r["mirror_swapped"] <= 1.0 - r["alignment"] + 1e-9  # a subset of the failures
        assert r["real_images_used"] == 0 and isinstance(r["reward"], float)
        assert r["unet_evals"] == r["steps"] * (1 if r["guidance"] == 1.0 else 2)
    md = (smoke_artifacts.benchmark / "benchmark.md").read_text()
    assert "| method |" in md and "Best training-free sampler vs the reference" in md
    assert (smoke_artifacts.benchmark / "samples.png").stat().st_size > 1000


def test_cli_generate_writes_png(smoke_artifacts, tmp_path):
    out = tmp_path / "s.png"
    r = run_cli("generate", "--preset", "smoke", "--artifacts", str(smoke_artifacts.root), "--steps", "3",
                "--prompt", "a large red circle in the center on a gray background", "--prompt", "a blue cross above a red square on a black background",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 64


def test_missing_teacher_path_is_named(tmp_path):
    r = run_cli("generate", "--teacher", str(tmp_path / "nowhere"), "--prompt", "a red circle", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert str(tmp_path / "nowhere") in r.stderr and "tlcm stage teacher" in r.stderr


def test_corrupt_teacher_weight_is_named(smoke_artifacts, tmp_path):
    import shutil

    from tlcm.loaders.teacher_io import load_teacher

    bad = tmp_path / "teacher"
    shutil.copytree(smoke_artifacts.teacher, bad)
    f = next((bad / "unet").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="corrupt.*unet"):
        load_teacher(str(bad))


def test_killed_stage_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL a training stage mid-run; the rerun resumes from the last checkpoint and finishes."""
    import yaml

    cfg = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg["autoencoder"].update(block_out_channels=[8, 16], batch_size=4, steps=80, checkpoint_every=5)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    art = tmp_path / "art"
    cmd = [sys.executable, "-m", "flows.cli", "stage", "autoencoder", "--params", str(params), "--artifacts", str(art)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def latest_step() -> int:  # checkpoints/<stage>/<run identity>/latest.json
        found = list((art / "checkpoints" / "autoencoder").glob("*/latest.json"))
        return json.loads(found[0].read_text())["step"] if found else 0

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and latest_step() < 10:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_step()
    assert 10 <= killed_at < 80
    assert not (art / "autoencoder").exists()  # nothing half-written is published
    r = run_cli("stage", "autoencoder", "--params", str(params), "--artifacts", str(art))
    assert r.returncode == 0, r.stderr
    resumed = int(r.stderr.split("resumed from checkpoint at step ")[1].split("/")[0])
    assert resumed >= killed_at
    assert (art / "autoencoder" / "diffusion_pytorch_model.safetensors").is_file()


def test_teacher_caption_parsing_loss_trains_the_text_encoders_and_is_not_saved(smoke_artifacts, smoke_params, tmp_path):
    """teacher.parse_weight > 0 adds a parsing cross-entropy that falls below chance; the saved
    pipeline has exactly the tensors of a teacher trained without it (the head is discarded)."""
    from safetensors.torch import load_file

    from tasks.registry import run_stage
    from tlcm.shapes import world as W
    from tlcm.core.paths import Paths

    def train(name: str, **update) -> tuple[Paths, dict]:
        paths = Paths(tmp_path / name)
        paths.root.mkdir()
        for d in ("world", "autoencoder"):
            (paths.root / d).symlink_to(getattr(smoke_artifacts, d))
        teacher = smoke_params.teacher.model_copy(update=update)
        return paths, run_stage("teacher", smoke_params.model_copy(update={"teacher": teacher}), paths)

    parsed, info = train("parsed", parse_weight=1.0, steps=150, warmup_steps=5, lr=3e-3, batch_size=16)
    plain, plain_info = train("plain", parse_weight=0.0, steps=2)
    chance = float(np.mean([np.log(len(v)) for v in W.LABEL_SPACES.values()]))
    assert info["final_parse_ce"] < 0.5 * chance, (info["final_parse_ce"], chance)
    assert "final_parse_ce" not in plain_info
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"):
        ours = load_file(parsed.teacher / f"{part}.safetensors")
        ref = load_file(plain.teacher / f"{part}.safetensors")
        assert set(ours) == set(ref), part

"""The paper's §A.2 applications with the LoRA and TLCMScheduler (img2img, inpainting, a ControlNet made
from the teacher), and the agreement of the stock diffusers sampling paths with the benchmark's sampler."""
import json

import pytest
import torch

from tasks.applications import benchmark_rows, img2img_inference_steps
from tasks.evaluator import load_evaluator
from tlcm.core.paths import Paths
from tlcm.loaders.world_io import read_prompts


@pytest.fixture(scope="module")
def app_root(smoke_artifacts, perturbed_lora, tmp_path_factory):
    """An artifacts folder that sees the smoke world, teacher and evaluator, with the test LoRA as the shipped one."""
    root = tmp_path_factory.mktemp("apps")
    for name in ("world", "teacher", "evaluator"):
        (root / name).symlink_to(getattr(smoke_artifacts, name))
    (root / "lora_dmgan").symlink_to(perturbed_lora)
    return Paths(root)


def test_applications_and_stock_paths_in_diffusers_pipelines_with_the_lora(app_root, smoke_params):
    """controlnet stage (from_unet of the teacher), then every row `evaluate` adds on smoke. Stock paths: from
    the same z_T and noise, plain StableDiffusionXLPipeline + TLCMScheduler and stock LCMScheduler with
    timesteps=[999, 749, 499, 124] give the benchmark sampler's latents. Applications: the pipelines run, the
    teacher reference agrees with itself, and each row has its measurements."""
    from diffusers import ControlNetModel

    from tasks.registry import run_stage

    info = run_stage("controlnet", smoke_params, app_root)
    assert info["trained"] and info["steps"] == smoke_params.controlnet.steps
    cn = ControlNetModel.from_pretrained(app_root.controlnet)
    assert cn.config.conditioning_embedding_out_channels == [16, 32]  # the shapes VAE downsamples by 2
    net = load_evaluator(smoke_params, app_root)
    specs = read_prompts(app_root, "eval")
    rows = benchmark_rows(smoke_params, app_root, net, specs)
    diffs = {r["method"]: r["max_abs_diff"] for r in rows if "max_abs_diff" in r}
    print("max |Δ latents| vs the benchmark sampler:", json.dumps(diffs, indent=1))
    assert len(diffs) == 3 and diffs["TLCM after dmgan: benchmark sampler (models.sampling + TLCMScheduler)"] == 0.0
    assert any("LCMScheduler(timesteps=[999, 749, 499, 124])" in m for m in diffs)
    assert all(d <= 1e-4 for d in diffs.values()), diffs
    by = {(r["method"], r["steps"]): r for r in rows}
    a = smoke_params.applications
    for kind in ("img2img", "inpaint", "controlnet"):
        for n in a.steps:
            r = by[(f"{kind}: TLCM after dmgan", n)]
            assert 0 <= r["alignment"] <= 1 and 0 <= r["agree_teacher"] <= 1 and r["unet_evals"] == n
        teacher = next(r for (m, _), r in by.items() if m == f"{kind}: teacher DDIM + CFG")
        assert teacher["agree_teacher"] == 1.0 and teacher["guidance"] == smoke_params.evaluate.guidance_scale
    assert all("layout_kept" in r for r in rows if r["method"].startswith("img2img"))
    assert all("edge_iou" in r for r in rows if r["method"].startswith("controlnet"))
    assert {r["method"] for r in rows if "no ControlNet" in r["method"]}


@pytest.mark.math
def test_img2img_step_counts():
    assert img2img_inference_steps(2, 0.5) == 4 and img2img_inference_steps(4, 0.5) == 8
    assert img2img_inference_steps(2, 0.75) == 3
    with pytest.raises(ValueError, match="applications.steps"):
        img2img_inference_steps(5, 0.5)


@pytest.mark.math
def test_edge_map_marks_object_outlines():
    from models.controlnet import edge_map

    x = torch.zeros(1, 3, 16, 16)
    x[:, 0, 4:12, 4:12] = 1.0  # a red square
    e = edge_map(x)
    assert e.shape == (1, 3, 16, 16) and set(e.unique().tolist()) == {0.0, 1.0}
    assert e[0, 0, 8, 8] == 0 and e[0, 0, 4, 8] == 1 and e[0, 0, 0, 0] == 0

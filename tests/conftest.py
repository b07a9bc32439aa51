import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def smoke_params():
    from tlcm.params import load_params

    return load_params(REPO / "params.yaml", "smoke")


@pytest.fixture(scope="session")
def smoke_artifacts(tmp_path_factory, smoke_params):
    """world -> autoencoder -> evaluator -> teacher on the smoke preset, built once per test session."""
    from tasks.registry import run_stage
    from tlcm.paths import Paths

    paths = Paths(tmp_path_factory.mktemp("artifacts"))
    for name in ("world", "autoencoder", "evaluator", "teacher"):
        run_stage(name, smoke_params, paths)
    return paths


@pytest.fixture(scope="session")
def student_chain(smoke_artifacts, smoke_params):
    """bapps → latent_lpips → mlcd → ilcd on the smoke artifacts (the input of the technique stages)."""
    from tasks.registry import run_stage

    for name in ("bapps", "latent_lpips", "mlcd", "ilcd"):
        if not (smoke_artifacts.metrics / f"{name}.json").is_file():
            run_stage(name, smoke_params, smoke_artifacts)
    return smoke_artifacts


@pytest.fixture(scope="session")
def perturbed_lora(smoke_artifacts, tmp_path_factory):
    """A student LoRA folder on the smoke teacher whose weights visibly change the UNet (random A and B,
    not the zero-B start), saved as the stages save it: a dropped or mis-scaled module shows in the output."""
    from diffusers import StableDiffusionXLPipeline

    from models.lora import add_lora, lora_parameters
    from tlcm.lora_io import save_lora

    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    add_lora(pipe.unet, rank=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_lora(tmp_path_factory.mktemp("lora") / "lora_test", pipe.unet, {"stage": "test", "teacher": "train"})


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tlcm.cli", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


logging.getLogger("tlcm").setLevel(logging.INFO)

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# 2 threads (CI), unless OMP_NUM_THREADS says otherwise (on a shared machine, 2 threads per process oversubscribe the
# cores and a tiny UNet call takes seconds instead of milliseconds)
torch.set_num_threads(max(1, min(int(os.environ.get("OMP_NUM_THREADS") or 2), os.cpu_count() or 1)))
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TLCM_CHECK_READS", "1")  # a stage that reads an artifact it does not declare fails (tlcm/read_audit.py)


@pytest.fixture(scope="session")
def smoke_params():
    from tlcm.params import load_params

    return load_params(REPO / "params.yaml", "smoke")


@pytest.fixture(scope="session")
def smoke_artifacts(tmp_path_factory, smoke_params):
    """The teacher and the evaluator with what they need (world, autoencoder) on the smoke preset, once per session."""
    from tasks.registry import run_stage
    from tlcm.paths import Paths
    from tlcm.stages import upstream

    paths = Paths(tmp_path_factory.mktemp("artifacts"))
    for name in upstream("teacher", "evaluator"):
        run_stage(name, smoke_params, paths)
    return paths


@pytest.fixture(scope="session")
def student_chain(smoke_artifacts, smoke_params):
    """The iLCD LoRA and what it needs (bapps, latent_lpips, mlcd) on the smoke artifacts (the input of the technique stages)."""
    from tasks.registry import run_stage
    from tlcm.stages import upstream

    for name in upstream("ilcd"):
        if not (smoke_artifacts.metrics / f"{name}.json").is_file() and not (smoke_artifacts.root / name).is_dir():
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

"""Shared fixtures and the test tiers.

Tiers (pytest markers, registered in pyproject.toml): ``math`` (pure functions and small in-memory
objects: a few seconds each, no artifacts, no subprocess, no server), ``stage`` (the rest: runs stages,
loads the smoke teacher, calls the CLI or trains a small network: minutes) and ``servers`` (starts a
real MLflow store, S3 server, Prefect server or ``dvc repro``). ``math`` and ``servers`` are marked in the test modules; a test without a
tier marker is ``stage`` unless it uses a server fixture (:data:`SERVER_FIXTURES`), and a ``math``
test that asks for artifacts or a server is a collection error. ``pytest -m math`` is the fast loop;
CI runs everything.

Artifacts: ``smoke_artifacts`` and ``student_chain`` are built once per session and never written to
by tests; a test (or module fixture) that runs stages works on :func:`cow_copy` of them (hard links:
stages replace files atomically, so the shared files are never changed).
"""
import errno
import logging
import os
import shutil
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
os.environ.setdefault("TLCM_CHECK_READS", "1")  # a stage that reads an artifact it does not declare fails (tlcm/core/read_audit.py)


TIERS = ("math", "stage", "servers")
SERVER_FIXTURES = {"stack", "mlflow_store", "s3"}
ARTIFACT_FIXTURES = {"smoke_artifacts", "student_chain", "perturbed_lora", "own_artifacts", "own_chain"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        used = set(getattr(item, "fixturenames", ()))
        if len(set(tiers)) > 1:
            raise pytest.UsageError(f"{item.nodeid}: more than one tier marker {sorted(set(tiers))}; keep one")
        if tiers == ["math"] and used & (SERVER_FIXTURES | ARTIFACT_FIXTURES):
            raise pytest.UsageError(f"{item.nodeid} is marked math but uses {sorted(used & (SERVER_FIXTURES | ARTIFACT_FIXTURES))}"
                                    "; mark it stage or servers")
        if used & SERVER_FIXTURES and tiers != ["servers"]:
            if tiers:
                raise pytest.UsageError(f"{item.nodeid} starts a server ({sorted(used & SERVER_FIXTURES)}): mark it servers")
            item.add_marker(pytest.mark.servers)
        elif not tiers:
            item.add_marker(pytest.mark.stage)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


def cow_copy(paths, dest: Path):
    """A private artifacts folder with the content of ``paths`` (copy-on-write: hard links, so it costs
    no disk). Stages publish by atomic rename, which replaces the link in the copy and leaves the
    original as it was. A test that edits a file in place (corrupts it, scales tensors) makes a real
    copy of that file first (``shutil.copytree`` / ``copy2``)."""
    from tlcm.core.paths import Paths

    shutil.copytree(paths.root, dest, symlinks=True, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns(".locks"))
    return Paths(dest)


@pytest.fixture(scope="session")
def smoke_params():
    from tlcm.core.params import load_params

    return load_params(REPO / "params.yaml", "smoke")


@pytest.fixture(scope="session")
def smoke_artifacts(tmp_path_factory, smoke_params):
    """The teacher, the evaluator and the reward model with what they need (world, autoencoder) on the
    smoke preset, once per session. Read-only for tests: a test that runs stages uses ``own_artifacts``."""
    from tasks.registry import run_stage
    from tlcm.core.paths import Paths
    from tlcm.core.stages import upstream

    paths = Paths(tmp_path_factory.mktemp("artifacts"))
    for name in upstream("teacher", "evaluator", "reward"):
        run_stage(name, smoke_params, paths)
    return paths


@pytest.fixture(scope="session")
def student_chain(smoke_artifacts, smoke_params, tmp_path_factory):
    """The iLCD LoRA and what it needs (bapps, latent_lpips, mlcd) on the smoke preset, trained once per
    session into its own folder (a copy of ``smoke_artifacts``): the input of the technique stages.
    Read-only for tests: a test that runs stages uses ``own_chain``."""
    from tasks.registry import run_stage
    from tlcm.core.stages import upstream

    paths = cow_copy(smoke_artifacts, tmp_path_factory.mktemp("chain") / "artifacts")
    for name in upstream("ilcd"):
        if name not in upstream("teacher", "evaluator", "reward"):
            run_stage(name, smoke_params, paths)
    return paths


@pytest.fixture()
def own_artifacts(smoke_artifacts, tmp_path):
    """This test's own copy of ``smoke_artifacts`` (copy-on-write) to run stages in."""
    return cow_copy(smoke_artifacts, tmp_path / "artifacts")


@pytest.fixture()
def own_chain(student_chain, tmp_path):
    """This test's own copy of ``student_chain`` (copy-on-write) to run stages in."""
    return cow_copy(student_chain, tmp_path / "artifacts")


@pytest.fixture(scope="session")
def perturbed_lora(smoke_artifacts, tmp_path_factory):
    """A student LoRA folder on the smoke teacher whose weights visibly change the UNet (random A and B,
    not the zero-B start), saved as the stages save it: a dropped or mis-scaled module shows in the output."""
    from diffusers import StableDiffusionXLPipeline

    from models.lora import add_lora, lora_parameters
    from tlcm.loaders.lora_io import save_lora

    pipe = StableDiffusionXLPipeline.from_pretrained(smoke_artifacts.teacher)
    add_lora(pipe.unet, rank=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_lora(tmp_path_factory.mktemp("lora") / "lora_test", pipe.unet, {"stage": "test", "teacher": "train"})


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


logging.getLogger("tlcm").setLevel(logging.INFO)

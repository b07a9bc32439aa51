"""The stages in pipeline order, and the single entry point that DVC and Prefect both call."""
from __future__ import annotations

import importlib
import logging
import time

import torch

from tlcm import tracking
from tlcm.params import Params
from tlcm.paths import Paths

log = logging.getLogger("tlcm")

STAGES: tuple[str, ...] = ("world", "autoencoder", "evaluator", "teacher", "bapps", "latent_lpips", "reward",
                           "controlnet", "lcm_baseline", "mlcd", "ilcd", "mps", "dmgan", "evaluate", "register")


def run_stage(name: str, params: Params, paths: Paths) -> dict:
    """Run one stage (``tasks/<name>.py: run``) with a start and a wall-time log line, inside its
    records context (loss history; an MLflow run nested in the pipeline run when tracking is on)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
    module = importlib.import_module(f"tasks.{name}")
    log.info("stage %s: start (preset %s, artifacts %s)", name, params.preset, paths.root)
    t0 = time.monotonic()
    with torch.inference_mode(False), tracking.stage_run(name, params, paths) as record:
        result = record.result = module.run(params, paths)
    log.info("stage %s: done in %.1fs", name, time.monotonic() - t0)
    return result


def run_stage_on_worker(name: str, params: Params, paths: Paths, params_file: str = "params.yaml",
                        preset: str | None = None) -> dict:
    """What a Prefect task runs: ``run_stage`` in this process, or, on a worker with N > 1 GPUs, the
    stage under ``accelerate launch`` on N processes (training stages that support it)."""
    import json

    from tlcm.distributed import MULTI_PROCESS_STAGES, default_num_processes, launch_stage

    n = default_num_processes()
    if n <= 1 or name not in MULTI_PROCESS_STAGES:
        return run_stage(name, params, paths)
    log.info("stage %s: launching on %d processes", name, n)
    launch_stage(name, n, params_file, preset, str(paths.root))
    return json.loads((paths.metrics / f"{name}.json").read_text())

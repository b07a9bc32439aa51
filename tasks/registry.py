"""The single entry point that DVC (``tlcm stage``), ``tlcm run`` and the Prefect tasks call.

The stages themselves, their order and what each reads are declared in :mod:`tlcm.core.stages`.
"""
from __future__ import annotations

import importlib
import logging
import time

import torch

from tlcm.core import distributed, identity, read_audit
from tlcm.tracking import runs as tracking
from tlcm.core import stages as S
from tlcm.core.checkpoints import prune_after_success
from tlcm.core.locks import stage_lock, stage_lock_here
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import read_json

log = logging.getLogger("tlcm")


def run_stage(name: str, params: Params, paths: Paths) -> dict:
    """Run one stage (``tasks/<name>.py: run``) with a start and a wall-time log line, holding the
    stage's lock on the artifacts folder, inside its records context (loss history; an MLflow run
    nested in the pipeline run when tracking is on).

    The stage gets a view of ``params`` with only the keys it declares; its checkpoints are those
    of its identity (params, input artifacts, code: :mod:`tlcm.core.identity`). Once it has published
    its output, the checkpoints of earlier identities are removed and a stamp records the
    identity it ran with (what ``tlcm run`` and the Prefect cache compare with)."""
    stage = S.get(name)
    module = importlib.import_module(stage.module)
    with stage_lock_here(paths.root, name):
        ident = identity.stage_identity(name, params, paths.root)
        log.info("stage %s: start (preset %s, artifacts %s)", name, params.preset, paths.root)
        t0 = time.monotonic()
        with identity.running(ident), prune_after_success(), torch.inference_mode(False), \
                tracking.stage_run(name, params, paths) as record, read_audit.declared_reads(stage, paths.root):
            result = record.result = module.run(identity.params_view(stage, params), paths)
        if distributed.is_main():
            identity.write_stamp(ident, paths.root)
        log.info("stage %s: done in %.1fs", name, time.monotonic() - t0)
    return result


def run_if_changed(name: str, params: Params, paths: Paths) -> dict | None:
    """``run_stage`` unless the stage's last successful run had the same identity and its outputs
    are as it left them (then log it and return None): what ``tlcm run`` does, like ``dvc repro``."""
    ident = identity.stage_identity(name, params, paths.root)
    if identity.up_to_date(ident, paths.root):
        log.info("stage %s: up to date (same params, input artifacts and code as its last run, outputs unchanged); "
                 "skipped", name)
        return None
    return run_stage(name, params, paths)


def run_stage_on_worker(name: str, params: Params, paths: Paths, params_file: str = "params.yaml",
                        preset: str | None = None) -> dict:
    """What a Prefect task runs: ``run_stage`` in this process, or, on a worker with N > 1 GPUs, the
    stage under ``accelerate launch`` on N processes (training stages that support it)."""
    from tlcm.core.launch import default_num_processes, launch_stage

    n = default_num_processes()
    if n <= 1 or not S.get(name).multi_process:
        return run_stage(name, params, paths)
    log.info("stage %s: launching on %d processes", name, n)
    with stage_lock(paths.root, name):
        launch_stage(name, n, params_file, preset, str(paths.root))
    return read_json(paths.metrics / f"{name}.json", f"metrics of stage {name}",
                     "the launched processes did not publish them; see their log above")

"""Prefect flow ``tlcm``: one task per stage, in the order of ``tlcm.core.stages.STAGES``.

Orchestration only. Every task calls ``tasks.registry.run_stage``, the same entry point as
DVC's ``tlcm stage <name>``. Tasks retry transient failures (not bad params, missing or
corrupt artifacts, a full or unwritable disk, non-finite losses, unusable tracking config or
a stage already running on the same artifacts folder) and are cached across flow
runs on their identity (declared params, input artifacts and code: ``flows/caching.py``), the
same inputs ``dvc.yaml`` lists; ``register`` is never cached: each completed flow run registers
a model version.

Deploy with ``prefect deploy --name full`` (see ``prefect.yaml``), or run in-process with
``python -m flows.tlcm --preset smoke`` (needs a Prefect API or starts a temporary one;
``tlcm run`` runs the same stages with no Prefect at all).
"""
from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from flows import caching
from tasks.registry import run_stage_on_worker
from tlcm.core import stages as S
from tlcm.tracking import runs as tracking
from tlcm.core.locks import StageBusy
from tlcm.tracking.mlflow_store import TrackingError
from tlcm.core.params import ParamsError, load_params
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError
from tlcm.core.training import NonFiniteLoss

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (ParamsError, ArtifactError, NonFiniteLoss, TrackingError,
                                                     StageBusy, KeyError)
RETRIES, RETRY_DELAYS = 2, [10, 60]

logging.getLogger("tlcm").setLevel(logging.INFO)


def is_transient(task, task_run, state) -> bool:
    """``retry_condition_fn``: retry anything except errors that a retry cannot fix."""
    try:
        state.result()
    except PERMANENT_ERRORS:
        return False
    except BaseException:  # noqa: BLE001 - e.g. a network blip, an OOM-killed worker thread
        return True
    return True


def run_stage_task(stage: str, preset: str | None = None, artifacts: str = "artifacts",
                   params_file: str = "params.yaml") -> dict:
    """The body of every stage task: the stage (on the worker's GPU count), then stamp the outputs for the cache."""
    params, paths = load_params(params_file, preset), Paths(Path(artifacts))
    result = run_stage_on_worker(stage, params, paths, params_file, preset)
    ctx = TaskRunContext.get()
    caching.record(stage, paths, str(ctx.task_run.id) if ctx and ctx.task_run else None)
    return result


def _stage_task(stage: S.Stage):
    cache = dict(cache_key_fn=caching.stage_cache_key, persist_result=True) if stage.cached else \
        dict(cache_policy=NO_CACHE, persist_result=False)
    return task(run_stage_task, name=stage.name, task_run_name=stage.name, retries=RETRIES,
                retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=is_transient, **cache)


STAGE_TASKS = {stage.name: _stage_task(stage) for stage in S.STAGES}


@flow(name="tlcm", log_prints=True)
def tlcm(preset: str | None = None, artifacts: str = "artifacts", params_file: str = "params.yaml",
         until: str | None = None) -> dict[str, dict]:
    """The whole pipeline: ``preset`` (None = the params file's own), ``artifacts`` folder,
    ``params_file``; ``until`` stops after that stage. One MLflow parent run per flow run."""
    params = load_params(params_file, preset)  # bad params fail the flow before any task starts
    if until is not None and until not in S.NAMES:
        raise ParamsError(f"until: unknown stage '{until}' (stages: {', '.join(S.NAMES)})")
    results: dict[str, dict] = {}
    with tracking.pipeline_run(params, Paths(Path(artifacts)), run_name=flow_run.get_name(),
                               tags={"prefect.flow_run_id": flow_run.get_id(), "tlcm.entry": "prefect"}):
        for stage in S.NAMES:
            results[stage] = STAGE_TASKS[stage](stage, preset, artifacts, params_file)
            if stage == until:
                break
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="run the tlcm flow in this process")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--params-file", default="params.yaml")
    ap.add_argument("--until", default=None)
    a = ap.parse_args()
    tlcm(a.preset, a.artifacts, a.params_file, a.until)

"""Result caching of the stage tasks across flow runs, keyed on the stage identity.

A stage's cache key comes from :func:`tlcm.core.identity.stage_identity`: the resolved values of the
params it declares, the content of the input artifacts it declares and of its code (its import
closure), the same things ``dvc.yaml`` lists for it and its checkpoints are keyed on. So a
rerun with unchanged inputs is a cache hit and trains nothing, exactly when ``dvc repro`` (and
``tlcm run``) would skip the stage.

A hit must also mean the stage's outputs are still there: every successful run leaves a stamp
``<artifacts>/.stamps/<stage>.json`` with its identity and the content hash of its outputs, and
the Prefect task adds the cache key it ran under. The key is reused only while the stamp matches
both the identity and the outputs on disk; otherwise the key is fresh (the identity plus the task
run id), so a deleted or edited output is rebuilt and the new result is cached under the new key.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tlcm.core import identity
from tlcm.core.params import Params, load_params
from tlcm.core.paths import Paths
from tlcm.core.storage import atomic_write_json

log = logging.getLogger("tlcm")

_keys: dict[str, str] = {}  # task run id -> the cache key it used


def _task_args(parameters: dict) -> tuple[str, Params, Paths]:
    params = load_params(parameters.get("params_file") or "params.yaml", parameters.get("preset"))
    return parameters["stage"], params, Paths(Path(parameters.get("artifacts") or "artifacts"))


def key_for(stage: str, params: Params, paths: Paths, task_run_id: str) -> str:
    """The cache key for this task run: the stamped key if the identity and the outputs still match
    it, else a fresh one derived from the identity."""
    ident = identity.stage_identity(stage, params, paths.root)
    stamp = identity.read_stamp(stage, paths.root)
    if stamp.get("prefect_key") and identity.up_to_date(ident, paths.root):
        key = stamp["prefect_key"]
    else:
        key = f"tlcm-{stage}-{ident.hash[:32]}-" + hashlib.sha256(task_run_id.encode()).hexdigest()[:8]
    _keys[task_run_id] = key
    return key


def stage_cache_key(context, parameters: dict) -> str:
    """Prefect ``cache_key_fn`` of the stage tasks."""
    stage, params, paths = _task_args(parameters)
    return key_for(stage, params, paths, str(context.task_run.id))


def record(stage: str, paths: Paths, task_run_id: str | None) -> None:
    """After a stage ran (and stamped its identity and outputs): add the key this task run is cached under."""
    if task_run_id is None or task_run_id not in _keys:
        return
    key = _keys.pop(task_run_id)
    stamp = identity.read_stamp(stage, paths.root)
    if stamp:
        atomic_write_json(identity.stamp_path(stage, paths.root), {**stamp, "prefect_key": key})

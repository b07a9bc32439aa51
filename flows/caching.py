"""Result caching of the stage tasks across flow runs, with DVC's stage definitions as the inputs.

A stage's cache key is a hash of what ``dvc.yaml`` says the stage depends on: its ``cmd``, the
resolved values of its ``params`` (after the preset overlay) and the content of its ``deps``
(code files and upstream artifact folders). So a rerun with unchanged inputs is a cache hit
and trains nothing, exactly when ``dvc repro`` would skip the stage.

A hit must also mean the stage's outputs are still there: after a stage runs, a stamp
``<artifacts>/.prefect/<stage>.json`` records the inputs hash, the cache key used and the
content hash of the outputs. The key is reused only while the stamp matches both the inputs
and the outputs on disk; otherwise the key is fresh (derived from the task run id), so a
deleted or edited output is rebuilt and the new result is cached under the new key.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from tlcm.params import Params, load_params
from tlcm.paths import Paths
from tlcm.storage import atomic_write_json
from tlcm.tracking import tree_sha256

log = logging.getLogger("tlcm")

DVC_FILE = "dvc.yaml"
ARTIFACTS_PREFIX = "artifacts/"
_keys: dict[str, tuple[str, str]] = {}  # task run id -> (inputs hash, cache key it used)


def stage_spec(stage: str, project: Path | None = None) -> dict | None:
    """The stage's entry in ``dvc.yaml`` (None if there is no dvc.yaml or no such stage)."""
    f = (project or Path.cwd()) / DVC_FILE
    if not f.is_file():
        return None
    return (yaml.safe_load(f.read_text()) or {}).get("stages", {}).get(stage)


def _local(entry: str | dict, paths: Paths, project: Path) -> Path:
    name = entry if isinstance(entry, str) else next(iter(entry))
    if name.startswith(ARTIFACTS_PREFIX):  # the flow's artifacts root may not be ./artifacts
        return Path(paths.root) / name[len(ARTIFACTS_PREFIX):]
    return project / name


def _param_values(spec: dict, params: Params, project: Path) -> dict[str, Any]:
    data = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for entry in spec.get("params", []):
        if isinstance(entry, dict):  # {other_file.yaml: [keys]}: hash that file
            for fname in entry:
                out[f"file:{fname}"] = tree_sha256(project / fname)
            continue
        node: Any = data
        for part in str(entry).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[str(entry)] = node
    return out


def outputs(stage: str, paths: Paths, project: Path | None = None) -> list[Path]:
    spec = stage_spec(stage, project) or {}
    project = project or Path.cwd()
    return [_local(e, paths, project) for kind in ("outs", "metrics", "plots") for e in spec.get(kind, [])]


def inputs_hash(stage: str, params: Params, paths: Paths, project: Path | None = None) -> str | None:
    """Hash of the stage's cmd, resolved params and dependency contents (None: stage not in dvc.yaml)."""
    project = project or Path.cwd()
    spec = stage_spec(stage, project)
    if spec is None:
        return None
    blob = {
        "stage": stage,
        "cmd": spec.get("cmd"),
        "params": _param_values(spec, params, project),
        "deps": {str(d): tree_sha256(_local(d, paths, project)) for d in spec.get("deps", [])},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def outputs_hash(stage: str, paths: Paths, project: Path | None = None) -> str | None:
    """Hash of the stage's outputs; None if any is missing."""
    hashes = {}
    for f in outputs(stage, paths, project):
        h = tree_sha256(f)
        if h is None:
            return None
        hashes[str(f)] = h
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def stamp_path(stage: str, paths: Paths) -> Path:
    return Path(paths.root) / ".prefect" / f"{stage}.json"


def _read_stamp(stage: str, paths: Paths) -> dict:
    try:
        return json.loads(stamp_path(stage, paths).read_text())
    except (OSError, ValueError):
        return {}


def _task_args(parameters: dict) -> tuple[str, Params, Paths]:
    params = load_params(parameters.get("params_file") or "params.yaml", parameters.get("preset"))
    return parameters["stage"], params, Paths(Path(parameters.get("artifacts") or "artifacts"))


def key_for(stage: str, params: Params, paths: Paths, task_run_id: str) -> str | None:
    """The cache key for this task run: the stamped key if inputs and outputs still match it,
    else a fresh one. None (no caching) when the stage is not in dvc.yaml."""
    inputs = inputs_hash(stage, params, paths)
    if inputs is None:
        log.warning("%s: no '%s' stage in %s here; the Prefect task is not cached", stage, stage, DVC_FILE)
        return None
    stamp = _read_stamp(stage, paths)
    if stamp.get("inputs") == inputs and stamp.get("key") and stamp.get("outputs") == outputs_hash(stage, paths):
        key = stamp["key"]
    else:
        key = f"tlcm-{stage}-" + hashlib.sha256(f"{inputs}:{task_run_id}".encode()).hexdigest()[:32]
    _keys[task_run_id] = (inputs, key)
    return key


def stage_cache_key(context, parameters: dict) -> str | None:
    """Prefect ``cache_key_fn`` of the stage tasks."""
    stage, params, paths = _task_args(parameters)
    return key_for(stage, params, paths, str(context.task_run.id))


def record(stage: str, params: Params, paths: Paths, task_run_id: str | None) -> None:
    """After a stage ran: stamp the key this task run is cached under and the outputs it made."""
    if task_run_id is None or task_run_id not in _keys:
        return
    inputs, key = _keys.pop(task_run_id)
    atomic_write_json(stamp_path(stage, paths), {"stage": stage, "inputs": inputs, "key": key,
                                                 "outputs": outputs_hash(stage, paths)})

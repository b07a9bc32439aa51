"""Records: MLflow runs (a parent per pipeline run, a nested run per stage) and the per-step loss
history DVC plots. The store and the switch: :mod:`tlcm.tracking.mlflow_store`; the check before work:
:mod:`tlcm.tracking.store_preflight`; provenance: :mod:`tlcm.core.provenance`; the registry: :mod:`tlcm.tracking.model_registry`.

Switch (environment variable ``TLCM_TRACKING``):

- unset / ``auto`` (default): a pipeline run (the Prefect flow, ``tlcm run``) opens a parent
  MLflow run and every stage inside it a nested run; the ``register`` stage always records
  (it has to: its output is a registered model version); a lone ``tlcm stage X`` (what DVC
  calls) does not start an MLflow run.
- ``1`` / ``on``: also a lone ``tlcm stage X`` logs a (top-level) run.
- ``0`` / ``off``: no MLflow at all (``register`` then records that it skipped).

Where: ``MLFLOW_TRACKING_URI`` if set (a server, e.g. ``http://127.0.0.1:5000``), else the
embedded default: a SQLite store ``mlflow.db`` and an artifact folder ``mlruns/`` in the
current directory (the project root), no server. The experiment is ``MLFLOW_EXPERIMENT_NAME``
(default ``tlcm``). S3 endpoint and credentials come only from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_S3_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL``); nothing here logs environment variables or credentials.

The per-step loss history (``<artifacts>/metrics/<stage>_history.json``, a DVC plot) is
written whether or not MLflow is on. ``mlflow`` and ``boto3`` are imported lazily, so code
that never tracks never pays for them.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tlcm.tracking.mlflow_store import (TrackingError, client, enabled, experiment_id, experiment_name, first_line,  # noqa: F401
                               metric_key, mode, redact, tracking_uri)
from tlcm.core.provenance import file_sha256, git_commit
from tlcm.core.storage import atomic_write_json, atomic_write_text
from tlcm.tracking.store_preflight import preflight

log = logging.getLogger("tlcm")

ALWAYS_TRACKED = frozenset({"register"})


# ---- flattening --------------------------------------------------------------------------

def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}`` (lists/tuples kept as leaves)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = obj
    return out


def numeric_metrics(obj: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers in a nested result, flattened into MLflow-safe keys."""
    out = {}
    for k, v in flatten(obj, prefix).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[metric_key(k)] = float(v)
    return out


def stage_params(stage: str, params) -> dict[str, str]:
    """The resolved params a stage is logged with: ``preset`` and its own section, flattened."""
    data = params.model_dump(mode="json")
    out = {"preset": data["preset"]}
    if stage in data:
        out.update({f"{stage}.{k}": v for k, v in flatten(data[stage]).items()})
    return {metric_key(k): str(v)[:6000] for k, v in out.items()}

# ---- runs --------------------------------------------------------------------------------

@dataclass
class StageRecord:
    """What is known about the stage running in this context."""
    stage: str
    paths: Any
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    result: Any = None


_parent_run: str | None = None  # one pipeline per process; read from task threads too
_current: contextvars.ContextVar[StageRecord | None] = contextvars.ContextVar("tlcm_stage", default=None)


def parent_run_id() -> str | None:
    return _parent_run


def current_stage() -> StageRecord | None:
    return _current.get()


def _tags(params, extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {"tlcm.preset": params.preset, "tlcm.git_commit": git_commit()}
    lock = file_sha256(Path("dvc.lock"))
    if lock:
        tags["tlcm.dvc_lock_sha256"] = lock
    tags.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    return tags


@dataclass
class Outcome:
    """How a run's block ended (MLflow's FINISHED, KILLED on Ctrl-C, else FAILED) and when it started."""
    t0: float = field(default_factory=time.monotonic)
    status: str = "FAILED"

    @contextlib.contextmanager
    def of_block(self) -> Iterator[None]:
        try:
            yield
            self.status = "FINISHED"
        except KeyboardInterrupt:
            self.status = "KILLED"
            raise


@contextlib.contextmanager
def pipeline_run(params, paths, run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[str | None]:
    """The parent MLflow run of one pipeline run (flow run or ``tlcm run``); yields its id (None when off)."""
    global _parent_run
    if not enabled():
        yield None
        return
    preflight()
    c = client()
    run = c.create_run(experiment_id(), run_name=run_name, tags={**_tags(params, tags), "tlcm.kind": "pipeline"})
    rid = run.info.run_id
    c.log_batch(rid, params=_params_list({"preset": params.preset, "artifacts": str(paths.root)}))
    log.info("mlflow: pipeline run %s (experiment '%s' at %s)", rid, experiment_name(), redact(tracking_uri()))
    previous, _parent_run = _parent_run, rid
    outcome = Outcome()
    try:
        with outcome.of_block():
            yield rid
    finally:
        _parent_run = previous
        with contextlib.suppress(Exception):
            c.log_metric(rid, "wall_seconds", time.monotonic() - outcome.t0)
        c.set_terminated(rid, outcome.status)


def _params_list(d: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in d.items()]


@contextlib.contextmanager
def stage_run(stage: str, params, paths) -> Iterator[StageRecord]:
    """Context of one stage: collects the loss history (written to ``metrics/<stage>_history.json``)
    and, when tracking applies, an MLflow run nested under the pipeline run with the stage's
    params, per-step losses, final metrics, wall time and its image/table artifacts."""
    rec = StageRecord(stage, paths)
    track = enabled() and (_parent_run is not None or mode() == "on" or stage in ALWAYS_TRACKED)
    c = None
    if track and _parent_run is None:  # a lone stage: check the store before any work (a pipeline run did already)
        preflight()
    if track:
        c = client()
        tags = _tags(params, {"tlcm.stage": stage, "tlcm.kind": "stage"})
        if _parent_run:
            tags["mlflow.parentRunId"] = _parent_run
        rec.run_id = c.create_run(experiment_id(), run_name=stage, tags=tags).info.run_id
        c.log_batch(rec.run_id, params=_params_list(stage_params(stage, params)))
    token = _current.set(rec)
    outcome = Outcome()
    try:
        with outcome.of_block():
            yield rec
    finally:
        _current.reset(token)
        history_file = write_history(stage, paths, rec.history)
        if c is not None and rec.run_id:
            try:
                _finish_stage(c, rec, paths, time.monotonic() - outcome.t0, history_file, outcome.status)
            finally:
                c.set_terminated(rec.run_id, outcome.status)


def _finish_stage(c, rec: StageRecord, paths, seconds: float, history_file: Path | None, status: str) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = {"wall_seconds": seconds}
    if status == "FINISHED":
        metrics.update(numeric_metrics(rec.result))
        summary = Path(paths.metrics) / f"{rec.stage}.json"
        if summary.is_file():
            with contextlib.suppress(ValueError):
                metrics.update(numeric_metrics(json.loads(summary.read_text())))
    items = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 900):
        c.log_batch(rec.run_id, metrics=items[i:i + 900])
    if status != "FINISHED":
        return
    for f in (history_file, Path(paths.metrics) / f"{rec.stage}.json"):
        if f is not None and f.is_file():
            c.log_artifact(rec.run_id, str(f), "metrics")
    if rec.stage == "evaluate":
        for name in ("samples.png", "benchmark.md", "benchmark.json"):
            f = Path(paths.benchmark) / name
            if f.is_file():
                c.log_artifact(rec.run_id, str(f), "benchmark")


def log_step(stage: str, step: int, terms: dict[str, float]) -> None:
    """Called by the training loop at each log step with the averaged loss terms."""
    rec = _current.get()
    if rec is None or rec.stage != stage:
        return
    row = {"step": int(step), **{k: float(v) for k, v in terms.items()}}
    rec.history.append(row)
    if rec.run_id:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(f"loss/{metric_key(k)}", v, now, int(step)) for k, v in row.items()
              if k != "step" and math.isfinite(v)]
        try:
            client().log_batch(rec.run_id, metrics=ms)
        except Exception as e:  # noqa: BLE001 - a hiccup of the tracking server must not kill training
            log.warning("mlflow: could not log %s step %d (%s)", stage, step, first_line(e))


def history_path(stage: str, paths) -> Path:
    return Path(paths.metrics) / f"{stage}_history.json"


def write_history(stage: str, paths, history: list[dict[str, float]]) -> Path | None:
    """Write the loss curve of this invocation (a DVC plot: x = step). A stage that trained
    nothing (resumed at its last step) keeps the existing file, or writes ``[]`` if there is
    none; a stage without a training loop writes nothing."""
    f = history_path(stage, paths)
    if history:
        atomic_write_text(f, json.dumps(history, indent=1) + "\n")  # keys in order: step first
    elif not f.exists() and Path(paths.checkpoints(stage)).exists():
        atomic_write_json(f, [])
    return f if f.exists() else None

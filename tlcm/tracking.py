"""Records: MLflow runs (a parent per pipeline run, a nested run per stage), the per-step loss
history DVC plots, and a preflight check of the tracking server and S3 store.

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
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from tlcm.storage import atomic_write_json, atomic_write_text

log = logging.getLogger("tlcm")

SWITCH_ENV = "TLCM_TRACKING"
DEFAULT_EXPERIMENT = "tlcm"
ALWAYS_TRACKED = frozenset({"register"})
_OFF, _ON = {"0", "off", "false", "no"}, {"1", "on", "true", "yes"}


class TrackingError(RuntimeError):
    """The tracking server, the registry or the S3 store cannot be used; the message names the endpoint."""


# ---- configuration ---------------------------------------------------------------------

def mode() -> str:
    """``off``, ``auto`` (default) or ``on``, from ``TLCM_TRACKING``."""
    v = os.environ.get(SWITCH_ENV, "auto").strip().lower()
    if v in _OFF:
        return "off"
    if v in _ON:
        return "on"
    return "auto"


def enabled() -> bool:
    return mode() != "off"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded SQLite store ``./mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def is_embedded() -> bool:
    """True when no ``MLFLOW_TRACKING_URI`` is set (the local SQLite store + ``./mlruns``)."""
    return not os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT


def redact(uri: str) -> str:
    """A URI without user:password, safe to print."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


_clients: dict[str, Any] = {}
_exp_ids: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def client():
    """An ``MlflowClient`` for :func:`tracking_uri` (cached per URI)."""
    uri = tracking_uri()
    with _lock:
        if uri not in _clients:
            from mlflow import MlflowClient

            _clients[uri] = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return _clients[uri]


def experiment_id() -> str:
    """The experiment's id, created on first use (embedded store: artifacts under ``./mlruns``)."""
    uri, name = tracking_uri(), experiment_name()
    key = (uri, name)
    if key in _exp_ids:
        return _exp_ids[key]
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = (Path.cwd().resolve() / "mlruns" / metric_key(name)).as_uri() if is_embedded() else None
        try:
            eid = c.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created concurrently by another process
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            eid = exp.experiment_id
    else:
        eid = exp.experiment_id
    _exp_ids[key] = eid
    return eid


# ---- preflight: fail fast, naming the endpoint ---------------------------------------------

def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (None = AWS itself)."""
    for k in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        v = os.environ.get(k, "").strip()
        if v:
            return v
    return None


def check_s3(url: str, endpoint: str | None = None, timeout: float = 5.0) -> None:
    """Check that ``s3://bucket[/prefix]`` is reachable and accepts the credentials in the environment.

    Raises :class:`TrackingError` naming the endpoint and bucket (never the credentials).
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise TrackingError(f"not an s3:// URL: {url}")
    bucket = parts.netloc
    endpoint = endpoint or s3_endpoint()
    where = f"S3 endpoint {redact(endpoint) if endpoint else 'AWS (default endpoint)'}"
    cfg = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
    # a fresh session: the default one caches the first credentials it resolved
    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg,
                      region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1")
    try:
        s3.list_objects_v2(Bucket=bucket, Prefix=parts.path.lstrip("/"), MaxKeys=1)
    except NoCredentialsError:
        raise TrackingError(f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            f"(bucket '{bucket}')") from None
    except EndpointConnectionError as e:
        raise TrackingError(f"{where} is not reachable ({type(e).__name__}); check MLFLOW_S3_ENDPOINT_URL / "
                            f"AWS_ENDPOINT_URL (bucket '{bucket}')") from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"} or status == 403:
            raise TrackingError(f"{where} rejected the S3 credentials for bucket '{bucket}' ({code or status}); "
                                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        if code in {"NoSuchBucket", "404"} or status == 404:
            raise TrackingError(f"{where}: bucket '{bucket}' does not exist") from None
        raise TrackingError(f"{where}: bucket '{bucket}': {code or status}") from None
    except BotoCoreError as e:  # timeouts, bad endpoint URL, ...
        raise TrackingError(f"{where} is not usable ({type(e).__name__}: {e}) (bucket '{bucket}')") from None


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI must answer ``/health``."""
    import urllib.error
    import urllib.request

    url = redact(uri).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) only, checked by caller
            if r.status != 200:
                raise TrackingError(f"MLflow tracking server {redact(uri)} answered {r.status} on /health")
    except urllib.error.HTTPError as e:
        raise TrackingError(f"MLflow tracking server {redact(uri)} answered {e.code} on /health") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {redact(uri)} is not reachable ({reason}); start it or fix "
                            "MLFLOW_TRACKING_URI") from None


def preflight() -> None:
    """Check, before any work, that records can be written: the tracking server answers and,
    when this process writes artifacts to S3 itself, the bucket accepts our credentials."""
    if not enabled():
        return
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    try:
        exp = client().get_experiment(experiment_id())
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any store error: name the store
        raise TrackingError(f"MLflow store {redact(uri)} is not usable: {type(e).__name__}: {_first_line(e)}") from None
    if exp.artifact_location.startswith("s3://"):
        check_s3(exp.artifact_location)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# ---- provenance ------------------------------------------------------------------------

def git_commit(cwd: Path | None = None) -> str:
    """``HEAD`` of the project repo, with ``-dirty`` if tracked files changed; ``unknown`` outside git."""
    try:
        kw = dict(cwd=cwd or Path.cwd(), capture_output=True, text=True, timeout=10)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **kw).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **kw).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(path: Path) -> str | None:
    """Content hash of a file or folder (relative names + bytes); None if it does not exist."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update((file_sha256(f) or "").encode() + b"\n")
    return h.hexdigest()


# ---- flattening --------------------------------------------------------------------------

_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-./]+")


def metric_key(name: str) -> str:
    """An MLflow-safe metric/param key."""
    return re.sub(r"_+(?=[./])|(?<=[./])_+", "", _BAD_KEY.sub("_", name)).strip("_") or "value"


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
    t0, status = time.monotonic(), "FAILED"
    try:
        yield rid
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _parent_run = previous
        with contextlib.suppress(Exception):
            c.log_metric(rid, "wall_seconds", time.monotonic() - t0)
        c.set_terminated(rid, status)


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
    t0, status = time.monotonic(), "FAILED"
    try:
        yield rec
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _current.reset(token)
        history_file = write_history(stage, paths, rec.history)
        if c is not None and rec.run_id:
            try:
                _finish_stage(c, rec, paths, time.monotonic() - t0, history_file, status)
            finally:
                c.set_terminated(rec.run_id, status)


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
            log.warning("mlflow: could not log %s step %d (%s)", stage, step, _first_line(e))


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


# ---- the registry --------------------------------------------------------------------------

def register_directory(model_name: str, directory: Path, card: str, tags: dict[str, str] | None = None,
                       files: list[Path] | None = None, aliases: tuple[str, ...] = ("candidate",)):
    """Log ``directory`` (plus a ``README.md`` model card and extra ``files``) as ``model/`` of the
    current stage run and register it as a new version of ``model_name``; set ``aliases``.
    Returns the ``ModelVersion``."""
    rec = _current.get()
    if rec is None or rec.run_id is None:
        raise TrackingError("register_directory needs an MLflow stage run (tracking is off?)")
    c = client()
    uri = redact(tracking_uri())
    run = c.get_run(rec.run_id)
    try:
        c.log_artifacts(rec.run_id, str(directory), "model")
        c.log_text(rec.run_id, card, "model/README.md")
        for f in files or []:
            if Path(f).is_file():
                c.log_artifact(rec.run_id, str(f), "model")
    except Exception as e:  # noqa: BLE001 - name the store
        raise TrackingError(f"uploading {directory} to {run.info.artifact_uri} (tracking {uri}) failed: "
                            f"{type(e).__name__}: {_first_line(e)}") from None
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(model_name, description="TLCM few-step model (see each version's model card).")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise
    mv = c.create_model_version(model_name, source=f"{run.info.artifact_uri}/model", run_id=rec.run_id,
                                tags=tags or {}, description=card)
    for _ in range(60):
        if mv.status == "READY":
            break
        time.sleep(0.5)
        mv = c.get_model_version(model_name, mv.version)
    for alias in aliases:
        c.set_registered_model_alias(model_name, alias, mv.version)
    c.set_tag(rec.run_id, "tlcm.model_version", f"{model_name}/{mv.version}")
    return mv

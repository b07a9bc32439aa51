"""The MLflow store the records go to: the ``TLCM_TRACKING`` switch, the tracking URI (a server, or the
embedded SQLite store ``./mlflow.db`` with artifacts in ``./mlruns``), the experiment, and an
``MlflowClient`` for them. Run lifecycle: :mod:`tlcm.tracking.runs`; checking the store before work:
:mod:`tlcm.tracking.store_preflight`; registering a version: :mod:`tlcm.tracking.model_registry`.
S3 endpoint and credentials come only from the environment; nothing here logs them."""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SWITCH_ENV = "TLCM_TRACKING"
DEFAULT_EXPERIMENT = "tlcm"
_OFF, _ON = {"0", "off", "false", "no"}, {"1", "on", "true", "yes"}


class TrackingError(RuntimeError):
    """The tracking server, the registry or the S3 store cannot be used; the message names the endpoint."""



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


_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-./]+")


def metric_key(name: str) -> str:
    """An MLflow-safe metric/param key."""
    return re.sub(r"_+(?=[./])|(?<=[./])_+", "", _BAD_KEY.sub("_", name)).strip("_") or "value"


def first_line(e: BaseException) -> str:
    """The first line of an error message (at most 300 characters), for one-line errors."""
    return (str(e).strip().splitlines() or [""])[0][:300]

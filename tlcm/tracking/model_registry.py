"""The model registry: log a folder as the current stage run's ``model/`` and register it as a new
version of a registered model, with a model card and aliases."""
from __future__ import annotations

import time
from pathlib import Path

from tlcm.tracking.mlflow_store import TrackingError, client, first_line, redact, tracking_uri
from tlcm.tracking.runs import current_stage


def register_directory(model_name: str, directory: Path, card: str, tags: dict[str, str] | None = None,
                       files: list[Path] | None = None, aliases: tuple[str, ...] = ("candidate",)):
    """Log ``directory`` (plus a ``README.md`` model card and extra ``files``) as ``model/`` of the
    current stage run and register it as a new version of ``model_name``; set ``aliases``.
    Returns the ``ModelVersion``."""
    rec = current_stage()
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
                            f"{type(e).__name__}: {first_line(e)}") from None
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

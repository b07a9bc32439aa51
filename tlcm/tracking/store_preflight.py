"""Fail fast, naming the endpoint: before any work, check that records can be written (the tracking
server answers; when this process writes artifacts to S3 itself, the bucket accepts our credentials).
Errors name the endpoint and bucket, never the credentials."""
from __future__ import annotations

import os
from urllib.parse import urlsplit

from tlcm.tracking.mlflow_store import TrackingError, client, enabled, experiment_id, first_line, redact, tracking_uri


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
        raise TrackingError(f"MLflow store {redact(uri)} is not usable: {type(e).__name__}: {first_line(e)}") from None
    if exp.artifact_location.startswith("s3://"):
        check_s3(exp.artifact_location)

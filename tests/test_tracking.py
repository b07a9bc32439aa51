"""Records layer without servers: MLflow on a temporary SQLite store, the loss history, the
register stage and promotion gates, the Prefect cache key and retry rule, and the S3 preflight
against a real local S3 server (SeaweedFS)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from servers import S3_KEY, S3_SECRET, SeaweedS3, fake_outputs, free_port

from tlcm.tracking import mlflow_store as store
from tlcm.tracking import store_preflight, runs as tracking
from tlcm.core.params import load_params
from tlcm.core.paths import Paths


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    """Tracking on, into a fresh SQLite store; cwd = tmp (no dvc.lock, not the repo)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLCM_TRACKING", "auto")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tlcm-test")
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    yield store.client()


def test_plain_stage_calls_do_not_touch_mlflow(tmp_path, monkeypatch):
    """Library calls of run_stage (what the other tests do) import no MLflow and write no store."""
    code = ("import sys; from tasks.registry import run_stage; from tlcm.core.params import load_params; "
            "from tlcm.core.paths import Paths; from pathlib import Path; "
            f"run_stage('world', load_params({str(REPO / 'params.yaml')!r}, 'smoke'), Paths(Path('art'))); "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'")
    env = {k: v for k, v in os.environ.items() if k not in ("TLCM_TRACKING", "MLFLOW_TRACKING_URI")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "art" / "world").is_dir()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_pipeline_run_nests_stage_runs_with_params_losses_and_metrics(mlflow_store, tmp_path, smoke_params):
    from tlcm.core.checkpoints import Checkpointer
    from tlcm.core.training import run_loop

    paths = Paths(tmp_path / "art")
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)

    def step_fn(step):
        loss = (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"l2": loss.item(), "half": loss.item() / 2}

    with tracking.pipeline_run(smoke_params, paths, run_name="unit") as parent:
        with tracking.stage_run("autoencoder", smoke_params, paths) as rec:
            res = run_loop("autoencoder", 20, step_fn, {"w": opt}, Checkpointer(paths.checkpoints("autoencoder"), "fp"),
                           checkpoint_every=10, log_every=5, show_progress=False)
            rec.result = {"psnr_db": 12.5, "nested": {"x": 1}, "name": "not a number"}
    c = mlflow_store
    assert c.get_run(parent).info.status == "FINISHED"
    child = c.search_runs([store.experiment_id()], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_name for r in child] == ["autoencoder"]
    run = child[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["autoencoder.steps"] == str(smoke_params.autoencoder.steps)
    assert run.data.params["preset"] == "smoke"
    assert run.data.metrics["psnr_db"] == 12.5 and run.data.metrics["nested.x"] == 1
    assert run.data.metrics["wall_seconds"] > 0
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss/l2")]
    assert steps == [5, 10, 15, 20]
    losses = [m.value for m in c.get_metric_history(run.info.run_id, "loss/l2")]
    assert losses == sorted(losses, reverse=True)  # it trains
    hist = json.loads((paths.metrics / "autoencoder_history.json").read_text())
    assert [h["step"] for h in hist] == [5, 10, 15, 20] and list(hist[0]) == ["step", "l2", "half"]
    assert [h["step"] for h in res.history] == [5, 10, 15, 20]
    assert "metrics/autoencoder_history.json" in [f.path for f in c.list_artifacts(run.info.run_id, "metrics")]
    assert not any("AWS" in k or "SECRET" in k.upper() for k in run.data.params)


def test_failed_stage_marks_its_run_failed(mlflow_store, tmp_path, smoke_params):
    paths = Paths(tmp_path / "art")
    with pytest.raises(RuntimeError):
        with tracking.pipeline_run(smoke_params, paths) as parent:
            with tracking.stage_run("teacher", smoke_params, paths):
                raise RuntimeError("boom")
    c = mlflow_store
    assert c.get_run(parent).info.status == "FAILED"
    (child,) = c.search_runs([store.experiment_id()], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert child.info.status == "FAILED"


def test_register_versions_with_model_card_and_promotion_gates(mlflow_store, tmp_path, smoke_params):
    from tasks.register import PromotionRefused, promote
    from tasks.registry import run_stage

    paths = Paths(tmp_path / "art")
    fake_outputs(paths, alignment=0.25, frechet=3.0)
    rec = run_stage("register", smoke_params, paths)
    assert rec["registered"] and rec["version"] == 1
    assert json.loads((paths.metrics / "register.json").read_text())["version"] == 1
    c, name = mlflow_store, smoke_params.register.model_name
    mv = c.get_model_version_by_alias(name, "candidate")
    assert str(mv.version) == "1"
    card = mv.description
    for needle in ("teacher", "`train`", "| TLCM after dmgan | 4 | 0.25 | 3 |", "### evaluate", "git commit",
                   "dvc.lock", "teacher_steps"):
        assert needle in card, needle
    files = {f.path for f in c.list_artifacts(mv.run_id, "model")}
    assert {"model/README.md", "model/MLmodel", "model/artifacts", "model/code", "model/benchmark.json"} <= files
    lora = {f.path for f in c.list_artifacts(mv.run_id, "model/artifacts/lora")}
    assert lora == {"model/artifacts/lora/pytorch_lora_weights.safetensors", "model/artifacts/lora/tlcm_lora.json"}
    assert "mlflow.pyfunc.load_model" in card and mv.tags["tlcm.base"] == "bundle"

    # gates: alignment 0.25 < 0.5 (params.yaml) -> refused, with the numbers
    with pytest.raises(PromotionRefused, match=r"alignment 0.2500 < min_alignment 0.5"):
        promote(1, smoke_params)
    with pytest.raises(Exception):
        c.get_model_version_by_alias(name, "champion")
    forced = promote(1, smoke_params, force=True)
    assert forced.forced and str(c.get_model_version_by_alias(name, "champion").version) == "1"
    assert c.get_model_version(name, "1").tags["tlcm.promotion_forced"] == "true"

    # a second run registers version 2 (candidate moves); it passes stricter gates too
    strict = smoke_params.model_copy(update={"register": smoke_params.register.model_copy(update={
        "gates": smoke_params.register.gates.model_copy(update={"min_alignment": 0.1, "max_frechet": 5.0})})})
    assert run_stage("register", strict, paths)["version"] == 2
    assert str(c.get_model_version_by_alias(name, "candidate").version) == "2"
    ok = promote(2, strict)
    assert not ok.forced and str(c.get_model_version_by_alias(name, "champion").version) == "2"
    tight = strict.model_copy(update={"register": strict.register.model_copy(update={
        "gates": strict.register.gates.model_copy(update={"max_frechet": 1.0, "steps": 2})})})
    with pytest.raises(PromotionRefused, match=r"frechet 6.0000 > max_frechet 1.0 \('TLCM after dmgan' @ 2 steps\)"):
        promote(2, tight)
    with pytest.raises(store.TrackingError, match=f"no version 9 of registered model '{name}'"):
        promote(9, smoke_params)


def test_tracking_off_registers_nothing(tmp_path, monkeypatch, smoke_params):
    from tasks.registry import run_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLCM_TRACKING", "0")
    paths = Paths(tmp_path / "art")
    fake_outputs(paths)
    with tracking.pipeline_run(smoke_params, paths) as parent:
        rec = run_stage("register", smoke_params, paths)
    assert parent is None and rec == {"registered": False, "reason": "TLCM_TRACKING=0"}
    assert not (tmp_path / "mlflow.db").exists()


def test_embedded_default_store_is_sqlite_and_mlruns_in_cwd(tmp_path, monkeypatch, smoke_params):
    from tasks.registry import run_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TLCM_TRACKING", raising=False)
    paths = Paths(tmp_path / "art")
    fake_outputs(paths)
    assert run_stage("register", smoke_params, paths)["version"] == 1
    assert (tmp_path / "mlflow.db").is_file()
    assert list((tmp_path / "mlruns").rglob("model/README.md"))


@pytest.mark.math
def test_retry_condition_skips_permanent_errors():
    from prefect.states import Failed

    from flows.tlcm import is_transient
    from tlcm.core.params import ParamsError
    from tlcm.core.storage import ArtifactError
    from tlcm.core.training import NonFiniteLoss

    for e in (ParamsError("bad key"), ArtifactError("missing"), NonFiniteLoss("nan"), store.TrackingError("s3")):
        assert is_transient(None, None, Failed(data=e)) is False, e
    for e in (ConnectionResetError("reset"), TimeoutError("slow"), RuntimeError("CUDA error: launch failure")):
        assert is_transient(None, None, Failed(data=e)) is True, e


def test_cache_key_follows_inputs_and_outputs(tmp_path, monkeypatch):
    """Same identity + intact outputs -> same key (a cache hit); changed params or deleted outputs -> new key."""
    from flows import caching
    from tasks.registry import run_stage
    from tlcm.core.identity import stage_identity

    monkeypatch.setenv("TLCM_TRACKING", "0")
    params = load_params(REPO / "params.yaml", "smoke")
    paths = Paths(tmp_path / "art")

    def run(task_run_id, p=params):
        key = caching.key_for("world", p, paths, task_run_id)
        run_stage("world", p, paths)
        caching.record("world", paths, task_run_id)
        return key

    k1 = run("run-1")
    assert stage_identity("world", params, paths.root).hash[:32] in k1  # the key is the stage identity's
    assert caching.key_for("world", params, paths, "run-2") == k1  # unchanged: hit
    caching._keys.clear()
    other = params.model_copy(update={"world": params.world.model_copy(update={"n_train_prompts": 65})})
    k2 = run("run-3", other)
    assert k2 != k1
    assert caching.key_for("world", other, paths, "run-4") == k2
    (paths.world / "world.json").unlink()  # an output edited/deleted behind Prefect's back
    assert caching.key_for("world", other, paths, "run-5") not in (k1, k2)
    # the teacher's key depends on the world's content (an upstream artifact)
    t1 = stage_identity("teacher", other, paths.root).hash
    run("run-6")
    assert stage_identity("teacher", params, paths.root).hash != t1


# ---- S3 preflight against a real S3 server ---------------------------------------------------

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("s3"), buckets=("mlflow", "dvc")) as srv:
        yield srv


def test_s3_preflight_accepts_good_credentials(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
    store_preflight.check_s3("s3://mlflow/some/prefix")


def test_s3_preflight_names_endpoint_on_wrong_credentials(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
    with pytest.raises(store.TrackingError) as e:
        store_preflight.check_s3("s3://mlflow")
    msg = str(e.value)
    assert s3.endpoint in msg and "rejected the S3 credentials" in msg and "not-the-secret" not in msg


def test_s3_preflight_names_unreachable_endpoint_and_missing_bucket(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", dead)
    with pytest.raises(store.TrackingError, match=f"S3 endpoint {dead} is not reachable"):
        store_preflight.check_s3("s3://mlflow")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
    with pytest.raises(store.TrackingError, match="bucket 'nope' does not exist"):
        store_preflight.check_s3("s3://nope")


@pytest.mark.math
def test_preflight_names_unreachable_tracking_server(monkeypatch, tmp_path, smoke_params):
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("TLCM_TRACKING", "auto")
    with pytest.raises(store.TrackingError, match=f"MLflow tracking server {dead} is not reachable"):
        with tracking.pipeline_run(smoke_params, Paths(tmp_path)):
            pass


@pytest.mark.math
def test_redact_hides_credentials_in_uris():
    assert store.redact("http://user:pw@host:5000/x") == "http://host:5000/x"
    assert store.redact("sqlite:///a/b.db") == "sqlite:///a/b.db"


@pytest.mark.math
def test_log_step_outside_a_stage_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracking.log_step("teacher", 1, {"loss": 1.0})  # no stage context: nothing recorded, no error
    assert tracking.current_stage() is None and not list(tmp_path.iterdir())


@pytest.mark.math
def test_flow_has_one_retrying_task_per_stage_calling_run_stage(tmp_path, monkeypatch):
    """The flow's tasks mirror STAGES; each retries (not on permanent errors) and all but
    register are cached; a task body is run_stage (run here through .fn, no server)."""
    from prefect.cache_policies import NO_CACHE
    from prefect.logging import disable_run_logger

    from flows import caching
    from flows.tlcm import STAGE_TASKS, is_transient, tlcm
    from tlcm.core.stages import NAMES as STAGES

    assert tlcm.name == "tlcm" and list(STAGE_TASKS) == list(STAGES) and STAGES[-1] == "register"
    for name, t in STAGE_TASKS.items():
        assert t.name == name and t.retries >= 1 and t.retry_condition_fn is is_transient
        if name == "register":
            assert t.cache_policy is NO_CACHE
        else:
            assert t.cache_key_fn is caching.stage_cache_key
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TLCM_TRACKING", "0")
    with disable_run_logger():
        out = STAGE_TASKS["world"].fn("world", "smoke", str(tmp_path / "art"), str(REPO / "params.yaml"))
    assert out["n_train"] == load_params(REPO / "params.yaml", "smoke").world.n_train_prompts
    assert (tmp_path / "art" / "world" / "world.json").is_file()


def test_artifacts_straight_to_s3_and_preflight_on_wrong_keys(s3, mlflow_store, tmp_path, monkeypatch, smoke_params):
    """An experiment whose artifact root is s3://: the client uploads with boto3 (endpoint and
    keys from the environment); with a wrong key the pipeline stops before any work, naming
    the endpoint."""
    from tasks.registry import run_stage

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tlcm-s3")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    mlflow_store.create_experiment("tlcm-s3", artifact_location="s3://mlflow/direct")
    paths = Paths(tmp_path / "art")
    fake_outputs(paths)
    with tracking.pipeline_run(smoke_params, paths):
        rec = run_stage("register", smoke_params, paths)
    assert rec["source"].startswith("s3://mlflow/direct/")
    assert any(k.startswith("direct/") and k.endswith("model/README.md") for k in s3.keys("mlflow"))

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(store.TrackingError, match=f"S3 endpoint {s3.endpoint} rejected the S3 credentials"):
        with tracking.pipeline_run(smoke_params, paths):
            raise AssertionError("preflight should have stopped the run")

"""How a registered version refers to its base model: the shapes-world teacher travels inside it; a hub
id is recorded with the revision found in the local Hugging Face cache (no network); another local
folder is referenced by path. (Loading and serving a version: tests/test_integration.py.)"""
import json

import pytest
import yaml
from servers import fake_outputs

from tlcm.loaders.hub import hub_revision
from tlcm.tracking.packaging import base_reference, lora_folder, save_pyfunc
from tlcm.core.params import Source
from tlcm.core.paths import Paths

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.math
def test_hub_id_is_recorded_with_the_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at call time
    snap = tmp_path / "hub" / "models--acme--sdxl-like" / "snapshots" / REV
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    (tmp_path / "hub" / "models--acme--sdxl-like" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--sdxl-like" / "refs" / "main").write_text(REV)
    assert hub_revision("acme/sdxl-like") == REV
    assert base_reference("acme/sdxl-like") == {"kind": "hub", "base_model": "acme/sdxl-like", "base_revision": REV}
    assert base_reference("acme/not-cached")["base_revision"] is None


def test_version_of_a_local_base_folder_refers_to_it_by_path(tmp_path, smoke_params):
    paths = Paths(tmp_path / "art")
    fake_outputs(paths)
    params = smoke_params.model_copy(update={"teacher": smoke_params.teacher.model_copy(
        update={"source": Source(location=str(paths.teacher)), "dtype": "bfloat16"})})
    out = tmp_path / "model"
    config = save_pyfunc(params, paths, paths.lora("dmgan"), out, steps=3)
    assert config["kind"] == "path" and config["base_model"] == str(paths.teacher.resolve())
    assert config["torch_dtype"] == "bfloat16"  # the served model loads its frozen weights in teacher.dtype
    assert config["defaults"] == {"num_inference_steps": 3, "guidance_scale": 1.0, "seed": 0, "height": 32, "width": 32}
    assert not (out / "artifacts" / "base").exists() and lora_folder(out) == out / "artifacts" / "lora"
    sched = json.loads((out / "artifacts" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "TLCMScheduler" and sched["renoise"] == "fresh"
    mlmodel = yaml.safe_load((out / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["config"]["base_model"] == str(paths.teacher.resolve())
    assert (out / "code" / "models" / "scheduler.py").is_file() and (out / "serving.py").is_file()
    assert not list(out.rglob("__pycache__"))

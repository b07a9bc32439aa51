"""`tlcm check-gpu` on a machine without CUDA (one line, exit 0), and its parts on the CPU at the smoke teacher's size
with the sdxl preset's precision settings (bf16 frozen weights, gradient checkpointing, the teacher buffer).
Whether it passes on a GPU is only known from a GPU run (README: "GPU acceptance check")."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA message is only printed without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    r = run_cli("check-gpu", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "no CUDA device" in r.stdout
    assert "Traceback" not in r.stderr and not (tmp_path / "x.json").exists()
    # the module form, for an image with only torch, diffusers, peft, transformers, accelerate and safetensors
    r = subprocess.run([sys.executable, "-m", "tools.check_gpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no CUDA device" in r.stdout and "Traceback" not in r.stderr


def test_the_check_imports_nothing_beyond_the_gpu_image(tmp_path):
    """Parts (b), (c) and the dtype check import no pydantic, torchmetrics, mlflow, prefect or dvc, and read the
    presets without pydantic as the validated params read them."""
    code = ("import sys\n"
            "for m in ('pydantic', 'torchmetrics', 'mlflow', 'prefect', 'dvc', 'boto3'): sys.modules[m] = None\n"
            "import tools.check_gpu as C, tools.rig, tasks.distill, tasks.mps, tasks.dmgan, tools.plan\n"
            "p = C.load_preset('params.yaml', 'sdxl')\n"
            "print(p.mlcd.teacher_path, p.mlcd.batch_size, p.teacher.dtype, p.section('dmgan').batch_size)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from tlcm.core.params import load_params

    p = load_params(REPO / "params.yaml", "sdxl")
    assert r.stdout.split() == [p.mlcd.teacher_path, str(p.mlcd.batch_size), p.teacher.dtype, str(p.dmgan.batch_size)]


def test_smoke_part_runs_the_declared_stages(monkeypatch):
    """(a) runs stages by their declarations, tracking off (here only `world`, on the CPU: the whole pipeline is the
    GPU run's); without the pipeline's dependencies it says which are missing instead of failing."""
    from tools import check_gpu as C

    monkeypatch.setenv("TLCM_TRACKING", "auto")
    r = C.smoke_pipeline(REPO / "params.yaml", ("world",))
    assert r["ok"] and list(r["stages"]) == ["world"] and r["benchmark_rows"] is None
    assert (Path(r["artifacts"]) / "world" / "world.json").is_file() and os.environ["TLCM_TRACKING"] == "0"
    monkeypatch.setattr(C, "PIPELINE_PACKAGES", ("no_such_package_xyz",))
    r = C.smoke_pipeline(REPO / "params.yaml")
    assert not r["ok"] and "no_such_package_xyz not installed" in r["skipped"]


def test_parts_on_the_cpu_at_smoke_size(smoke_params, tmp_path):
    """(b) every checked stage's real step at the sdxl preset's precision settings, with `tlcm plan`'s memory
    prediction for the same settings; (c) sampling; and the bf16-vs-float32 step, on the smoke teacher's sizes."""
    from tools import check_gpu_parts as C
    from tools.plan.networks import mini_costs
    from tools.rig import tiny_networks

    params = smoke_params.model_copy(update={
        "teacher": smoke_params.teacher.model_copy(update={"dtype": "bfloat16", "gradient_checkpointing": True}),
        "mlcd": smoke_params.mlcd.model_copy(update={"teacher_path": "buffer", "batch_size": 4, "skip": 100,
                                                     "buffer_trajectories": 8, "buffer_refresh": 50})})
    for st in ("ilcd", "mps", "dmgan"):
        params = params.model_copy(update={st: params.section(st).model_copy(update={"batch_size": 4})})
    cpu = torch.device("cpu")
    res, nets = C.sdxl_part(params, smoke_params, lambda: tiny_networks(smoke_params, dtype=torch.bfloat16), 2, 2,
                            cpu, mini_costs(smoke_params))
    assert set(res["stages"]) == set(C.CHECK_STAGES)
    for st, r in res["stages"].items():
        assert r["batch_per_gpu"] == 2 and r["seconds_per_iteration"] > 0 and r["finite"], (st, r)
        assert r["plan_gib"] > 0 and r["plan_gib_without_checkpointing"] >= r["plan_gib"] and r["peak_gib"] is None
    assert "buffer_chunk_seconds" in res["stages"]["mlcd"]
    samp = C.sampling(nets, params, 2, cpu)
    assert [r["steps"] for r in samp["rows"]] == [25, 4] and samp["resolution"] == 32
    assert samp["rows"][0]["unet_evals_per_image"] == 50 and samp["rows"][1]["image_shape"] == [32, 32, 3]
    agree = C.dtype_agreement(nets, params, cpu)
    assert agree["dtype"] == "bfloat16" and 0 < agree["eps_rel_rms"] < 0.05 and 0 < agree["next_state_rel_rms"] < 0.01
    assert agree["agree"] and agree["eps_cfg_rel_rms"] > agree["eps_rel_rms"]  # CFG amplifies (random weights)
    json.dumps({"sdxl": res, "sampling": samp, "bf16_vs_float32": agree})  # the report is JSON

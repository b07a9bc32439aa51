"""`tlcm check-gpu` (also ``python -m tools.check_gpu``): the GPU acceptance check, one command.

On a machine with a CUDA GPU it

(a) runs the `smoke` pipeline end to end on the GPU (every stage, temporary artifacts, tracking off);
(b) builds an SDXL-architecture pipeline from SDXL's own configs (:mod:`tools.plan.configs`; random weights, nothing
    downloaded) and runs a few iterations of `mlcd`, `ilcd`, `mps` and `dmgan` with the `sdxl` preset's settings
    (1024², frozen weights in ``teacher.dtype``, gradient checkpointing, the teacher buffer) at the batch each GPU
    of a ``--gpus``-GPU launch trains (the preset's global batch / ``--gpus``), timing each and reading the peak
    GPU memory next to `tlcm plan`'s prediction for the same settings;
(c) samples the benchmark's rows at 1024² for a handful of prompts (teacher DDIM + CFG at 25 steps, the TLCM
    scheduler at 4), timing seconds per image;

and checks that bf16 and float32 agree on one teacher CFG-DDIM step (the same weights in both). It writes JSON
(format in the README) and prints a one-line summary per part. It needs only torch, diffusers, peft, transformers,
accelerate and safetensors for (b), (c) and the bf16 check (part (a) also needs the project's other dependencies;
without them it is reported as skipped). Without a CUDA device it prints one line and exits 0.

This module is the command and part (a); (b), (c), the dtype check and the presets read without pydantic are in
:mod:`tools.check_gpu_parts`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tools.check_gpu_parts import GiB, dtype_agreement, load_preset, sampling, sdxl_part

BUDGET_S = 8 * 60


def no_cuda_line() -> str | None:
    """The one line printed instead of the check when there is no CUDA device (None when there is one)."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
    return f"tlcm check-gpu: no CUDA device (torch {torch.__version__}, {build}); nothing to check on this machine"


PIPELINE_PACKAGES = ("pydantic", "yaml", "torchmetrics", "tqdm")  # what the stages import beyond the GPU image


def smoke_pipeline(params_file: str | Path, stages: tuple[str, ...] | None = None) -> dict:
    """(a) Every stage of the `smoke` preset (or ``stages``, in pipeline order) in this process, on its GPU, tracking
    off, in a temporary folder. Without the pipeline's own dependencies it is reported as skipped (naming them)."""
    import importlib.util

    missing = [m for m in PIPELINE_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        return {"ok": False, "skipped": f"needs the project's dependencies (pip install -e .): {', '.join(missing)} "
                                        "not installed"}
    os.environ["TLCM_TRACKING"] = "0"
    from tasks.registry import run_stage
    from tlcm.core.params import load_params
    from tlcm.core.paths import Paths
    from tlcm.core.stages import NAMES

    params = load_params(params_file, "smoke")
    paths = Paths(Path(tempfile.mkdtemp(prefix="tlcm-check-smoke-")))
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    for name in stages or NAMES:
        t = time.perf_counter()
        run_stage(name, params, paths)
        times[name] = round(time.perf_counter() - t, 2)
    bench = paths.benchmark / "benchmark.json"
    return {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "stages": times,
            "benchmark_rows": len(json.loads(bench.read_text())["rows"]) if bench.is_file() else None,
            "artifacts": str(paths.root)}


def run_check(params_file: str | Path, out: Path, gpus: int = 4, iterations: int = 3, n_prompts: int = 4,
              parts: tuple[str, ...] = ("smoke", "sdxl", "sampling", "dtype")) -> dict:
    """Every part on the CUDA device; the JSON written to ``out`` and returned."""
    from tools.plan.networks import sdxl_costs
    from tools.rig import sdxl_networks

    t0 = time.monotonic()
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    report: dict[str, Any] = {"device": {"name": props.name, "capability": list(torch.cuda.get_device_capability()),
                                         "memory_gib": round(props.total_memory / GiB, 1), "torch": torch.__version__,
                                         "cuda": torch.version.cuda}}
    params = load_preset(params_file, "sdxl")
    tiny = load_preset(params_file, "smoke")
    deadline = t0 + BUDGET_S
    if "smoke" in parts:
        report["smoke"] = smoke_pipeline(params_file)
        _log("smoke", report["smoke"])
    nets = None
    if "sdxl" in parts:
        dtype = getattr(torch, params.teacher.dtype)
        costs = sdxl_costs(params.mlcd.rank, dtype=dtype)
        report["sdxl"], nets = sdxl_part(params, tiny, lambda: sdxl_networks(device, dtype), gpus, iterations, device,
                                         costs, deadline)
        _log("sdxl", report["sdxl"])
    if nets is None and ({"sampling", "dtype"} & set(parts)):
        nets = sdxl_networks(device, getattr(torch, params.teacher.dtype))
    if "sampling" in parts:
        report["sampling"] = sampling(nets, params, n_prompts, device) if time.monotonic() < deadline else \
            {"skipped": "time budget spent"}
        _log("sampling", report["sampling"])
    if "dtype" in parts:
        report["bf16_vs_float32"] = dtype_agreement(nets, params, device)
        _log("bf16_vs_float32", report["bf16_vs_float32"])
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["within_budget"] = report["seconds"] <= BUDGET_S
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    return report


def _log(part: str, res: dict) -> None:
    print(f"tlcm check-gpu: {part}: {json.dumps(res, default=str)[:400]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tlcm check-gpu", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", default="params.yaml", help="params file the presets overlay (default: params.yaml)")
    ap.add_argument("--out", default="check_gpu.json", help="where the JSON goes (default: check_gpu.json)")
    ap.add_argument("--gpus", type=int, default=4, help="GPUs of the launch whose per-GPU batch to run (default 4, "
                    "the full-a100 deployment's)")
    ap.add_argument("--iterations", type=int, default=3, help="training iterations per stage (default 3)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts sampled at 1024² (default 4)")
    ap.add_argument("--parts", default="smoke,sdxl,sampling,dtype", help="comma-separated subset of "
                    "smoke,sdxl,sampling,dtype")


def run(args: argparse.Namespace) -> int:
    line = no_cuda_line()
    if line is not None:
        print(line)
        return 0
    report = run_check(args.params, Path(args.out), args.gpus, args.iterations, args.prompts,
                       tuple(p for p in args.parts.split(",") if p))
    print(f"tlcm check-gpu: done in {report['seconds']} s (budget {BUDGET_S} s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

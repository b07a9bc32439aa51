"""Alignment of a teacher pipeline folder (25-step DDIM + CFG, the benchmark's reference setting) on the first N
held-out prompts, judged by the artifacts folder's evaluator — a cheap check of a teacher (or a snapshot of one
still training, experiments/teacher_snapshot.py) without the whole benchmark.

    python experiments/teacher_alignment.py --teacher artifacts/teacher --prompts 512
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tasks.evaluator import accuracy, load_evaluator
from tasks.generate import teacher_ddim
from tlcm.core.params import load_params
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import load_teacher
from tlcm.loaders.world_io import read_prompts
from tlcm.report.benchmark_report import standard_error
from tlcm.shapes import render as R


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a pipeline folder (model_index.json)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--artifacts", default="artifacts", help="holds world/ (the prompts) and evaluator/")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=None, help="default: evaluate.guidance_scale")
    a = ap.parse_args()
    params, paths = load_params(a.params), Paths(Path(a.artifacts))
    w = params.evaluate.guidance_scale if a.guidance is None else a.guidance
    specs = read_prompts(paths, "eval")[: a.prompts]
    t0 = time.perf_counter()
    s = teacher_ddim(load_teacher(a.teacher), [x.caption() for x in specs], a.steps, w, 0, params.evaluate.batch_size)
    acc = accuracy(load_evaluator(params, paths), R.to_unit_tensor(s.images), specs)
    print(json.dumps({"teacher": a.teacher, "prompts": len(specs), "steps": a.steps, "guidance": w,
                      "alignment": acc["all"], "alignment_se": standard_error(acc["all"], len(specs)),
                      "per_attribute": acc, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

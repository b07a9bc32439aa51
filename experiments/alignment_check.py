"""Cheap alignment checks of the world's parts, judged by the artifacts folder's evaluator on the first N held-out
prompts — minutes instead of the whole benchmark:

    python experiments/alignment_check.py teacher artifacts/teacher --prompts 512          # 25-step DDIM + CFG
    python experiments/alignment_check.py autoencoder artifacts/autoencoder --prompts 512  # renders vs round trips

``teacher``: a pipeline folder sampled in the benchmark's reference setting (also a snapshot of a teacher still
training, experiments/teacher_snapshot.py). ``autoencoder``: the most a teacher of that autoencoder can reach, the
evaluator on renders and on their round trips (encode → mean latent → decode).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tasks.evaluator import accuracy, load_evaluator
from tlcm.core.params import load_params
from tlcm.core.paths import Paths
from tlcm.loaders.world_io import read_prompts
from tlcm.report.benchmark_report import standard_error
from tlcm.shapes import render as R


def teacher_alignment(params, specs, folder: str, steps: int, guidance: float | None) -> dict:
    from tasks.generate import teacher_ddim
    from tlcm.loaders.teacher_io import load_teacher

    w = params.evaluate.guidance_scale if guidance is None else guidance
    s = teacher_ddim(load_teacher(folder), [x.caption() for x in specs], steps, w, 0, params.evaluate.batch_size)
    return {"steps": steps, "guidance": w, "images": R.to_unit_tensor(s.images)}


def autoencoder_round_trips(params, specs, folder: str, seed: int) -> dict:
    from diffusers import AutoencoderKL

    x = R.to_unit_tensor(R.render_batch(specs, seed, params.world.image_size))
    vae = AutoencoderKL.from_pretrained(folder).eval()
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 64] * 2 - 1).latent_dist.mean).sample for i in range(0, len(x), 64)])
    return {"renders": x, "images": ((rec + 1) / 2).clamp(0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("teacher", "autoencoder"))
    ap.add_argument("folder", help="a pipeline folder (teacher) or an AutoencoderKL folder (autoencoder)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--artifacts", default="artifacts", help="holds world/ (the prompts) and evaluator/")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25, help="teacher: DDIM steps")
    ap.add_argument("--guidance", type=float, default=None, help="teacher: CFG scale (default evaluate.guidance_scale)")
    ap.add_argument("--seed", type=int, default=11, help="autoencoder: render seed")
    a = ap.parse_args()
    params, paths = load_params(a.params), Paths(Path(a.artifacts))
    net, specs = load_evaluator(params, paths), read_prompts(paths, "eval")[: a.prompts]
    t0 = time.perf_counter()
    out = (teacher_alignment(params, specs, a.folder, a.steps, a.guidance) if a.what == "teacher"
           else autoencoder_round_trips(params, specs, a.folder, a.seed))
    acc = accuracy(net, out.pop("images"), specs)
    record = {a.what: a.folder, "prompts": len(specs), "alignment": acc["all"],
              "alignment_se": standard_error(acc["all"], len(specs)), "per_attribute": acc}
    if "renders" in out:  # the judge on the real renders, the ceiling of the round trips
        record["renders_per_attribute"] = accuracy(net, out.pop("renders"), specs)
    record |= {**out, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(record))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

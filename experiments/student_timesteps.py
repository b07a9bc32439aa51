"""A student LoRA's alignment and Fréchet distance with other n-step timestep tables than the official one
(rows of linspace(999, 0, 9) indices). Chosen on held-out prompts, so an observation, not a tuning."""
import argparse
from pathlib import Path

import models.scheduler as S
from tasks.benchmark_scores import frechet_distance
from tasks.evaluator import accuracy, load_evaluator
from tasks.generate import load_student_pipe, student_samples
from tlcm.shapes import render as R
from tlcm.core.params import load_params
from tlcm.core.paths import Paths
from tlcm.loaders.world_io import read_prompts

TABLES = [(2, (0, 4)), (3, (0, 4, 7)), (3, (0, 3, 6)), (3, (0, 2, 5)), (3, (0, 3, 5)), (3, (0, 2, 4)),
          (4, (0, 2, 4, 7)), (4, (0, 2, 4, 6)), (8, (0, 1, 2, 3, 4, 5, 6, 7))]
ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--stage", default="dmgan")
ap.add_argument("--lora", default=None, help="LoRA folder (default: artifacts/lora_<stage>)")
a = ap.parse_args()
params, paths = load_params("params.yaml"), Paths(Path("artifacts"))
net = load_evaluator(params, paths)
specs = read_prompts(paths, "eval")[: params.evaluate.n_prompts]
seed = params.evaluate.seed
real = R.render_batch(specs, seed + 11, params.world.image_size)
pipe = load_student_pipe(str(paths.teacher), Path(a.lora) if a.lora else paths.lora(a.stage), "tlcm")
official = dict(S._OFFICIAL_TABLE)
for n, idx in TABLES:
    S._OFFICIAL_TABLE[n] = idx
    s = student_samples(pipe, [x.caption() for x in specs], n, seed, 64, pipe.scheduler)
    acc = accuracy(net, R.to_unit_tensor(s.images), specs)["all"]
    tag = "official" if official[n] == idx else ""
    print(f"{n} steps {S.tlcm_timesteps(n)} {tag}: alignment {acc:.3f}, Fréchet {frechet_distance(net, real, s.images):.1f}")
    S._OFFICIAL_TABLE[n] = official[n]

"""Continue the trained mini teacher for more steps on fresh batches (the teacher stage's own loop,
started from artifacts/teacher instead of random weights), into a scratch artifacts folder."""
import argparse
from pathlib import Path

from diffusers import StableDiffusionXLPipeline

import tasks.teacher as T
from tlcm.core.params import load_params
from tlcm.core.paths import Paths

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--seed", type=int, default=12, help="data seed (the teacher was trained with teacher.seed)")
ap.add_argument("--parse-weight", type=float, default=0.0, help="teacher.parse_weight (caption-parsing loss)")
ap.add_argument("--out", required=True, help="scratch artifacts folder (gets world/autoencoder links and teacher/)")
a = ap.parse_args()
src, out = Path("artifacts").resolve(), Path(a.out)
out.mkdir(parents=True, exist_ok=True)
for d in ("world", "autoencoder"):
    if not (out / d).exists():
        (out / d).symlink_to(src / d)
params = load_params("params.yaml")
params = params.model_copy(update={"teacher": params.teacher.model_copy(
    update={"steps": a.steps, "lr": a.lr, "warmup_steps": 20, "seed": a.seed, "parse_weight": a.parse_weight})})
T.build_pipeline = lambda params, paths: StableDiffusionXLPipeline.from_pretrained(src / "teacher")
print(T.run(params, Paths(out)))

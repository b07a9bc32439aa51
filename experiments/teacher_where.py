"""25-step CFG alignment of a teacher, per guidance scale, and how many failures are mirror swaps."""
import argparse
from pathlib import Path

import torch

from tasks.evaluator import aligned, load_evaluator
from tasks.generate import teacher_ddim
from tlcm.shapes import render as R
from tlcm.core.params import load_params
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import load_teacher
from tlcm.loaders.world_io import read_prompts

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--teacher", default=None, help="teacher folder (default: artifacts/teacher)")
ap.add_argument("--guidance", default="5", help="comma-separated CFG scales")
ap.add_argument("--n", type=int, default=512)
a = ap.parse_args()
params, paths = load_params("params.yaml"), Paths(Path("artifacts"))
net = load_evaluator(params, paths)
specs = read_prompts(paths, "eval")[: a.n]
pipe = load_teacher(a.teacher or str(paths.teacher))
two = torch.tensor([len(s.objects) == 2 for s in specs])
for w in (float(x) for x in a.guidance.split(",")):
    x = R.to_unit_tensor(teacher_ddim(pipe, [s.caption() for s in specs], 25, w, params.evaluate.seed, 64).images)
    ok, mirrored = aligned(net, x, specs), aligned(net, x, [s.mirrored() for s in specs])
    print(f"w={w}: alignment {ok.float().mean():.3f}")
    for name, m in (("one object", ~two), ("two objects", two)):
        fails = ~ok[m]
        print(f"  {name}: n={int(m.sum())} aligned={ok[m].float().mean():.3f} failures={int(fails.sum())} "
              f"mirror-swapped={int((fails & mirrored[m]).sum())}")

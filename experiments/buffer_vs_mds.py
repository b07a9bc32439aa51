"""MLCD with the teacher-trajectory buffer vs Alg. 1's path (issue #14), in one benchmark run.

Trains `mlcd` three times from the same inputs, each in its own artifacts folder next to ``--out`` (symlinks to the
inputs in ``--artifacts``): (1) Alg. 1's path (`teacher_path: mds`) for `mlcd.steps`; (2) the buffer for the same
steps; (3) the buffer for the wall-clock minutes that (1) took (`max_minutes`, steps raised so the clock stops it).
Then samples all three LoRAs at 2/3/4 steps on the benchmark's held-out prompts, scored as the `evaluate` stage
scores (alignment with its standard error, Fréchet distance), and writes ``<out>/buffer_vs_mds.{json,md}`` with each
run's teacher UNet evaluations per pair (counted) and mlcd wall time.
"""
import argparse
import json
import time
from pathlib import Path

import yaml

from tasks.benchmark_sampling import Row, load_student
from tasks.benchmark_scores import frechet_distance, score
from tasks.evaluator import load_evaluator, require
from tasks.generate import student_samples
from tasks.registry import run_stage
from tasks.world import read_prompts
from tlcm.shapes import render as R
from tlcm.core.params import load_params
from tlcm.core.paths import Paths
from tlcm.loaders.teacher_io import frozen_dtype, resolve_teacher

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--params", default="params.yaml")
ap.add_argument("--preset", default=None)
ap.add_argument("--artifacts", default="artifacts", help="trained inputs: world, teacher, evaluator, latent_lpips")
ap.add_argument("--out", default="experiments/buffer_vs_mds", help="folder for the three runs and the results")
ap.add_argument("--steps", default="2,3,4", help="student step counts to benchmark")
a = ap.parse_args()

base, src, out = load_params(a.params, a.preset), Paths(Path(a.artifacts)), Path(a.out)
require(src)
out.mkdir(parents=True, exist_ok=True)


def variant(name: str, **update) -> tuple[Paths, dict]:
    """One mlcd run in ``out/name`` on the inputs of ``--artifacts``; its metrics."""
    root = out / name
    root.mkdir(exist_ok=True)
    for d in src.root.iterdir():
        if d.name not in ("lora_mlcd", "checkpoints", "metrics", "benchmark") and not (root / d.name).exists():
            (root / d.name).symlink_to(d.resolve())
    params = base.model_copy(update={"mlcd": base.mlcd.model_copy(update={"eval_every": 0, **update})})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    paths = Paths(root)
    t0 = time.monotonic()
    run_stage("mlcd", params, paths)
    m = json.loads((paths.metrics / "mlcd.json").read_text())
    return paths, {**{k: m.get(k) for k in ("steps", "train_seconds", "teacher_path", "teacher_unet_evals_per_sample",
                                            "buffer")}, "stage_seconds": time.monotonic() - t0}


runs = {}
runs["mds"] = variant("mds", teacher_path="mds")
runs["buffer, same steps"] = variant("buffer_steps", teacher_path="buffer")
minutes = runs["mds"][1]["train_seconds"] / 60
runs["buffer, same wall clock"] = variant("buffer_clock", teacher_path="buffer", steps=100 * base.mlcd.steps,
                                          max_minutes=minutes)

p = base.evaluate
net = load_evaluator(base, src)
specs = read_prompts(src, "eval")[: p.n_prompts]
comp = read_prompts(src, "compositional")
prompts, comp_prompts = [s.caption() for s in specs], [s.caption() for s in comp]
real = R.render_batch(specs, p.seed + 11, base.world.image_size)
source = resolve_teacher(base.teacher.source, src.teacher)
table = [{"method": "real renders (reference)", "steps": 0, "frechet": frechet_distance(net, real, R.render_batch(
    specs, p.seed + 12, base.world.image_size))}]
for label, (paths, m) in runs.items():
    student = load_student(source, paths.lora("mlcd"), "mlcd", frozen_dtype(base.teacher))
    for n in (int(x) for x in a.steps.split(",")):
        row = Row(f"mlcd ({label})", n, 1.0, student_samples(student, prompts, n, p.seed, p.batch_size, student.scheduler),
                  student_samples(student, comp_prompts, n, p.seed, p.batch_size, student.scheduler))
        r = score(net, row, specs, real, comp)  # alignment with its standard error, Fréchet, as `evaluate` scores
        table.append({**r, **{f"mlcd_{k}": v for k, v in m.items()}})
(out / "buffer_vs_mds.json").write_text(json.dumps({"params_mlcd": base.mlcd.model_dump(mode="json"), "rows": table},
                                                   indent=2, default=str))
lines = ["| run | steps | alignment ± SE | held-out combos | Fréchet | mlcd steps | mlcd train s | teacher UNet evals / pair |",
         "|---|---|---|---|---|---|---|---|"]
for r in table[1:]:
    lines.append(f"| {r['method']} | {r['steps']} | {r['alignment']:.3f} ± {r['alignment_se']:.3f} | "
                 f"{r.get('alignment_compositional', float('nan')):.3f} | {r['frechet']:.1f} | {r['mlcd_steps']} | "
                 f"{r['mlcd_train_seconds']:.0f} | {r['mlcd_teacher_unet_evals_per_sample']:.2f} |")
text = f"real renders Fréchet (two render sets): {table[0]['frechet']:.1f}\n\n" + "\n".join(lines) + "\n"
(out / "buffer_vs_mds.md").write_text(text)
print(text)

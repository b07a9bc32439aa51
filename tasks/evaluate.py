"""Stage `evaluate`: the benchmark table (JSON, markdown, sample grid) on held-out prompts.

Every row is judged by the independent evaluator: alignment accuracy (every
prompted attribute recognised) with per-attribute accuracies, and the
Fréchet distance of evaluator features against real renders of the same
prompts.

Rows: the reference (the teacher, DDIM + CFG at ``reference_steps``); the training-free
baselines a user would try before distilling (the untrained teacher with the TLCM re-noising
sampler, DPM-Solver++ (2M), Euler ancestral and DDIM, each at every CFG scale of
``baseline_guidance``: the whole sweep runs on ``selection_prompts`` held-out prompts whose
captions the benchmark never uses, and each sampler's best CFG scale by alignment and by Fréchet
distance is carried to the benchmark prompts); and every student LoRA (LCM baseline, TLCM after
each stage). The summary says what the shipped LoRA adds over the best baseline per step count. ``mirror_swapped`` is the fraction of images that fail only because left/right or
top/bottom is exchanged (right objects, wrong places). Speed is end to end (text encoding, sampling, VAE decoding) at the
stage's batch size, in one process, so rows are comparable as ratios.
"""
from __future__ import annotations

import json
import logging
import platform

import numpy as np
import torch

from tasks.applications import benchmark_rows
from tasks.benchmark_sampling import Row, sample_rows, shipped_label, student_rows
from tasks.benchmark_scores import frechet_distance, reward_scores, score, seed_spread
from tasks.evaluator import accuracy, load_evaluator, require
from tlcm.shapes import render as R
from tlcm.report.benchmark_report import markdown, summary_markdown
from tlcm.report.grids import save_grid
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.stages import LORA_STAGES, upstream
from tlcm.core.storage import atomic_dir, atomic_write_json
from tlcm.loaders.world_io import read_prompts

log = logging.getLogger("tlcm")


# the distillation stages whose training a row's LoRA has been through (for "train CPU-min"), from the declarations
LINEAGE = {st: tuple(s for s in upstream(st) if s in LORA_STAGES) for st in LORA_STAGES}


def _add_speedups(table: list[dict], ref: dict) -> None:
    """Each row's seconds per image as a speed-up over the reference row ``ref`` (the teacher, DDIM + CFG)."""
    for r in table:
        if r.get("sec_per_image"):
            r["speedup_vs_teacher"] = ref["sec_per_image"] / r["sec_per_image"]


def _training_minutes(paths: Paths, stages: list[str]) -> dict[str, tuple[str, float]]:
    """(``"cpu"`` or ``"gpu"``, minutes) per stage from its metrics: CPU-minutes = wall minutes × torch threads ×
    processes of the TRAINING run; GPU-minutes = wall minutes × processes (one GPU each). Stages whose metrics do
    not record where they ran (written before this was recorded) are left out."""
    out = {}
    for st in stages:
        f = paths.metrics / f"{st}.json"
        if f.is_file():
            m = json.loads(f.read_text())
            sec, dev = m.get("train_seconds"), m.get("device")
            if sec is None or dev is None:
                continue
            n = m.get("world_size", 1)
            out[st] = ("cpu", sec / 60 * n * m.get("torch_threads", 1)) if dev == "cpu" else ("gpu", sec / 60 * n)
    return out


def _add_training(paths: Paths, p, table: list[dict]) -> None:
    minutes = _training_minutes(paths, sorted({x for v in LINEAGE.values() for x in v}))
    for r in table:
        for st, label, _ in student_rows(p):
            if r["method"] == label:
                for kind in ("cpu", "gpu"):
                    spent = [m for k, m in (minutes.get(x, ("", 0.0)) for x in LINEAGE.get(st, (st,))) if k == kind]
                    if spent:
                        r[f"train_{kind}_minutes"] = sum(spent)


def _write(params: Params, paths: Paths, table: list[dict], meta: dict, header: str, grid_rows, prompts: list[str],
           sweep: list[dict] | None = None) -> dict:
    shipped = shipped_label(params.evaluate)
    with atomic_dir(paths.benchmark) as out:
        (out / "benchmark.json").write_text(json.dumps({"meta": meta, "rows": table, "baseline_sweep": sweep or []},
                                                       indent=2))
        (out / "benchmark.md").write_text(markdown(table, header) + summary_markdown(table, shipped))
        save_grid(grid_rows, out / "samples.png")
        (out / "prompts.txt").write_text("\n".join(prompts[: params.evaluate.grid_prompts]) + "\n")
    atomic_write_json(paths.metrics / "evaluate.json", {f"{r['method']}@{r['steps']}" + (
        f"@w{r['guidance']}" if r.get("kind") == "baseline" else ""): {k: v for k, v in r.items()
                                                                    if isinstance(v, (int, float))} for r in table})
    log.info("evaluate:\n%s", (paths.benchmark / "benchmark.md").read_text())
    return {"rows": table}


def _meta(params: Params, n_prompts: int, **extra) -> dict:
    return {"preset": params.preset, "n_prompts": n_prompts, "batch_size": params.evaluate.batch_size,
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "teacher": str(params.teacher.source),
            **extra}


def _grid(params: Params, rows: list[Row], first: tuple[str, np.ndarray] | None) -> list:
    """The columns of samples.png: ``first`` (the real renders), then every row that has a grid label."""
    n = params.evaluate.grid_prompts
    return ([first] if first else []) + [(r.grid_label, r.samples.images[:n]) for r in rows if r.grid_label]


@torch.no_grad()
def run_real(params: Params, paths: Paths) -> dict:
    """A real teacher (SDXL, SD1.5): the paper's Table 1 suite on MSCOCO-2017 captions (tasks/suite.py)."""
    from tasks.suite import image_sets, run_suite, suite_prompts

    prompts = suite_prompts(params)
    rows, _ = sample_rows(params, paths, prompts, None, None)
    table = run_suite(params, paths, image_sets(rows, prompts))
    for t, r in zip(table, rows):
        t |= {"kind": r.kind, "sec_per_image": r.samples.seconds_per_image, "unet_evals": r.samples.unet_evals_per_image,
              "real_images_used": 0}
    _add_speedups(table, table[0])  # rows[0] is the reference
    _add_training(paths, params.evaluate, table)
    header = f"Benchmark ({params.preset}; {len(prompts)} MSCOCO-2017 captions; CFG w={params.evaluate.guidance_scale})"
    return _write(params, paths, table, _meta(params, len(prompts), suite=True), header, _grid(params, rows, None), prompts)


@torch.no_grad()
def run(params: Params, paths: Paths) -> dict:
    if params.teacher.source.pretrained:
        return run_real(params, paths)
    p, wp = params.evaluate, params.world
    require(paths)
    net = load_evaluator(params, paths)
    specs = read_prompts(paths, "eval")[: p.n_prompts]
    comp = read_prompts(paths, "compositional")
    prompts, comp_prompts = [s.caption() for s in specs], [s.caption() for s in comp]
    real = R.render_batch(specs, p.seed + 11, wp.image_size)
    real2 = R.render_batch(specs, p.seed + 12, wp.image_size)
    rows, sweep = sample_rows(params, paths, specs, comp_prompts, net)

    real_row = {"method": "real renders (two render sets)", "steps": 0, "kind": "real", "real_images_used": 0,
                "alignment": accuracy(net, R.to_unit_tensor(real), specs)["all"],
                "frechet": frechet_distance(net, real, real2)}
    scored = [score(net, r, specs, real, comp) for r in rows]
    seed_spread(net, rows, scored, specs)
    table = [real_row] + scored
    _add_speedups(table, scored[0])  # rows[0] is the reference
    _add_training(paths, p, table)
    reward_scores(params, paths, table, [real] + [r.samples.images for r in rows], prompts)
    table += benchmark_rows(params, paths, net, specs)  # §A.2 applications and the stock sampling paths
    header = (f"Benchmark ({params.preset}; {len(prompts)} held-out prompts; reference CFG w={p.guidance_scale}; "
              f"baselines' w chosen on {p.selection_prompts} other held-out prompts; batch {p.batch_size}; "
              f"reward = {params.mps.condition} score of the reward model, not the judge)")
    return _write(params, paths, table, _meta(params, len(prompts), n_compositional=len(comp_prompts)), header,
                  _grid(params, rows, ("real render", real[: p.grid_prompts])), prompts, sweep)

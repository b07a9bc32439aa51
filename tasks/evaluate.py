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
from dataclasses import dataclass, field

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from models.evaluator import FeatureExtractor
from tasks.applications import benchmark_rows
from tasks.evaluator import accuracy, load_evaluator, mirror_swapped, require
from models.sampling import BASELINE_SAMPLERS, baseline_scheduler
from tasks.generate import Samples, student_samples, teacher_ddim
from tasks.world import read_prompts
from tlcm import render as R
from tlcm import world as W
from tlcm.benchmark_report import markdown, standard_error, summary_markdown
from tlcm.grids import save_grid
from tlcm.params import Params
from tlcm.paths import Paths
from tlcm.stages import LORA_STAGES, upstream
from tlcm.storage import atomic_dir, atomic_write_json
from tlcm.teacher_io import frozen_dtype, load_for_sampling, resolve_teacher

log = logging.getLogger("tlcm")


@dataclass
class Row:
    method: str
    steps: int
    guidance: float
    samples: Samples
    compositional: Samples | None = None
    kind: str = "student"  # "reference" | "baseline" | "student"
    extra: dict = field(default_factory=dict)  # e.g. the baseline's sampler and why it was selected
    seed_images: list[np.ndarray] = field(default_factory=list)  # the same row under other noise seeds


def frechet_distance(net, real: np.ndarray, fake: np.ndarray) -> float:
    extractor = FeatureExtractor(net)
    extractor.num_features = net.proj[1].out_features
    fid = FrechetInceptionDistance(feature=extractor, normalize=False)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    fid.update(to_t(real), real=True)
    fid.update(to_t(fake), real=False)
    return float(fid.compute())


def score(net, row: Row, specs: list[W.Spec], real: np.ndarray, comp_specs: list[W.Spec]) -> dict:
    images = R.to_unit_tensor(row.samples.images)
    acc = accuracy(net, images, specs)
    out = {
        "method": row.method, "steps": row.steps, "guidance": row.guidance, "kind": row.kind, **row.extra,
        "alignment": acc["all"], "alignment_se": standard_error(acc["all"], len(specs)),
        "mirror_swapped": mirror_swapped(net, images, specs),
        **{f"acc_{k}": v for k, v in acc.items() if k != "all"},
        "frechet": frechet_distance(net, real, row.samples.images),
        "sec_per_image": row.samples.seconds_per_image, "unet_evals": row.samples.unet_evals_per_image,
        "real_images_used": 0,
    }
    if row.compositional is not None:
        out["alignment_compositional"] = accuracy(net, R.to_unit_tensor(row.compositional.images), comp_specs)["all"]
    return out


STUDENT_LABELS = {"lcm_baseline": "LCM-LoRA baseline (LCD, 1 segment)", "mlcd": "TLCM after mlcd",
                  "ilcd": "TLCM after ilcd", "mps": "TLCM after mps", "dmgan": "TLCM after dmgan"}
# the distillation stages whose training a row's LoRA has been through (for "train CPU-min"), from the declarations
LINEAGE = {st: tuple(s for s in upstream(st) if s in LORA_STAGES) for st in LORA_STAGES}


def student_rows(p) -> list[tuple[str, str, tuple[int, ...]]]:
    """(stage, row label, step counts) for every student LoRA the benchmark covers."""
    return [(st, STUDENT_LABELS.get(st, f"TLCM after {st}"), p.lcm_steps if st == "lcm_baseline" else p.student_steps)
            for st in p.student_stages]


def shipped_label(p) -> str | None:
    """The row label of the LoRA the pipeline ships (the last TLCM stage benchmarked)."""
    tlcm = [label for st, label, _ in student_rows(p) if st != "lcm_baseline"]
    return tlcm[-1] if tlcm else None


def load_student(source: str, lora_dir, stage: str, dtype: torch.dtype = torch.float32):
    """The user's way (tasks.generate.load_student_pipe): fresh teacher, LoRA loaded and fused, and the
    sampler of that model family (LCMScheduler for the LCM baseline, TLCMScheduler for TLCM), on the device."""
    from tasks.generate import load_student_pipe

    return load_student_pipe(source, lora_dir, "lcm" if stage == "lcm_baseline" else "tlcm", dtype)


def _add_speedups(table: list[dict]) -> None:
    ref = next((r for r in table if r.get("kind") == "reference"), None)
    for r in table:
        if ref and r.get("sec_per_image"):
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


def reward_scores(params: Params, paths: Paths, table: list[dict], images: list[np.ndarray], prompts: list[str]) -> None:
    """Mean reward-model score of every row (``mps.condition``); the reward model is a column, never the judge."""
    from tasks.reward import load_reward

    scorer = load_reward(params, paths)
    bs = params.evaluate.batch_size
    for r, imgs in zip(table, images):
        x = R.to_unit_tensor(imgs)
        r["reward"] = float(torch.cat([scorer.score(x[i:i + bs], prompts[i:i + bs], params.mps.condition)
                                       for i in range(0, len(prompts), bs)]).mean())


def selection_specs(params: Params, eval_specs: list[W.Spec]) -> list[W.Spec]:
    """Held-out (eval-split) prompts for choosing the baselines' CFG scale, none with a benchmark caption."""
    taken = {s.caption() for s in eval_specs}
    pool = W.sample_specs(params.evaluate.seed + 1000, 8 * params.evaluate.selection_prompts, "eval",
                          params.world.two_object_frac)
    return [s for s in pool if s.caption() not in taken][: params.evaluate.selection_prompts]


def baseline_sweep(params: Params, pipe, net, specs: list[W.Spec]) -> tuple[list[dict], list[tuple[str, int, float, str]]]:
    """Every training-free (sampler, steps, CFG w) of the untrained teacher on the selection prompts, and the
    configurations carried to the benchmark: per sampler and step count, the best by alignment and by Fréchet."""
    p = params.evaluate
    prompts = [s.caption() for s in specs]
    real = R.render_batch(specs, p.seed + 13, params.world.image_size)
    sweep = []
    for name in p.baseline_samplers:
        sched = baseline_scheduler(name, pipe.scheduler.config)
        for n in p.baseline_steps:
            for w in p.baseline_guidance:
                s = student_samples(pipe, prompts, n, p.seed, p.batch_size, sched, guidance=w)
                sweep.append({"sampler": name, "steps": n, "guidance": w, "n_prompts": len(prompts),
                              "alignment": accuracy(net, R.to_unit_tensor(s.images), specs)["all"],
                              "frechet": frechet_distance(net, real, s.images)})
            log.info("evaluate: baseline sweep %s %d steps: %s", name, n,
                     {r["guidance"]: round(r["alignment"], 3) for r in sweep if r["sampler"] == name and r["steps"] == n})
    chosen: dict[tuple[str, int, float], list[str]] = {}
    for name in p.baseline_samplers:
        for n in p.baseline_steps:
            rs = [r for r in sweep if r["sampler"] == name and r["steps"] == n]
            best_a = max(rs, key=lambda r: (r["alignment"], -r["frechet"]))
            best_f = min(rs, key=lambda r: (r["frechet"], -r["alignment"]))
            for r, why in ((best_a, "alignment"), (best_f, "frechet")):
                r.setdefault("selected_by", []).append(why)
                chosen.setdefault((name, n, r["guidance"]), []).append(why)
    return sweep, [(name, n, w, "+".join(why)) for (name, n, w), why in chosen.items()]


def sample_rows(params: Params, paths: Paths, specs: list, comp_prompts: list[str] | None, net
                ) -> tuple[list[Row], list[dict]]:
    """The reference, the selected training-free baselines and every student LoRA, sampled the way users
    sample them; and the baselines' whole sweep on the selection prompts. ``specs``: shapes-world specs, or
    plain prompts for a real teacher (``net`` None: no judge, so no baseline sweep and no seed spread)."""
    p = params.evaluate
    prompts = [s if isinstance(s, str) else s.caption() for s in specs]
    source = resolve_teacher(params.teacher.source, paths.teacher)
    pipe = load_for_sampling(source, frozen_dtype(params.teacher))  # on the process's device, in teacher.dtype
    assert not getattr(pipe.unet, "peft_config", None), "teacher rows must run without any adapter"
    comp = (lambda f: f(comp_prompts)) if comp_prompts else (lambda f: None)  # noqa: E731
    n_ref = p.reference_steps
    log.info("evaluate: reference: teacher DDIM %d steps, w=%s, %d prompts", n_ref, p.guidance_scale, len(prompts))
    ref = lambda ps, seed=p.seed: teacher_ddim(pipe, ps, n_ref, p.guidance_scale, seed, p.batch_size)  # noqa: E731
    rows = [Row("teacher DDIM + CFG (reference)", n_ref, p.guidance_scale, ref(prompts), comp(ref), "reference",
                seed_images=[ref(prompts, p.seed + k).images for k in range(1, p.sample_seeds)] if net else [])]
    sweep: list[dict] = []
    if net is not None and p.baseline_samplers:
        sweep, chosen = baseline_sweep(params, pipe, net, selection_specs(params, specs))
        for name, n, w, why in chosen:
            sched = baseline_scheduler(name, pipe.scheduler.config)
            sample = lambda ps: student_samples(pipe, ps, n, p.seed, p.batch_size, sched, guidance=w)  # noqa: E731
            rows.append(Row(f"teacher + {BASELINE_SAMPLERS[name]}", n, w, sample(prompts), comp(sample), "baseline",
                            {"sampler": name, "selected_by": why}))
    shipped = shipped_label(p)
    for stage, label, steps in student_rows(p):
        student = load_student(source, paths.lora(stage), stage, frozen_dtype(params.teacher))
        for n in steps:
            log.info("evaluate: %s %d steps (LoRA fused), %d prompts", label, n, len(prompts))
            sample = lambda ps, seed=p.seed: student_samples(student, ps, n, seed, p.batch_size, student.scheduler)  # noqa: E731
            seeds = [sample(prompts, p.seed + k).images for k in range(1, p.sample_seeds)] if net and label == shipped else []
            rows.append(Row(label, n, 1.0, sample(prompts), comp(sample), "student", seed_images=seeds))
    return rows, sweep


def _seed_spread(net, rows: list[Row], table: list[dict], specs: list[W.Spec]) -> None:
    """Alignment under each extra noise seed (reference and shipped LoRA): the spread sampling alone causes."""
    for row, t in zip(rows, table):
        if row.seed_images:
            per_seed = [t["alignment"]] + [accuracy(net, R.to_unit_tensor(x), specs)["all"] for x in row.seed_images]
            t["alignment_per_seed"] = per_seed
            t["alignment_seed_spread"] = max(per_seed) - min(per_seed)


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
    p = params.evaluate
    short = {label: st for st, label, _ in student_rows(p)}

    def name(r: Row) -> str:
        if r.kind == "reference":
            return f"teacher {r.steps} st"
        if r.kind == "baseline":
            return f"{r.extra['sampler']} w={r.guidance:g} {r.steps} st"
        return f"{short.get(r.method, r.method)} {r.steps} st"

    keep = [r for r in rows if r.kind != "baseline" or "alignment" in r.extra.get("selected_by", "")]
    return ([first] if first else []) + [(name(r), r.samples.images[: p.grid_prompts]) for r in keep]


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
    _add_speedups(table)
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
    table = [score(net, r, specs, real, comp) for r in rows]
    _seed_spread(net, rows, table, specs)
    table = [real_row] + table
    _add_speedups(table)
    _add_training(paths, p, table)
    reward_scores(params, paths, table, [real] + [r.samples.images for r in rows], prompts)
    table += benchmark_rows(params, paths, net, specs)  # §A.2 applications and the stock sampling paths
    header = (f"Benchmark ({params.preset}; {len(prompts)} held-out prompts; reference CFG w={p.guidance_scale}; "
              f"baselines' w chosen on {p.selection_prompts} other held-out prompts; batch {p.batch_size}; "
              f"reward = {params.mps.condition} score of the reward model, not the judge)")
    return _write(params, paths, table, _meta(params, len(prompts), n_compositional=len(comp_prompts)), header,
                  _grid(params, rows, ("real render", real[: p.grid_prompts])), prompts, sweep)

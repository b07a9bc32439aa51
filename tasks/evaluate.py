"""Stage `evaluate`: the benchmark table (JSON, markdown, sample grid) on held-out prompts.

Every row is judged by the independent evaluator: alignment accuracy (every
prompted attribute recognised) with per-attribute accuracies, and the
Fréchet distance of evaluator features against real renders of the same
prompts. ``mirror_swapped`` is the fraction of images that fail only because left/right or
top/bottom is exchanged (right objects, wrong places). Speed is end to end (text encoding, sampling, VAE decoding) at the
stage's batch size, in one process, so rows are comparable as ratios.
"""
from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from models.evaluator import FeatureExtractor
from tasks.evaluator import accuracy, load_evaluator, mirror_swapped, require
from tasks.generate import Samples, student_samples, teacher_ddim
from tasks.world import read_prompts
from tlcm import world as W
from tlcm.grids import save_grid
from tlcm.params import Params
from tlcm.paths import Paths
from tlcm.storage import atomic_dir, atomic_write_json
from tlcm.teacher_io import load_teacher, resolve_teacher

log = logging.getLogger("tlcm")


@dataclass
class Row:
    method: str
    steps: int
    guidance: float
    samples: Samples
    compositional: Samples | None = None


def frechet_distance(net, real: np.ndarray, fake: np.ndarray) -> float:
    extractor = FeatureExtractor(net)
    extractor.num_features = net.proj[1].out_features
    fid = FrechetInceptionDistance(feature=extractor, normalize=False)
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    fid.update(to_t(real), real=True)
    fid.update(to_t(fake), real=False)
    return float(fid.compute())


def score(net, row: Row, specs: list[W.Spec], real: np.ndarray, comp_specs: list[W.Spec]) -> dict:
    images = W.to_unit_tensor(row.samples.images)
    acc = accuracy(net, images, specs)
    out = {
        "method": row.method, "steps": row.steps, "guidance": row.guidance,
        "alignment": acc["all"], "mirror_swapped": mirror_swapped(net, images, specs),
        **{f"acc_{k}": v for k, v in acc.items() if k != "all"},
        "frechet": frechet_distance(net, real, row.samples.images),
        "sec_per_image": row.samples.seconds_per_image, "unet_evals": row.samples.unet_evals_per_image,
        "real_images_used": 0,
    }
    if row.compositional is not None:
        out["alignment_compositional"] = accuracy(net, W.to_unit_tensor(row.compositional.images), comp_specs)["all"]
    return out


COLUMNS = [("method", "method"), ("steps", "steps"), ("alignment", "align."), ("alignment_compositional", "align. (held-out combos)"),
           ("mirror_swapped", "mirror-swapped"),
           ("acc_colour", "colour"), ("acc_shape", "shape"), ("acc_size", "size"), ("acc_layout", "position/relation"),
           ("acc_background", "bg"), ("frechet", "Fréchet"), ("reward", "reward"), ("sec_per_image", "s/img"),
           ("speedup_vs_teacher", "speed-up vs teacher-25"), ("unet_evals", "UNet evals/img"),
           ("train_cpu_minutes", "train CPU-min"), ("real_images_used", "real images")]


def markdown(rows: list[dict], header: str) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) and v < 1 else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [header, "", "| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "")) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


STUDENT_LABELS = {"lcm_baseline": "LCM-LoRA baseline (LCD, 1 segment)", "mlcd": "TLCM after mlcd",
                  "ilcd": "TLCM after ilcd", "mps": "TLCM after mps", "dmgan": "TLCM after dmgan"}
# the distillation stages whose training a row's LoRA has been through (for "train CPU-min")
LINEAGE = {"lcm_baseline": ("lcm_baseline",), "mlcd": ("mlcd",), "ilcd": ("mlcd", "ilcd"),
           "mps": ("mlcd", "ilcd", "mps"), "dmgan": ("mlcd", "ilcd", "mps", "dmgan")}


def student_rows(p) -> list[tuple[str, str, tuple[int, ...]]]:
    """(stage, row label, step counts) for every student LoRA the benchmark covers."""
    return [(st, STUDENT_LABELS.get(st, f"TLCM after {st}"), p.lcm_steps if st == "lcm_baseline" else p.student_steps)
            for st in p.student_stages]


def load_student(source: str, lora_dir, stage: str):
    """The user's way (tasks.generate.load_student_pipe): fresh teacher, LoRA loaded and fused, and the
    sampler of that model family (LCMScheduler for the LCM baseline, TLCMScheduler for TLCM)."""
    from tasks.generate import load_student_pipe

    return load_student_pipe(source, lora_dir, "lcm" if stage == "lcm_baseline" else "tlcm")


def _add_speedups(table: list[dict]) -> None:
    ref = next((r for r in table if r["method"].startswith("teacher") and r["steps"] == max(
        x["steps"] for x in table if x["method"].startswith("teacher"))), None)
    for r in table:
        if ref and r.get("sec_per_image"):
            r["speedup_vs_teacher"] = ref["sec_per_image"] / r["sec_per_image"]


def _training_minutes(paths: Paths, stages: list[str]) -> dict[str, float]:
    out = {}
    for st in stages:
        f = paths.metrics / f"{st}.json"
        if f.is_file():
            sec = json.loads(f.read_text()).get("train_seconds")
            if sec is not None:
                out[st] = sec / 60 * torch.get_num_threads()
    return out


def reward_scores(params: Params, paths: Paths, table: list[dict], images: list[np.ndarray], prompts: list[str]) -> None:
    """Mean reward-model score of every row (``mps.condition``); the reward model is a column, never the judge."""
    from tasks.reward import load_reward

    scorer = load_reward(params, paths)
    bs = params.evaluate.batch_size
    for r, imgs in zip(table, images):
        x = W.to_unit_tensor(imgs)
        r["reward"] = float(torch.cat([scorer.score(x[i:i + bs], prompts[i:i + bs], params.mps.condition)
                                       for i in range(0, len(prompts), bs)]).mean())


def sample_rows(params: Params, paths: Paths, prompts: list[str], comp_prompts: list[str] | None) -> list[Row]:
    """Teacher DDIM+CFG rows and every student LoRA row, sampled the way users sample them."""
    p = params.evaluate
    source = resolve_teacher(params.teacher.source, paths.teacher)
    pipe = load_teacher(source)
    assert not getattr(pipe.unet, "peft_config", None), "teacher rows must run without any adapter"
    comp = (lambda f: f(comp_prompts)) if comp_prompts else (lambda f: None)  # noqa: E731
    rows: list[Row] = []
    for n in p.teacher_steps:
        log.info("evaluate: teacher DDIM %d steps, w=%s, %d prompts", n, p.guidance_scale, len(prompts))
        rows.append(Row("teacher DDIM + CFG", n, p.guidance_scale,
                        teacher_ddim(pipe, prompts, n, p.guidance_scale, p.seed, p.batch_size),
                        comp(lambda ps: teacher_ddim(pipe, ps, n, p.guidance_scale, p.seed, p.batch_size))))
    for stage, label, steps in student_rows(p):
        student = load_student(source, paths.lora(stage), stage)
        for n in steps:
            log.info("evaluate: %s %d steps (LoRA fused), %d prompts", label, n, len(prompts))
            rows.append(Row(label, n, 1.0, student_samples(student, prompts, n, p.seed, p.batch_size, student.scheduler),
                            comp(lambda ps: student_samples(student, ps, n, p.seed, p.batch_size, student.scheduler))))
    return rows


def _add_training(paths: Paths, p, table: list[dict]) -> None:
    cpu_min = _training_minutes(paths, sorted({x for v in LINEAGE.values() for x in v}))
    for r in table:
        for st, label, _ in student_rows(p):
            if r["method"] == label:
                r["train_cpu_minutes"] = sum(cpu_min.get(k, 0.0) for k in LINEAGE.get(st, (st,)))


def _write(params: Params, paths: Paths, table: list[dict], meta: dict, header: str, grid_rows, prompts: list[str]) -> dict:
    with atomic_dir(paths.benchmark) as out:
        (out / "benchmark.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2))
        (out / "benchmark.md").write_text(markdown(table, header))
        save_grid(grid_rows, out / "samples.png")
        (out / "prompts.txt").write_text("\n".join(prompts[: params.evaluate.grid_prompts]) + "\n")
    atomic_write_json(paths.metrics / "evaluate.json", {f"{r['method']}@{r['steps']}": {k: v for k, v in r.items()
                      if isinstance(v, (int, float))} for r in table})
    log.info("evaluate:\n%s", (paths.benchmark / "benchmark.md").read_text())
    return {"rows": table}


def _meta(params: Params, n_prompts: int, **extra) -> dict:
    return {"preset": params.preset, "n_prompts": n_prompts, "batch_size": params.evaluate.batch_size,
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "teacher": params.teacher.source,
            **extra}


def _grid(params: Params, rows: list[Row], first: tuple[str, np.ndarray] | None) -> list:
    p = params.evaluate
    short = {"teacher DDIM + CFG": "teacher"} | {label: st for st, label, _ in student_rows(p)}
    return ([first] if first else []) + [(f"{short.get(r.method, r.method)} {r.steps} st", r.samples.images[: p.grid_prompts])
                                         for r in rows]


@torch.no_grad()
def run_real(params: Params, paths: Paths) -> dict:
    """A real teacher (SDXL, SD1.5): the paper's Table 1 suite on MSCOCO-2017 captions (tasks/suite.py)."""
    from tasks.suite import image_sets, run_suite, suite_prompts

    prompts = suite_prompts(params)
    rows = sample_rows(params, paths, prompts, None)
    table = run_suite(params, paths, image_sets(rows, prompts))
    for t, r in zip(table, rows):
        t |= {"sec_per_image": r.samples.seconds_per_image, "unet_evals": r.samples.unet_evals_per_image,
              "real_images_used": 0}
    _add_speedups(table)
    _add_training(paths, params.evaluate, table)
    header = f"Benchmark ({params.preset}; {len(prompts)} MSCOCO-2017 captions; CFG w={params.evaluate.guidance_scale})"
    return _write(params, paths, table, _meta(params, len(prompts), suite=True), header, _grid(params, rows, None), prompts)


@torch.no_grad()
def run(params: Params, paths: Paths) -> dict:
    if params.teacher.source != "train":
        return run_real(params, paths)
    p, wp = params.evaluate, params.world
    require(paths)
    net = load_evaluator(params, paths)
    specs = read_prompts(paths, "eval")[: p.n_prompts]
    comp = read_prompts(paths, "compositional")
    prompts, comp_prompts = [s.caption() for s in specs], [s.caption() for s in comp]
    real = W.render_batch(specs, p.seed + 11, wp.image_size)
    real2 = W.render_batch(specs, p.seed + 12, wp.image_size)
    rows = sample_rows(params, paths, prompts, comp_prompts)

    real_row = {"method": "real renders (reference)", "steps": 0, "real_images_used": 0,
                "alignment": accuracy(net, W.to_unit_tensor(real), specs)["all"],
                "frechet": frechet_distance(net, real, real2)}
    table = [real_row] + [score(net, r, specs, real, comp) for r in rows]
    _add_speedups(table)
    _add_training(paths, p, table)
    reward_scores(params, paths, table, [real] + [r.samples.images for r in rows], prompts)
    header = (f"Benchmark ({params.preset}; {len(prompts)} held-out prompts; CFG w={p.guidance_scale}; "
              f"batch {p.batch_size}; reward = {params.mps.condition} score of the reward model, not the judge)")
    return _write(params, paths, table, _meta(params, len(prompts), n_compositional=len(comp_prompts)), header,
                  _grid(params, rows, ("real render", real[: p.grid_prompts])), prompts)

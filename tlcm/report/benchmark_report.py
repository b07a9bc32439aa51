"""The benchmark's tables: rows (dicts) → markdown, and the one question it exists to answer.

Pure formatting and arithmetic on the rows the `evaluate` stage measured; no sampling here.
"""
from __future__ import annotations

import math

COLUMNS = [("method", "method"), ("steps", "steps"), ("guidance", "CFG w"), ("alignment", "align."),
           ("alignment_se", "± s.e."), ("alignment_compositional", "align. (held-out combos)"),
           ("mirror_swapped", "mirror-swapped"),
           ("acc_colour", "colour"), ("acc_shape", "shape"), ("acc_size", "size"), ("acc_layout", "position/relation"),
           ("acc_background", "bg"), ("frechet", "Fréchet"), ("reward", "reward"), ("sec_per_image", "s/img"),
           ("speedup_vs_teacher", "speed-up vs teacher-25"), ("unet_evals", "UNet evals/img"),
           ("train_cpu_minutes", "train CPU-min"), ("train_gpu_minutes", "train GPU-min"),
           ("real_images_used", "real images"),
           ("agree_teacher", "agrees w/ teacher"), ("layout_kept", "layout kept"), ("edge_iou", "edge IoU"),
           ("max_abs_diff", "max |Δ| vs benchmark sampler")]
SHORT_COLUMNS = ("method", "steps", "guidance", "alignment", "alignment_se", "frechet", "reward", "sec_per_image",
                 "unet_evals")


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` prompts."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict], header: str, columns: tuple[str, ...] | None = None) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows) and (columns is None or c[0] in columns)]
    lines = [header, "", "| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def best_baselines(rows: list[dict]) -> dict[int, dict]:
    """Per step count: the best training-free baseline row by alignment and by Fréchet distance
    (each the best over every sampler and CFG scale that was carried to the full prompt set)."""
    out: dict[int, dict] = {}
    for n in sorted({r["steps"] for r in rows if r.get("kind") == "baseline"}):
        rs = [r for r in rows if r.get("kind") == "baseline" and r["steps"] == n]
        out[n] = {"alignment": max(rs, key=lambda r: r["alignment"]), "frechet": min(rs, key=lambda r: r["frechet"])}
    return out


def distillation_value(rows: list[dict], method: str) -> list[dict]:
    """What ``method`` (a student's rows) adds over the best training-free sampler at the same step count,
    and where it stands against the 25-step CFG teacher (the reference)."""
    ref = next((r for r in rows if r.get("kind") == "reference"), None)
    best = best_baselines(rows)
    out = []
    for r in (r for r in rows if r["method"] == method and r["steps"] in best):
        b = best[r["steps"]]
        entry = {"steps": r["steps"], "alignment": r["alignment"], "frechet": r["frechet"],
                 "best_baseline_alignment": b["alignment"]["alignment"],
                 "best_baseline_alignment_method": f"{b['alignment']['method']} (w={b['alignment']['guidance']})",
                 "best_baseline_frechet": b["frechet"]["frechet"],
                 "best_baseline_frechet_method": f"{b['frechet']['method']} (w={b['frechet']['guidance']})",
                 "alignment_gain": r["alignment"] - b["alignment"]["alignment"],
                 "frechet_ratio_to_best_baseline": r["frechet"] / b["frechet"]["frechet"]}
        if ref is not None:
            entry |= {"teacher_alignment": ref["alignment"], "teacher_frechet": ref["frechet"],
                      "alignment_minus_teacher": r["alignment"] - ref["alignment"],
                      "frechet_ratio_to_teacher": r["frechet"] / ref["frechet"]}
        out.append(entry)
    return out


def baseline_gaps(rows: list[dict]) -> list[dict]:
    """How far the best training-free sampler at each step count is from the 25-step CFG teacher."""
    ref = next((r for r in rows if r.get("kind") == "reference"), None)
    if ref is None:
        return []
    return [{"steps": n, "best_alignment": b["alignment"]["alignment"], "best_frechet": b["frechet"]["frechet"],
             "alignment_below_teacher": ref["alignment"] - b["alignment"]["alignment"],
             "frechet_ratio_to_teacher": b["frechet"]["frechet"] / ref["frechet"]}
            for n, b in best_baselines(rows).items()]


def summary_markdown(rows: list[dict], shipped: str | None) -> str:
    """The benchmark's answer in two small tables: the best training-free samplers' gap to the teacher,
    and what the shipped LoRA adds over them."""
    lines = ["", "### Best training-free sampler vs the reference (the teacher, DDIM + CFG)", "",
             "| steps | best align. | its gap to teacher | best Fréchet | ratio to teacher |", "|---|---|---|---|---|"]
    for g in baseline_gaps(rows):
        lines.append(f"| {g['steps']} | {g['best_alignment']:.3f} | {g['alignment_below_teacher']:+.3f} | "
                     f"{g['best_frechet']:.1f} | {g['frechet_ratio_to_teacher']:.2f}× |")
    if shipped:
        lines += ["", f"### What distillation adds: {shipped} vs the best training-free sampler", "",
                  "| steps | align. | gain over best baseline | vs teacher | Fréchet | ratio to best baseline | "
                  "ratio to teacher |", "|---|---|---|---|---|---|---|"]
        for v in distillation_value(rows, shipped):
            lines.append(f"| {v['steps']} | {v['alignment']:.3f} | {v['alignment_gain']:+.3f} | "
                         f"{v.get('alignment_minus_teacher', float('nan')):+.3f} | {v['frechet']:.1f} | "
                         f"{v['frechet_ratio_to_best_baseline']:.2f}× | {v.get('frechet_ratio_to_teacher', float('nan')):.2f}× |")
    return "\n".join(lines) + "\n"

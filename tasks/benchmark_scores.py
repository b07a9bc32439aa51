"""The benchmark's judge on sampled rows: the independent evaluator's alignment and per-attribute accuracy, the
Fréchet distance of its features against real renders of the same prompts, the spread over noise seeds, and the
reward model's score (a column, never the judge)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from models.evaluator import FeatureExtractor
from tasks.evaluator import accuracy, mirror_swapped
from tlcm.shapes import render as R
from tlcm.shapes import world as W
from tlcm.report.benchmark_report import standard_error
from tlcm.core.params import Params
from tlcm.core.paths import Paths

if TYPE_CHECKING:
    from tasks.benchmark_sampling import Row


def frechet_distance(net, real: np.ndarray, fake: np.ndarray) -> float:
    extractor = FeatureExtractor(net)
    extractor.num_features = net.proj[1].out_features
    # sync_on_compute=False: the distance of the images given here; torchmetrics would otherwise all-gather across
    # the process group, which hangs when only the main process of a multi-process stage evaluates (final_eval)
    fid = FrechetInceptionDistance(feature=extractor, normalize=False, sync_on_compute=False)
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


def seed_spread(net, rows: list[Row], table: list[dict], specs: list[W.Spec]) -> None:
    """Alignment under each extra noise seed (reference and shipped LoRA): the spread sampling alone causes."""
    for row, t in zip(rows, table):
        if row.seed_images:
            per_seed = [t["alignment"]] + [accuracy(net, R.to_unit_tensor(x), specs)["all"] for x in row.seed_images]
            t["alignment_per_seed"] = per_seed
            t["alignment_seed_spread"] = max(per_seed) - min(per_seed)


def reward_scores(params: Params, paths: Paths, table: list[dict], images: list[np.ndarray], prompts: list[str]) -> None:
    """Mean reward-model score of every row (``mps.condition``); the reward model is a column, never the judge."""
    from tasks.reward import load_reward

    scorer = load_reward(params, paths)
    bs = params.evaluate.batch_size
    for r, imgs in zip(table, images):
        x = R.to_unit_tensor(imgs)
        r["reward"] = float(torch.cat([scorer.score(x[i:i + bs], prompts[i:i + bs], params.mps.condition)
                                       for i in range(0, len(prompts), bs)]).mean())

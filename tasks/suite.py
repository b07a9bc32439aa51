"""The paper's Table 1 suite for real teachers: CLIP score, aesthetic score, ImageReward, FID on MSCOCO-2017.

Not a pipeline stage: the `evaluate` stage calls :func:`run_suite` for a real teacher with its
sample sets, each generated from the COCO captions :func:`suite_prompts` returns (image i from
caption i). Each metric runs when its assets are configured in ``params.suite`` and is left out
of the result (with a log line) otherwise:

- ``clip_score``: mean ``100 * max(cos, 0)`` with CLIP ViT-g/14 (needs ``clip_model``);
- ``aesthetic``: mean LAION aesthetic score, MLP on CLIP ViT-L/14 (``aesthetic_clip``, ``aesthetic_head``);
- ``image_reward``: mean ImageReward (``image_reward``);
- ``fid``: FID with the TorchScript Inception of StyleGAN2-ADA / clean-fid against the COCO images of the
  captions (``fid_inception`` (*), ``coco_captions``, ``coco_images``);
- ``fid_clip``: when no Inception file is given, the same with CLIP ViT-g/14 embeddings ("FID-CLIP",
  not comparable with Inception FID; ``clip_model``, ``coco_captions``, ``coco_images``).

(*) ``suite.fid_inception``: a local ``inception-2015-12-05.pt``.

COCO reference images are centre-cropped and resized to the generated images' size; their
FID statistics are cached under ``<artifacts>/suite/`` (keyed by the feature network, the image
files' names, sizes and mtimes, and the size), so reruns only featurise the generated sets.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from models.scorers import IMAGEREWARD_MAX_TOKENS, ClipFidFeatures, uint8_to_unit
from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.loaders.prompt_sources import read_coco_captions
from tlcm.core.storage import ArtifactError, load_tensors, save_tensors
from tlcm.loaders.suite_io import (ImageFiles, load_aesthetic_scorer, load_clip_scorer, load_image_reward, load_inception,
                           resolve_folder)

log = logging.getLogger("tlcm")


@dataclass(frozen=True)
class ImageSet:
    """One benchmark row's samples: uint8 (N, H, W, 3) images (an ``np.memmap`` works; read in
    batches), image i generated from ``prompts[i]``."""

    method: str
    steps: int
    images: np.ndarray
    prompts: Sequence[str]


def image_sets(rows: Sequence, prompts: Sequence[str]) -> list[ImageSet]:
    """`evaluate`'s ``Row`` objects (``method``, ``steps``, ``samples.images``) as :class:`ImageSet` s."""
    return [ImageSet(r.method, r.steps, r.samples.images, prompts) for r in rows]


def suite_pairs(params: Params) -> list[tuple[str, str]]:
    """The (COCO image file, caption) pairs of the suite: ``suite.n_images`` of captions_val2017, seeded
    by ``evaluate.seed``."""
    s = params.suite
    if not s.coco_captions:
        raise ArtifactError("suite.coco_captions is not set: point it at MSCOCO-2017 annotations/captions_val2017.json")
    return read_coco_captions(s.coco_captions, s.n_images, params.evaluate.seed)


def suite_prompts(params: Params) -> list[str]:
    """The captions to generate the suite's images from (one per COCO image)."""
    return [caption for _, caption in suite_pairs(params)]


def _check(rows: Sequence[ImageSet]) -> None:
    for r in rows:
        if r.images.ndim != 4 or r.images.shape[-1] != 3 or r.images.dtype != np.uint8:
            raise ValueError(f"{r.method}@{r.steps}: images must be uint8 (N, H, W, 3), got {r.images.dtype} "
                             f"{tuple(r.images.shape)}")
        if len(r.images) != len(r.prompts):
            raise ValueError(f"{r.method}@{r.steps}: {len(r.images)} images for {len(r.prompts)} prompts")
        if len(r.images) < 2:
            raise ValueError(f"{r.method}@{r.steps}: at least two images are needed")


def _batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(start index, uint8 (B, H, W, 3) tensor on ``device``) over ``images``."""
    for i in range(0, len(images), batch_size):
        yield i, torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)


ScoreFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


@torch.no_grad()
def mean_score(score: ScoreFn, row: ImageSet, batch_size: int, device: torch.device) -> float:
    """Mean over the row of ``score(images in [0, 1] (B, 3, H, W), prompts) -> (B,)``."""
    total = 0.0
    for i, batch in _batches(row.images, batch_size, device):
        total += float(score(uint8_to_unit(batch), list(row.prompts[i : i + len(batch)])).double().sum())
    return total / len(row.images)


def _tokens(tokenizer, prompts: list[str], device: torch.device, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    t = tokenizer(prompts, truncation=True, return_tensors="pt", **kw)
    return t["input_ids"].to(device), t["attention_mask"].to(device)


# ---- FID ---------------------------------------------------------------------------------

_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def _reference_key(feature_id: str, files: ImageFiles) -> str:
    h = hashlib.sha256(json.dumps([feature_id, str(files.folder.resolve()), files.size]).encode())
    for f in files.files:
        st = (files.folder / f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def reference_fid(features: nn.Module, feature_id: str, files: ImageFiles, batch_size: int, cache_dir: Path,
                  device: torch.device) -> FrechetInceptionDistance:
    """A FID metric holding the reference (real) statistics of ``files``, from the cache when present."""
    files.check()
    metric = FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=False).to(device)
    cache = cache_dir / f"fid_reference_{_reference_key(feature_id, files)}.safetensors"
    if cache.is_file():
        stored = load_tensors(cache, "FID reference statistics")
        for name in _REAL_STATES:
            setattr(metric, name, stored[name].to(device))
        log.info("suite: FID reference statistics from %s", cache)
        return metric
    for batch in files.batches(batch_size):
        metric.update(batch.to(device), real=True)
    save_tensors(cache, {name: getattr(metric, name) for name in _REAL_STATES}, metadata={"feature": feature_id})
    return metric


@torch.no_grad()
def row_fid(metric: FrechetInceptionDistance, row: ImageSet, batch_size: int, device: torch.device) -> float:
    """FID of the row's images against the metric's reference statistics."""
    metric.reset()  # keeps the reference (reset_real_features=False)
    for _, batch in _batches(row.images, batch_size, device):
        metric.update(batch.permute(0, 3, 1, 2).contiguous(), real=False)
    return float(metric.compute())


def _reference_files(params: Params, size: int) -> ImageFiles | None:
    s = params.suite
    if not (s.coco_captions and s.coco_images):
        log.info("suite: FID skipped (suite.coco_captions and suite.coco_images are both needed)")
        return None
    return ImageFiles(Path(s.coco_images).expanduser(), tuple(f for f, _ in suite_pairs(params)), size)


def _fid_into(results: list[dict], key: str, features: nn.Module, feature_id: str, files: ImageFiles,
              rows: Sequence[ImageSet], params: Params, paths: Paths, device: torch.device) -> None:
    bs = params.suite.batch_size
    metric = reference_fid(features, feature_id, files, bs, paths.root / "suite", device)
    for res, row in zip(results, rows):
        res[key] = row_fid(metric, row, bs, device)
        log.info("suite: %s@%d %s %.3f", row.method, row.steps, key, res[key])


# ---- the suite ---------------------------------------------------------------------------

def _device() -> torch.device:
    """The process's device (its GPU, else the CPU), as the sampling rows use."""
    from tlcm.core import distributed

    return distributed.device()


def run_suite(params: Params, paths: Paths, rows: Sequence[ImageSet]) -> list[dict]:
    """Table 1 metrics for each row: ``{"method", "steps", "n_images", "clip_score", "aesthetic",
    "image_reward", "fid" | "fid_clip"}`` (a metric whose assets are not configured is absent).
    One scorer is in memory at a time."""
    _check(rows)
    s, device = params.suite, _device()
    bs = s.batch_size
    results = [{"method": r.method, "steps": r.steps, "n_images": len(r.images)} for r in rows]
    fid_inception = s.fid_inception
    files = _reference_files(params, rows[0].images.shape[1]) if rows else None

    if s.clip_model:
        scorer, tok = load_clip_scorer(s.clip_model)
        scorer.to(device)
        max_len = scorer.image.clip.config.text_config.max_position_embeddings
        for res, row in zip(results, rows):
            res["clip_score"] = mean_score(
                lambda x, p: scorer(x, *_tokens(tok, p, device, padding=True, max_length=max_len)), row, bs, device)
            log.info("suite: %s@%d CLIP score %.3f", row.method, row.steps, res["clip_score"])
        if files is not None and not fid_inception:
            feats = ClipFidFeatures(scorer.image, scorer.image.clip.config.projection_dim)
            folder = resolve_folder(s.clip_model, "suite.clip_model", "")
            _fid_into(results, "fid_clip", feats, f"clip:{folder.resolve()}", files, rows, params, paths, device)
        del scorer
    else:
        log.info("suite: CLIP score skipped (suite.clip_model not set)")

    if s.aesthetic_clip and s.aesthetic_head:
        aesthetic = load_aesthetic_scorer(s.aesthetic_clip, s.aesthetic_head).to(device)
        for res, row in zip(results, rows):
            res["aesthetic"] = mean_score(lambda x, p: aesthetic(x), row, bs, device)
            log.info("suite: %s@%d aesthetic %.3f", row.method, row.steps, res["aesthetic"])
        del aesthetic
    else:
        log.info("suite: aesthetic score skipped (suite.aesthetic_clip and suite.aesthetic_head are both needed)")

    if s.image_reward:
        reward, tok = load_image_reward(s.image_reward)
        reward.to(device)
        for res, row in zip(results, rows):
            res["image_reward"] = mean_score(lambda x, p: reward(x, *_tokens(
                tok, p, device, padding="max_length", max_length=IMAGEREWARD_MAX_TOKENS)), row, bs, device)
            log.info("suite: %s@%d ImageReward %.4f", row.method, row.steps, res["image_reward"])
        del reward
    else:
        log.info("suite: ImageReward skipped (suite.image_reward not set)")

    if files is not None and fid_inception:
        feats = load_inception(fid_inception)
        _fid_into(results, "fid", feats, f"inception:{Path(fid_inception).expanduser().resolve()}", files, rows,
                  params, paths, device)
    elif files is not None and not s.clip_model:
        log.info("suite: FID skipped (no suite.fid_inception file and no suite.clip_model for FID-CLIP)")
    return results

"""A synthetic BAPPS from the shapes world (DESIGN §3), written in the real BAPPS layout (:mod:`tlcm.loaders.bapps_io`).

References are shapes-world renders (train: the world's train split, val: its held-out eval split), with two
independent random distortions per reference, and judgements from a pixel-space perceptual oracle (SSIM) with
label noise: ``judges`` simulated voters each prefer p1 with probability
``sigmoid((SSIM(ref, p1) - SSIM(ref, p0)) / oracle_temperature)``; the stored judge is the vote fraction.
Deterministic in the seed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from tlcm.shapes import render as R
from tlcm.shapes import world as W
from tlcm.loaders.bapps_io import SPLITS, Triplets, write_triplets
from tlcm.core.params import BappsParams, WorldParams
from tlcm.core.storage import atomic_dir

SYNTHETIC_SET = "shapes"


# ---- the pixel-space oracle -----------------------------------------------------------------

def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    k = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(k ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Gaussian-window SSIM (Wang et al. 2004) per image for (N, C, H, W) in [0, 1]; mean over
    channels and valid window positions (separable window). Returns (N,)."""
    x, y = x.float(), y.float()
    n, c = x.shape[:2]
    window = min(window, x.shape[-1], x.shape[-2])
    g = _gaussian_1d(window, sigma)

    def band(size: int) -> torch.Tensor:  # (size - window + 1, size): the valid 1-D gaussian filter as a matrix
        m = torch.zeros(size - window + 1, size)
        for i in range(m.shape[0]):
            m[i, i:i + window] = g
        return m

    bv, bh = band(x.shape[-2]), band(x.shape[-1])

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable filter as two matmuls (fast on CPU)
        return bv @ t @ bh.T

    stats = blur(torch.cat([x, y, x * x, y * y, x * y]))
    mx, my, exx, eyy, exy = stats.chunk(5)
    sxx, syy, sxy = exx - mx ** 2, eyy - my ** 2, exy - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.reshape(n, -1).mean(1)


def oracle_distance(ref: np.ndarray, p: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The synthetic judges' perceptual distance, 1 - SSIM, for uint8 (N, H, W, 3) arrays."""
    out = [1.0 - ssim(R.to_unit_tensor(ref[i:i + batch]), R.to_unit_tensor(p[i:i + batch])).numpy()
           for i in range(0, len(ref), batch)]
    return np.concatenate(out) if out else np.zeros(0)


# ---- distortions ------------------------------------------------------------------------------

def _blur(im: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(radius=0.3 + 1.7 * s))


def _noise(im: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(a + rng.normal(0, 3 + 30 * s, a.shape), 0, 255).astype(np.uint8))


def _colour_shift(im: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(a + rng.uniform(-1, 1, 3) * (5 + 50 * s), 0, 255).astype(np.uint8))


def _contrast(im: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(im, dtype=np.float64)
    f = 1 + (0.1 + 0.6 * s) * (1 if rng.random() < 0.5 else -1)
    return Image.fromarray(np.clip((a - a.mean()) * f + a.mean(), 0, 255).astype(np.uint8))


def _translate(im: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(im)
    k = 1 + int(s * 2.999)
    dy, dx = [(k, 0), (-k, 0), (0, k), (0, -k)][rng.integers(4)]
    a = np.pad(a, ((3, 3), (3, 3), (0, 0)), mode="edge")
    h, w = im.size[1], im.size[0]
    return Image.fromarray(np.ascontiguousarray(a[3 + dy:3 + dy + h, 3 + dx:3 + dx + w]))


def _jpeg(im: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(round(60 - 55 * s)))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _pixelate(im: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    f = 2 if s < 0.5 else 4
    small = im.resize((max(1, im.size[0] // f), max(1, im.size[1] // f)), Image.Resampling.BOX)
    return small.resize(im.size, Image.Resampling.NEAREST)


def _saturation(im: Image.Image, s: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(im, dtype=np.float64)
    grey = a.mean(-1, keepdims=True)
    f = 1 + (0.2 + 0.8 * s) * (1 if rng.random() < 0.4 else -1)
    return Image.fromarray(np.clip(grey + (a - grey) * f, 0, 255).astype(np.uint8))


DISTORTIONS = {
    "blur": _blur, "noise": _noise, "colour_shift": _colour_shift, "contrast": _contrast,
    "translate": _translate, "jpeg": _jpeg, "pixelate": _pixelate, "saturation": _saturation,
}


def distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One or two random distortions (of random strengths) of a uint8 (H, W, 3) image."""
    names = list(DISTORTIONS)
    k = 1 if rng.random() < 0.6 else 2
    im = Image.fromarray(image)
    for j in rng.choice(len(names), size=k, replace=False):
        im = DISTORTIONS[names[j]](im, float(rng.random()), rng)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


# ---- the synthetic BAPPS ------------------------------------------------------------------------

def synthetic_triplets(bp: BappsParams, wp: WorldParams, split: str, n: int) -> Triplets:
    """``n`` synthetic 2AFC triplets of ``split`` (pure in the seeds; no I/O)."""
    sidx = SPLITS.index(split)
    specs = W.sample_specs(bp.seed * 7 + sidx, n, "train" if split == "train" else "eval", wp.two_object_frac)
    ref = R.render_batch(specs, bp.seed * 7 + sidx, wp.image_size)
    p0, p1 = np.empty_like(ref), np.empty_like(ref)
    for i in range(n):
        rng = np.random.default_rng([bp.seed, sidx, i])
        p0[i], p1[i] = distort(ref[i], rng), distort(ref[i], rng)
    d0, d1 = oracle_distance(ref, p0), oracle_distance(ref, p1)
    prob_p1 = 1.0 / (1.0 + np.exp(-np.clip((d0 - d1) / bp.oracle_temperature, -60, 60)))
    votes = np.random.default_rng([bp.seed, sidx, n, 99]).binomial(bp.judges, prob_p1)
    return Triplets(ref, p0, p1, (votes / bp.judges).astype(np.float32), [SYNTHETIC_SET] * n)


def write_synthetic(root: str | Path, bp: BappsParams, wp: WorldParams) -> dict:
    """Write a synthetic BAPPS (train: ``bp.n_train`` triplets, val: ``bp.n_val``) to ``root``
    atomically (the folder appears whole or not at all). Returns a summary."""
    summary: dict = {"sets": [SYNTHETIC_SET], "image_size": wp.image_size, "judges": bp.judges,
                     "oracle": "SSIM (gaussian window 11, sigma 1.5)", "oracle_temperature": bp.oracle_temperature}
    with atomic_dir(root) as tmp:
        for split, n in (("train", bp.n_train), ("val", bp.n_val)):
            t = synthetic_triplets(bp, wp, split, n)
            write_triplets(tmp / "2afc" / split / SYNTHETIC_SET, t)
            summary[split] = {"triplets": n, "judge_mean": float(t.judge.mean()),
                              "unanimous_frac": float(np.mean((t.judge == 0) | (t.judge == 1)))}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

"""BAPPS 2AFC triplets: read the real layout, or write a synthetic shapes-world BAPPS in it (DESIGN §3).

Layout (the real BAPPS, Zhang et al. 2018; also what :func:`write_synthetic` writes)::

    <root>/2afc/{train,val}/<set>/ref/000000.png     reference patch
    <root>/2afc/{train,val}/<set>/p0/000000.png      distortion 0
    <root>/2afc/{train,val}/<set>/p1/000000.png      distortion 1
    <root>/2afc/{train,val}/<set>/judge/000000.npy   shape (1,): fraction of judges preferring p1

The synthetic BAPPS uses shapes-world renders as references (train: the world's
train split, val: its held-out eval split), two independent random distortions
per reference, and judgements from a pixel-space perceptual oracle (SSIM) with
label noise: ``judges`` simulated voters each prefer p1 with probability
``sigmoid((SSIM(ref, p1) - SSIM(ref, p0)) / oracle_temperature)``; the stored
judge is the vote fraction. Deterministic in the seed.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from tlcm import render as R
from tlcm import world as W
from tlcm.params import BappsParams, Params, WorldParams
from tlcm.paths import Paths
from tlcm.storage import ArtifactError, atomic_dir

SPLITS = ("train", "val")
PARTS = ("ref", "p0", "p1")
SYNTHETIC_SET = "shapes"
GET_BAPPS = ("get BAPPS from github.com/richzhang/PerceptualSimilarity (scripts/download_dataset.sh), "
             "or set `bapps.source: synthetic` in params.yaml")


@dataclass
class Triplets:
    """2AFC triplets: uint8 images (N, H, W, 3) and judges (N,) = fraction preferring p1."""

    ref: np.ndarray
    p0: np.ndarray
    p1: np.ndarray
    judge: np.ndarray
    sets: list[str]

    def __len__(self) -> int:
        return len(self.judge)


def bapps_root(params: Params, paths: Paths) -> Path:
    """Where the `bapps` stage's triplets live: ``<artifacts>/bapps`` (synthetic) or ``bapps.source``."""
    return paths.root / "bapps" if params.bapps.source == "synthetic" else Path(params.bapps.source).expanduser()


# ---- reading the real layout -------------------------------------------------------------

def _split_dir(root: Path, split: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"BAPPS root not found: {root}; {GET_BAPPS}")
    d = root / "2afc" / split
    if not d.is_dir():
        raise ArtifactError(f"BAPPS 2AFC split folder not found: {d} (expected <root>/2afc/{{train,val}}/<set>/"
                            f"{{ref,p0,p1,judge}}); {GET_BAPPS}")
    return d


def list_sets(root: str | Path, split: str) -> list[str]:
    d = _split_dir(Path(root), split)
    sets = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sets:
        raise ArtifactError(f"no BAPPS sets in {d}; {GET_BAPPS}")
    return sets


def _set_items(root: Path, split: str, name: str) -> list[str]:
    base = _split_dir(root, split) / name
    for part in (*PARTS, "judge"):
        if not (base / part).is_dir():
            raise ArtifactError(f"BAPPS folder missing: {base / part}; {GET_BAPPS}")
    stems = sorted(p.stem for p in (base / "ref").glob("*.png"))
    if not stems:
        raise ArtifactError(f"no reference patches (*.png) in {base / 'ref'}; {GET_BAPPS}")
    for part, ext in (("p0", "png"), ("p1", "png"), ("judge", "npy")):
        missing = [s for s in stems if not (base / part / f"{s}.{ext}").is_file()]
        if missing:
            raise ArtifactError(f"BAPPS {base / part} lacks {len(missing)} of {len(stems)} files "
                                f"(first: {missing[0]}.{ext}); {GET_BAPPS}")
    return stems


def summarize(root: str | Path, splits: tuple[str, ...] = SPLITS) -> dict:
    """Check the 2AFC layout under ``root`` (ArtifactError naming what is missing); counts per split and set."""
    root = Path(root)
    return {split: {name: len(_set_items(root, split, name)) for name in list_sets(root, split)} for split in splits}


def _read_png(path: Path, size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"BAPPS image unreadable: {path} ({e})") from e


def _read_judge(path: Path) -> float:
    try:
        v = np.load(path).reshape(-1)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"BAPPS judge unreadable: {path} ({e})") from e
    if v.size < 1 or not np.isfinite(v[0]) or not 0.0 <= float(v[0]) <= 1.0:
        raise ArtifactError(f"BAPPS judge must hold one fraction in [0, 1]: {path} (got {v[:3]})")
    return float(v[0])


def load_2afc(root: str | Path, split: str, sets: list[str] | None = None, limit: int = 0,
              size: int | None = None) -> Triplets:
    """Read the 2AFC triplets of ``split`` (all sets, or ``sets``) in file order.

    ``limit`` > 0 keeps the first ``limit`` triplets overall (spread evenly over the sets);
    ``size`` resizes patches to ``size`` x ``size`` (real BAPPS patches are 64 x 64).
    Missing folders or files raise :class:`ArtifactError` naming them.
    """
    root = Path(root)
    sets = sets or list_sets(root, split)
    items = [(name, _set_items(root, split, name)) for name in sets]
    if limit > 0:
        per = max(1, limit // len(items))
        items = [(name, stems[:per]) for name, stems in items]
    out: dict[str, list] = {k: [] for k in (*PARTS, "judge", "set")}
    for name, stems in items:
        base = root / "2afc" / split / name
        for s in stems:
            for part in PARTS:
                out[part].append(_read_png(base / part / f"{s}.png", size))
            out["judge"].append(_read_judge(base / "judge" / f"{s}.npy"))
            out["set"].append(name)
    shapes = {a.shape for part in PARTS for a in out[part]}
    if len(shapes) != 1:
        raise ArtifactError(f"BAPPS patches under {root / '2afc' / split} differ in size {sorted(shapes)}; pass size=")
    return Triplets(*(np.stack(out[p]) for p in PARTS), np.asarray(out["judge"], dtype=np.float32), out["set"])


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


def write_triplets(folder: Path, t: Triplets) -> None:
    """Write ``t`` into ``folder`` (= ``<root>/2afc/<split>/<set>``) in the BAPPS file layout."""
    for part in (*PARTS, "judge"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    for i in range(len(t)):
        stem = f"{i:06d}"
        for part in PARTS:
            Image.fromarray(getattr(t, part)[i]).save(folder / part / f"{stem}.png")
        np.save(folder / "judge" / f"{stem}.npy", np.asarray([t.judge[i]], dtype=np.float32))


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

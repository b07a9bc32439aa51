"""BAPPS 2AFC triplets in the real BAPPS folder layout: where they live, reading them (a clear error naming what is
missing), and writing triplets in the same layout (what :mod:`tlcm.shapes.synthetic_bapps` writes).

Layout (the real BAPPS, Zhang et al. 2018)::

    <root>/2afc/{train,val}/<set>/ref/000000.png     reference patch
    <root>/2afc/{train,val}/<set>/p0/000000.png      distortion 0
    <root>/2afc/{train,val}/<set>/p1/000000.png      distortion 1
    <root>/2afc/{train,val}/<set>/judge/000000.npy   shape (1,): fraction of judges preferring p1
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tlcm.core.params import Params
from tlcm.core.paths import Paths
from tlcm.core.storage import ArtifactError

SPLITS = ("train", "val")
PARTS = ("ref", "p0", "p1")
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


def write_triplets(folder: Path, t: Triplets) -> None:
    """Write ``t`` into ``folder`` (= ``<root>/2afc/<split>/<set>``) in the BAPPS file layout."""
    for part in (*PARTS, "judge"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    for i in range(len(t)):
        stem = f"{i:06d}"
        for part in PARTS:
            Image.fromarray(getattr(t, part)[i]).save(folder / part / f"{stem}.png")
        np.save(folder / "judge" / f"{stem}.npy", np.asarray([t.judge[i]], dtype=np.float32))
